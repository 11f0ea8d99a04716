"""DeepSeek-V4 architecture: configuration, model, cache. Never imports quantization/ or conversion/."""

from .configuration_deepseek_v4 import DeepseekV4Config
from .modeling_deepseek_v4 import DeepseekV4ForCausalLM, DeepseekV4Model, DeepseekV4PreTrainedModel

__all__ = ["DeepseekV4Config", "DeepseekV4ForCausalLM", "DeepseekV4Model", "DeepseekV4PreTrainedModel"]
