"""PEFT LoRA on DeepSeek-V4: the grouped output projection ``wo_a`` and frozen packed FP8 / FP4 linears.

PEFT wraps ``nn.Linear`` out of the box; two kinds of V4 linears need their own LoRA layer, registered through PEFT's
custom-module mapping (``LoraConfig._register_custom_module``) by :func:`lora_config` / :func:`register_lora_layers`:

- ``attn.wo_a`` (:class:`DeepseekV4GroupedLinear`, SPEC §4): ``weight [groups * rank, d]`` applied per group to
  ``[B, S, groups, d]``. Its adapter keeps PEFT's shapes, ``A [r, d]`` (shared by the groups) and
  ``B [groups * rank, r]`` (group ``g`` reads rows ``g * rank ..``), so ``weight + scaling * B @ A`` is the merged
  ``wo_a`` in its released layout and ``transformers-deepseek convert merge-lora`` merges it like any linear.
- :class:`~transformers_deepseek.quantization.FP8Linear` / ``FP4Linear`` (a released FP8 / FP4 checkpoint loaded
  packed): the base stays packed and frozen, its forward is the official one (FP8 activation quantization, weight
  dequantized on the fly, SPEC §5.1-5.3) and LoRA adds ``scaling * B(A(x))`` in the adapter's dtype (fp32).
  In-place merging into packed storage is refused; merge offline with ``convert merge-lora``, which re-quantizes.

Adapters saved with ``save_pretrained`` hold plain ``lora_A`` / ``lora_B`` tensors under the released module names
(``base_model.model.layers.0.attn.wo_a.lora_A.weight``); :func:`load_adapter` reloads them (the custom mapping is not
serialized by PEFT, so ``PeftModel.from_pretrained`` needs it registered again).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from ..modeling.modeling_deepseek_v4 import DeepseekV4GroupedLinear
from ..quantization.modules import FP4Linear, FP8Linear, _PackedLinear

# Every linear the forward pass calls, minus the MTP block (not part of the next-token loss) and the indexer query
# projection (it only feeds the top-k selection, through which no gradient flows). Not listed, because the model
# reads them as weights rather than calling them (an adapter would be silently ignored): the compressor projections
# (fp32 `F.linear` on `.weight`), the router `ffn.gate` (a parameter), the fp32 head (`.weight` in `logits`).
DEFAULT_TARGET_MODULES = (
    r"layers\.\d+\.attn\.(?:wq_a|wq_b|wkv|wo_a|wo_b)"
    r"|layers\.\d+\.ffn\.(?:shared_experts|experts\.\d+)\.(?:w1|w2|w3)"
)
ATTENTION_TARGET_MODULES = r"layers\.\d+\.attn\.(?:wq_a|wq_b|wkv|wo_a|wo_b)"


def _refuse_variants(layer: LoraLinear, config: LoraConfig, what: str) -> None:
    for flag in ("use_dora", "lora_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"LoraConfig.{flag}=True is not supported on {what}; use plain LoRA there")


class GroupedLoraLinear(LoraLinear):
    """LoRA on the grouped ``wo_a``: ``y_g = W_g x_g + scaling * B_g (A x_g)`` for each group ``g``."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        _refuse_variants(self, config, "the grouped wo_a")
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("wo_a: per-row adapter_names (mixed adapter batches) are not supported")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # [B, S, groups, rank]
        if self.merged:
            return result
        base = self.get_base_layer()
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            a = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))  # [B, S, groups, r]
            b = lora_b.weight.view(base.groups, -1, a.shape[-1])  # [groups, rank, r]
            result = result + torch.einsum("bsgk,grk->bsgr", a, b) * self.scaling[name]
        return result.to(dtype)

    def __repr__(self) -> str:
        return "lora.grouped." + super().__repr__()


class PackedLoraLinear(LoraLinear):
    """LoRA on a frozen packed FP8 / FP4 linear: the official packed forward plus ``scaling * B(A(x))``."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        _refuse_variants(self, config, f"a packed {type(self.get_base_layer()).__name__}")
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # PEFT would cast the adapter to the base weight's dtype, which here is float8 / int8 storage: move only.
        target = device if device is not None else self.get_base_layer().weight.device
        for attr in ("lora_A", "lora_B", "lora_dropout"):
            layers = getattr(self, attr)
            if adapter_name in layers:
                layers[adapter_name] = layers[adapter_name].to(target)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"cannot merge LoRA in place into a packed {type(self.get_base_layer()).__name__}: merge the saved "
            "adapter with `transformers-deepseek convert merge-lora CHECKPOINT OUT --adapter ADAPTER_DIR` "
            "(re-quantizes with the official rounding), or load with DeepseekV4FP8Config(dequantize=True)"
        )

    def __repr__(self) -> str:
        return "lora.packed." + super().__repr__()


LORA_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    DeepseekV4GroupedLinear: GroupedLoraLinear,
    FP8Linear: PackedLoraLinear,
    FP4Linear: PackedLoraLinear,
}


def register_lora_layers(config: LoraConfig) -> LoraConfig:
    """Register the V4 LoRA layers (grouped ``wo_a``, packed FP8 / FP4 linears) on a PEFT ``LoraConfig``; returns
    it."""
    config._register_custom_module(LORA_LAYERS)
    return config


def lora_config(
    r: int = 16, lora_alpha: float = 32, target_modules: str | list[str] = DEFAULT_TARGET_MODULES, **kwargs: Any
) -> LoraConfig:
    """A ``LoraConfig`` (task ``CAUSAL_LM``) on the V4 attention projections (including the grouped ``wo_a``), the
    shared and the routed experts by default, with the V4 LoRA layers registered."""
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return register_lora_layers(LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, **kwargs))


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False, **kwargs: Any):
    """``PeftModel.from_pretrained`` for a V4 adapter: reads its ``LoraConfig`` and registers the V4 LoRA layers."""
    config = register_lora_layers(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable, **kwargs)


def check_frozen_base(model: nn.Module) -> None:
    """Raise ``ValueError`` if a packed FP8 / FP4 tensor would receive a gradient (it must stay frozen)."""
    bad = [
        f"{name}.{p_name}"
        for name, module in model.named_modules()
        if isinstance(module, _PackedLinear)
        for p_name, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]
    if bad:
        raise ValueError(f"packed quantized tensors must stay frozen, found requires_grad=True on: {bad}")
