"""Quantized DeepSeek-V4 checkpoints: weight formats (FP8 e4m3 blocks, FP4 e2m1, e8m0 scales), packed modules, the
quantization config and the HfQuantizer registered with transformers (SPEC §3, §5)."""

from __future__ import annotations

from typing import Any

from ..modeling.modeling_deepseek_v4 import DeepseekV4PreTrainedModel
from .config import QUANT_METHOD, RELEASED_QUANT_METHOD, DeepseekV4FP8Config, is_released_v4_fp8
from .formats import (
    E2M1_VALUES,
    FP4_BLOCK_SIZE,
    FP4_E2M1_MAX,
    FP8_BLOCK_SIZE,
    FP8_E4M3_MAX,
    decode_e2m1,
    dequantize_fp4,
    dequantize_fp8_blocks,
    dequantize_wo_a,
    e8m0_to_float,
    encode_e2m1,
    float_to_e8m0,
    fp4_to_fp8,
    pack_fp4,
    quantize_fp4_e2m1,
    quantize_fp8_blocks,
    unpack_fp4,
)
from .modules import FP4Linear, FP8DequantizedLinear, FP8Linear, fp8_activation
from .quantizer import DeepseekV4FP8HfQuantizer, quantized_linears, released_dtype_overrides

__all__ = [
    "QUANT_METHOD",
    "RELEASED_QUANT_METHOD",
    "DeepseekV4FP8Config",
    "DeepseekV4FP8HfQuantizer",
    "FP4Linear",
    "FP8DequantizedLinear",
    "FP8Linear",
    "fp8_activation",
    "is_released_v4_fp8",
    "quantized_linears",
    "register_quantization",
    "E2M1_VALUES",
    "FP4_BLOCK_SIZE",
    "FP4_E2M1_MAX",
    "FP8_BLOCK_SIZE",
    "FP8_E4M3_MAX",
    "decode_e2m1",
    "dequantize_fp4",
    "dequantize_fp8_blocks",
    "dequantize_wo_a",
    "e8m0_to_float",
    "encode_e2m1",
    "float_to_e8m0",
    "fp4_to_fp8",
    "pack_fp4",
    "quantize_fp4_e2m1",
    "quantize_fp8_blocks",
    "unpack_fp4",
]


def register_quantization(config_class: type | None = None) -> None:
    """Register :class:`DeepseekV4FP8Config` and :class:`DeepseekV4FP8HfQuantizer` with transformers under
    :data:`QUANT_METHOD` (idempotent; transformers' own ``"fp8"`` entries are left alone).

    ``config_class`` is the model config (DeepseekV4Config): it is what renames a released ``quant_method: "fp8"``
    with ``scale_fmt: "ue8m0"`` to :data:`QUANT_METHOD` in memory, so released V4 checkpoints reach this quantizer.
    Our config class is also added to the config types whose loading attributes (``dequantize``, ``fp4_to_fp8``)
    a ``quantization_config=`` passed to ``from_pretrained`` may override on a released config.
    """
    from transformers.quantizers import auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not DeepseekV4FP8Config:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class after a module reload
        auto.register_quantization_config(QUANT_METHOD)(DeepseekV4FP8Config)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not DeepseekV4FP8HfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(DeepseekV4FP8HfQuantizer)
    # Unquantized models save the released on-disk dtypes too (the weight table's, via the quantizer's helper).
    DeepseekV4PreTrainedModel.released_dtypes = staticmethod(released_dtype_overrides)
    loading_types: Any = getattr(auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(loading_types, tuple) and DeepseekV4FP8Config not in loading_types:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*loading_types, DeepseekV4FP8Config)
