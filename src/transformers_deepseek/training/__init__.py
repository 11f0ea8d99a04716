"""Fine-tuning DeepSeek-V4 with transformers' Trainer and PEFT: LoRA layers for the grouped ``wo_a`` and the packed
FP8 / FP4 linears, chat data with the loss on assistant tokens only, auxiliary-loss-free expert balancing.

Needs ``peft`` (``pip install transformers-deepseek[train]``)."""

from .balancing import ExpertBalancingCallback
from .data import IGNORE_INDEX, DataCollatorForChat, assistant_spans, prepare_chat_example
from .fsdp import shard_model
from .lora import (
    ATTENTION_TARGET_MODULES,
    DEFAULT_TARGET_MODULES,
    GroupedLoraLinear,
    PackedLoraLinear,
    check_frozen_base,
    load_adapter,
    lora_config,
    register_lora_layers,
)

__all__ = [
    "ATTENTION_TARGET_MODULES",
    "DEFAULT_TARGET_MODULES",
    "IGNORE_INDEX",
    "DataCollatorForChat",
    "ExpertBalancingCallback",
    "GroupedLoraLinear",
    "PackedLoraLinear",
    "assistant_spans",
    "check_frozen_base",
    "load_adapter",
    "lora_config",
    "prepare_chat_example",
    "register_lora_layers",
    "shard_model",
]
