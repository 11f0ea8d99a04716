"""HfQuantizer for the released DeepSeek-V4 checkpoints: packed FP8 / FP4 storage, streaming load, exact save.

Loading (``from_pretrained`` with a released config): the model is built on the meta device, the linears that the
release stores quantized are swapped for :class:`FP8Linear` / :class:`FP4Linear` whose ``weight`` / ``scale`` params
have the on-disk dtypes and shapes, and transformers streams every checkpoint tensor into them unchanged. The
checkpoint headers are checked first, so a missing, misshaped or wrongly typed tensor is an error naming it. After
loading, ``wo_a`` is dequantized to bf16 (SPEC §3, as convert.py does) and the options are applied.

Saving (``save_pretrained``): the released layout - packed tensors as they are, ``wo_a`` re-encoded to FP8 with its
kept scale, fp32-held parameters cast back to their on-disk dtype - and ``quant_method: "fp8"`` in config.json.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from ..conversion.table import FP8_BLOCK, ST_DTYPES, Kind, Layout, Tensor, iter_tensors, stored_tensors
from .config import EXPERT_DTYPES, DeepseekV4FP8Config
from .formats import quantize_fp4_e2m1, quantize_fp8_blocks
from .modules import FP4Linear, FP8DequantizedLinear, FP8Linear, _PackedLinear, to_dequantized_linear
from .residency import release_unreferenced_pages, trim_heap

_HIGH_PRECISION = ("BF16", "F16", "F32", "F64")


def model_tensors(model: nn.Module) -> list[Tensor]:
    """The logical tensors of ``model.config`` in the weight table (conversion/table.py) that ``model`` holds: all of
    them for ``DeepseekV4ForCausalLM``, none of MTP and the head for the bare ``DeepseekV4Model``. A linear's
    ``base`` is its module name, a leaf's its parameter / buffer name (module paths are the released names)."""
    held = {name for name, _ in model.named_modules()}
    held.update(name for name, _ in model.named_parameters(remove_duplicate=False))
    held.update(name for name, _ in model.named_buffers(remove_duplicate=False))
    return [t for t in iter_tensors(model.config) if t.base in held]


def quantized_linears(model: nn.Module, expert_dtype: str) -> dict[str, str]:
    """Module name -> storage kind (``"fp8"``, ``"fp4"``, ``"wo_a"``) of every linear the release stores quantized.

    Read from the weight table (SPEC §3): its LINEAR rules are FP8, its EXPERT rules (routed experts) FP4 or, with
    ``expert_dtype="fp8"``, FP8; the rule stored FP8 but used in bf16 (``inference_bf16``: ``wo_a``) is dequantized
    at load.
    """
    layout = Layout("fp8", expert_dtype)
    return {
        t.base: "wo_a" if t.rule.inference_bf16 else layout.format_of(t.rule.kind)
        for t in model_tensors(model)
        if t.is_linear
    }


def expected_tensors(
    kind: str, linear: nn.Linear | _PackedLinear, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{"weight": (st_dtype, shape), "scale": (...)}`` on disk of one linear of :func:`quantized_linears` storage
    ``kind``, by the weight table's :func:`stored_tensors` (SPEC §3: 128x128 FP8 blocks, 1x32 FP4 blocks)."""
    if tuple(block) != (FP8_BLOCK, FP8_BLOCK):
        raise ValueError(f"FP8 weight block must be {[FP8_BLOCK, FP8_BLOCK]} (SPEC §3), got {list(block)}")
    rule_kind, fmt = (Kind.EXPERT, "fp4") if kind == "fp4" else (Kind.LINEAR, "fp8")
    return stored_tensors(rule_kind, fmt, (linear.out_features, linear.in_features))


def read_checkpoint_headers(files: Iterable[str | os.PathLike]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) from the shard headers (no tensor data is read)."""
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def released_dtype_overrides(model: nn.Module) -> dict[str, torch.dtype]:
    """Parameters the official model keeps in fp32 but the release stores in bf16: the weight table's BF16_FP32
    rules (RMSNorm weights, compressor ``wkv`` / ``wgate``, the LM head; SPEC §3), with their on-disk dtype."""
    layout = Layout()
    return {
        t.base: ST_DTYPES[t.stored(layout)[t.base][0]] for t in model_tensors(model) if t.rule.kind is Kind.BF16_FP32
    }


def swap_in_packed_linears(model: nn.Module, layout: dict[str, str], block: tuple[int, int]) -> None:
    """Replace every linear of ``layout`` (see :func:`quantized_linears`) by an empty :class:`FP4Linear` /
    :class:`FP8Linear` on the meta device whose ``weight`` / ``scale`` have the on-disk dtypes and shapes."""
    for name, kind in layout.items():
        linear = model.get_submodule(name)
        if kind == "fp4":
            new: nn.Module = FP4Linear(linear.in_features, linear.out_features, device="meta")
        else:
            new = FP8Linear(linear.in_features, linear.out_features, block, device="meta")
        new.batch_invariant = getattr(model.config, "batch_invariant", True)
        _set_module(model, name, new)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class DeepseekV4FP8HfQuantizer(HfQuantizer):
    """Pre-quantized loading / saving of the released FP8 + FP4-expert checkpoints (see the module docstring)."""

    # Released (pre-quantized) checkpoints load packed; a bf16 checkpoint given an explicit DeepseekV4FP8Config is
    # quantized after loading with fresh ue8m0 scales (exact for values that came from the release, see below).
    requires_calibration = False
    quantization_config: DeepseekV4FP8Config

    def __init__(self, quantization_config: DeepseekV4FP8Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.expert_dtype: str | None = None
        # Checkpoint tensor name -> on-disk torch dtype of the high-precision tensors, to write them back as read.
        self.disk_dtypes: dict[str, torch.dtype] = {}
        self.layout: dict[str, str] = {}
        self.checkpoint_files: list[str] = []
        self.quantize_on_load = False

    # ------------------------------------------------------------------ transformers hooks
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        # The release is bf16 apart from its packed tensors (config.json torch_dtype).
        return torch.bfloat16 if dtype is None else dtype

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False  # tensors arrive packed and are stored as they are

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Adapters (PEFT LoRA, see transformers_deepseek.training) train on top of the frozen packed base: the
        # packed linears dequantize on the fly in forward and backward and never receive a gradient.
        return True

    @property
    def is_compileable(self) -> bool:
        return False

    def _resolve_expert_dtype(self, model: nn.Module, header: dict[str, tuple[str, tuple[int, ...]]]) -> str:
        """``expert_dtype`` nested in quantization_config (later releases) or top level (V4 release), which must
        agree; absent in both (V4-Flash efc85512): read from the checkpoint, else the released FP4 (SPEC §2-§3)."""
        nested = self.quantization_config.expert_dtype
        top = getattr(model.config, "expert_dtype", None)
        for where, value in (("quantization_config.expert_dtype", nested), ("expert_dtype", top)):
            if value is not None and value not in EXPERT_DTYPES:
                raise ValueError(
                    f"config {where} must be one of {EXPERT_DTYPES} for a quantized checkpoint, got {value!r}"
                )
        if nested is not None and top is not None and nested != top:
            raise ValueError(
                f"config expert_dtype ({top!r}) and quantization_config.expert_dtype ({nested!r}) disagree"
            )
        if nested or top:
            return nested or top
        found = {dtype for name, (dtype, _) in header.items() if ".experts." in name and name.endswith(".weight")}
        if found == {"I8"}:
            return "fp4"
        if found == {"F8_E4M3"}:
            return "fp8"
        return "fp4"

    def _check_header(self, model: nn.Module, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        """Every quantized tensor present with its released dtype and shape; no packed tensor where the model holds
        a high-precision one. Raises ValueError listing every offending tensor (found vs expected)."""
        block = self.quantization_config.block
        problems: list[str] = []
        for name, kind in self.layout.items():
            linear = model.get_submodule(name)
            for part, (dtype, shape) in expected_tensors(kind, linear, block).items():
                key = f"{name}.{part}"
                if key not in header:
                    problems.append(f"{key}: missing (expected {dtype} {list(shape)})")
                elif header[key] != (dtype, shape):
                    found_dtype, found_shape = header[key]
                    problems.append(f"{key}: found {found_dtype} {list(found_shape)}, expected {dtype} {list(shape)}")
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        for key, (dtype, _shape) in header.items():
            module_name, _, leaf = key.rpartition(".")
            if module_name in self.layout:
                continue
            if leaf == "scale" and f"{module_name}.weight" in params:
                problems.append(f"{key}: a quantization scale for {module_name}, which the release stores unquantized")
            elif key in params and params[key].is_floating_point() and dtype not in _HIGH_PRECISION:
                problems.append(f"{key}: found {dtype}, expected a bf16/fp16/fp32 tensor")
        if problems:
            raise ValueError(
                f"quantized DeepSeek-V4 checkpoint does not match the config ({len(problems)} tensor(s)): "
                + "; ".join(problems)
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        files = kwargs.get("checkpoint_files") or []
        self.checkpoint_files = [str(f) for f in files]
        header = read_checkpoint_headers(files) if files else {}
        self.expert_dtype = self._resolve_expert_dtype(model, header)
        self.layout = quantized_linears(model, self.expert_dtype)
        self.quantize_on_load = bool(header) and all(
            header.get(f"{name}.weight", ("?",))[0] in _HIGH_PRECISION for name in self.layout
        )
        if self.quantize_on_load:
            # A bf16 checkpoint (e.g. `convert dequantize` output): load it as it is, quantize after loading.
            self.disk_dtypes = {k: ST_DTYPES[d] for k, (d, _) in header.items() if d in _HIGH_PRECISION}
            model.config.expert_dtype = self.expert_dtype
            return model
        if header:
            self._check_header(model, header)
            self.disk_dtypes = {
                k: ST_DTYPES[d]
                for k, (d, _) in header.items()
                if d in _HIGH_PRECISION and k.rpartition(".")[0] not in self.layout
            }
        swap_in_packed_linears(model, self.layout, self.quantization_config.block)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.quantize_on_load:
            self._quantize_linears(model)
        not_loaded = [
            f"{name}.{p}" for name in self.layout for p, t in model.get_submodule(name).named_parameters()
            if t.is_meta
        ]  # fmt: skip
        if not_loaded:
            raise ValueError(f"quantized tensors not found in the checkpoint: {not_loaded}")
        self._finalize_linears(model)
        # Pages of the shard mmaps read only to be converted (fp32 upcasts, wo_a, options) and load-time temporaries
        # would stay resident beside the model's tensors (see residency.py).
        tensors = [*model.parameters(), *model.buffers()]
        release_unreferenced_pages(tensors, self.checkpoint_files)
        trim_heap()
        return model

    def _quantize_linears(self, model: nn.Module) -> None:
        """Replace the loaded high-precision linears of the layout by packed ones (official rounding, ue8m0 scales).

        Weights that were dequantized from a release (``convert dequantize``) come back to exactly the same values:
        a fresh scale is the old one or a smaller power of two, and a power-of-two rescale of an e4m3 / e2m1 code
        that still fits under the format's maximum is again a code of the format.
        """
        block = self.quantization_config.block
        for name, kind in self.layout.items():
            linear = model.get_submodule(name)
            w = linear.weight.detach()
            if kind == "fp4":
                q, scale = quantize_fp4_e2m1(w, name=f"{name}.weight")
                new: nn.Module = FP4Linear(linear.in_features, linear.out_features, device="meta")
            else:
                q, scale = quantize_fp8_blocks(w, block, name=f"{name}.weight")
                new = FP8Linear(linear.in_features, linear.out_features, block, device="meta")
            new.weight = nn.Parameter(q, requires_grad=False)
            new.scale = nn.Parameter(scale, requires_grad=False)
            new.batch_invariant = getattr(model.config, "batch_invariant", True)
            _set_module(model, name, new)
            for key in ("weight", "scale"):
                self.disk_dtypes.pop(f"{name}.{key}", None)

    def _finalize_linears(self, model: nn.Module) -> None:
        """The loaded packed linears in their final form: ``wo_a`` dequantized to bf16, then the options."""
        config = self.quantization_config
        for name, kind in self.layout.items():
            module = model.get_submodule(name)
            for p in module.parameters():
                p.requires_grad_(False)
            groups = model.config.o_groups if kind == "wo_a" else None  # wo_a keeps its grouped form
            if config.dequantize:
                # Exact official dequantization into plain bf16 linears (SPEC §3); no activation quantization.
                _set_module(model, name, to_dequantized_linear(module, groups=groups))
            elif kind == "wo_a":
                _set_module(
                    model, name, FP8DequantizedLinear(module.weight.data, module.scale.data, module.block, groups)
                )
            elif kind == "fp4" and config.fp4_to_fp8:
                _set_module(model, name, FP8Linear.from_fp4(module))
        if config.dequantize:
            # A dequantized model is a bf16 model: it saves without quantization_config and without FP4 experts.
            model.config.expert_dtype = None
        elif config.fp4_to_fp8 and self.expert_dtype == "fp4":
            self.expert_dtype = "fp8"
            self.layout = {k: ("fp8" if v == "fp4" else v) for k, v in self.layout.items()}
            model.config.expert_dtype = "fp8"
            if config.expert_dtype is not None:
                config.expert_dtype = "fp8"

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The released layout (SPEC §3): packed tensors unchanged, ``wo_a`` re-encoded to FP8 with its kept scale,
        high-precision tensors in their on-disk dtype (as read at load; else bf16 for the fp32-held RMSNorm,
        compressor and head weights)."""
        state = model.state_dict()
        overrides = released_dtype_overrides(model)
        for name, module in model.named_modules():
            if isinstance(module, FP8DequantizedLinear):
                state[f"{name}.weight"], state[f"{name}.scale"] = module.requantize()
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            target = self.disk_dtypes.get(key, overrides.get(key))
            if (
                target is not None
                and tensor.is_floating_point()
                and tensor.element_size() >= 2
                and target != tensor.dtype
            ):
                tensor = tensor.to(target)
            out[key] = tensor
        return out, {}
