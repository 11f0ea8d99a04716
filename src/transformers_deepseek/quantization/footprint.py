"""In-memory footprint of full-size quantized DeepSeek-V4 models, computed on the meta device (issue 4).

:func:`quantized_model_on_meta` builds the model ``from_pretrained`` returns for a released checkpoint, through the
quantizer's own hooks, without allocating anything; :func:`meta_footprint` compares the bytes of its parameters and
buffers with the released checkpoint (the on-disk bytes of every tensor of the weight table, SPEC §3) and with
native transformers, which dequantizes everything to bf16 on CPU and has no MTP block.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from torch import nn
from transformers.initialization import no_init_weights

from ..modeling.configuration_deepseek_v4 import DeepseekV4Config
from ..modeling.modeling_deepseek_v4 import DeepseekV4ForCausalLM
from .config import DeepseekV4FP8Config
from .quantizer import DeepseekV4FP8HfQuantizer

# config.json quantization_config of the releases (SPEC §2-§3).
RELEASED_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "scale_fmt": "ue8m0",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
# DeepseekV4Config overrides of the released models (the config defaults are V4-Flash).
RELEASED_MODELS: dict[str, dict[str, Any]] = {
    "V4-Flash": {},
    "V4-Pro": {
        "hidden_size": 7168,
        "moe_intermediate_size": 3072,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "n_routed_experts": 384,
        "routed_scaling_factor": 2.5,
        "q_lora_rank": 1536,
        "o_groups": 16,
        "index_topk": 1024,
        "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0],
    },
}


def released_config(name: str) -> DeepseekV4Config:
    """The config of a released model (``"V4-Flash"`` / ``"V4-Pro"``): FP8 linears, FP4 routed experts."""
    if name not in RELEASED_MODELS:
        raise ValueError(f"unknown released model {name!r}; expected one of {sorted(RELEASED_MODELS)}")
    return DeepseekV4Config(
        expert_dtype="fp4", quantization_config=dict(RELEASED_QUANTIZATION_CONFIG), **RELEASED_MODELS[name]
    )


def quantized_model_on_meta(config: DeepseekV4Config) -> nn.Module:
    """The ``DeepseekV4ForCausalLM`` that ``from_pretrained`` returns for a released checkpoint of ``config``, built on
    the meta device (no memory, any size), through the quantizer's own code: from_pretrained's init contexts with the
    dtype the quantizer asks for (bf16; the parameters the model holds in fp32 stay fp32), then
    ``_process_model_before_weight_loading`` (packed FP8 / FP4 modules swapped in) and the post-load finalization
    (``wo_a`` dequantized to bf16, the loading options)."""
    qc = getattr(config, "quantization_config", None)
    if not qc:
        raise ValueError("quantized_model_on_meta: config.quantization_config is missing (not a quantized config)")
    if isinstance(qc, dict):
        qc = DeepseekV4FP8Config(**qc)
    quantizer = DeepseekV4FP8HfQuantizer(qc, pre_quantized=True)
    dtype = quantizer.update_dtype(None)
    with contextlib.ExitStack() as stack:
        # from_pretrained's own init contexts (meta device, default dtype); weight init skipped (nothing to init).
        for ctx in DeepseekV4ForCausalLM.get_init_context(dtype, True, False, None):
            stack.enter_context(ctx)
        stack.enter_context(no_init_weights())
        model = DeepseekV4ForCausalLM(config)
    quantizer._process_model_before_weight_loading(model)  # no checkpoint files: no header to check
    quantizer._finalize_linears(model)
    return model


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (shared tensors once; meta tensors count their size)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def meta_footprint(config: DeepseekV4Config) -> dict[str, int]:
    """``{"ours": bytes in memory after our load, "checkpoint": released on-disk bytes, "native_bf16": bytes of
    native transformers' bf16 tensors}`` for ``config``, without loading or allocating any weight."""
    from ..conversion.table import Layout, build_plan

    plan = build_plan(config, Layout.of_config(config))
    native = sum(math.prod(t.shape) for t in plan.tensors if t.native_name is not None) * 2
    model = quantized_model_on_meta(config)
    return {"ours": tensor_bytes(model), "checkpoint": plan.total_bytes, "native_bf16": native}
