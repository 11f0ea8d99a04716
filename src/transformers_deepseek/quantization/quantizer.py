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

from ..modeling.modeling_deepseek_v4 import (
    DeepseekV4Attention,
    DeepseekV4Compressor,
    DeepseekV4Indexer,
    DeepseekV4MoE,
    DeepseekV4MTPBlock,
    DeepseekV4RMSNorm,
)
from .config import EXPERT_DTYPES, DeepseekV4FP8Config
from .formats import quantize_fp4_e2m1, quantize_fp8_blocks
from .modules import FP4Linear, FP8DequantizedLinear, FP8Linear, _PackedLinear, to_dequantized_linear
from .residency import release_unreferenced_pages, trim_heap

# SPEC §3: which linears the release stores quantized, per module class (everything else is bf16/fp32 on disk).
FP8_LINEARS: dict[type[nn.Module], tuple[str, ...]] = {
    DeepseekV4Attention: ("wq_a", "wq_b", "wkv", "wo_a", "wo_b"),
    DeepseekV4Indexer: ("wq_b",),
    DeepseekV4MTPBlock: ("e_proj", "h_proj"),
}
# Stored FP8 but used as bf16 without activation quantization: dequantized once at load (SPEC §3, §5.3).
DEQUANTIZED_AT_LOAD: dict[type[nn.Module], tuple[str, ...]] = {DeepseekV4Attention: ("wo_a",)}
EXPERT_PROJS = ("w1", "w2", "w3")

# safetensors dtype names.
_ST_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_HIGH_PRECISION = ("BF16", "F16", "F32", "F64")


def quantized_linears(model: nn.Module, expert_dtype: str) -> dict[str, str]:
    """Module name -> storage kind (``"fp8"``, ``"fp4"``, ``"wo_a"``) of every linear the release stores quantized.

    Driven by the module classes (SPEC §3), not by names: attention / indexer / MTP projections and shared experts
    are FP8, routed experts FP4 (or FP8 with ``expert_dtype="fp8"``), ``wo_a`` FP8 dequantized at load.
    """
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for cls, children in FP8_LINEARS.items():
            if isinstance(module, cls):
                for child in children:
                    dequant = child in DEQUANTIZED_AT_LOAD.get(cls, ())
                    out[prefix + child] = "wo_a" if dequant else "fp8"
        if isinstance(module, DeepseekV4MoE):
            for proj in EXPERT_PROJS:
                out[f"{prefix}shared_experts.{proj}"] = "fp8"
            for e in range(len(module.experts)):
                for proj in EXPERT_PROJS:
                    out[f"{prefix}experts.{e}.{proj}"] = expert_dtype
    return out


def expected_tensors(kind: str, linear: nn.Linear | _PackedLinear, block: tuple[int, int]) -> dict[str, tuple]:
    """``{"weight": (st_dtype, shape), "scale": (...)}`` of one quantized linear on disk (SPEC §3)."""
    out_f, in_f = linear.out_features, linear.in_features
    if kind == "fp4":
        return {"weight": ("I8", (out_f, in_f // 2)), "scale": ("F8_E8M0", (out_f, -(-in_f // 32)))}
    return {
        "weight": ("F8_E4M3", (out_f, in_f)),
        "scale": ("F8_E8M0", (-(-out_f // block[0]), -(-in_f // block[1]))),
    }


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
    """Parameters the official model keeps in fp32 but the release stores in bf16 (SPEC §3): RMSNorm weights,
    compressor ``wkv`` / ``wgate``, the LM head."""
    out: dict[str, torch.dtype] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, DeepseekV4RMSNorm):
            out[prefix + "weight"] = torch.bfloat16
        elif isinstance(module, DeepseekV4Compressor):
            out[prefix + "wkv.weight"] = torch.bfloat16
            out[prefix + "wgate.weight"] = torch.bfloat16
        elif head is not None and module is head:
            out[prefix + "weight"] = torch.bfloat16
    return out


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
            self.disk_dtypes = {k: _ST_DTYPES[d] for k, (d, _) in header.items() if d in _HIGH_PRECISION}
            model.config.expert_dtype = self.expert_dtype
            return model
        if header:
            self._check_header(model, header)
            self.disk_dtypes = {
                k: _ST_DTYPES[d]
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
