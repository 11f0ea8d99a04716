"""transformers-deepseek: DeepSeek-V4 as a first-class Hugging Face transformers model.

``import transformers_deepseek`` registers :class:`DeepseekV4Config`, :class:`DeepseekV4Model`,
:class:`DeepseekV4ForCausalLM`, the V4 tokenizer and our quantizer with the transformers Auto classes under
``model_type = "deepseek_v4"``. On transformers versions that ship a native ``deepseek_v4`` (5.8+) this registration
takes precedence over the native one for the Auto classes; set ``TDSEEK_NO_OVERRIDE=1`` before the import (or call
:func:`register` with ``override_native=False``) to keep the native classes. Without the import, transformers is
left untouched.
"""

from __future__ import annotations

import os

from .modeling import DeepseekV4Config, DeepseekV4ForCausalLM, DeepseekV4Model, DeepseekV4PreTrainedModel

__version__ = "0.1.0"

__all__ = [
    "DeepseekV4Config",
    "DeepseekV4ForCausalLM",
    "DeepseekV4Model",
    "DeepseekV4PreTrainedModel",
    "has_native_deepseek_v4",
    "register",
]


def has_native_deepseek_v4() -> bool:
    """Whether the installed transformers ships its own ``deepseek_v4`` model (transformers >= 5.8)."""
    import importlib.util

    return importlib.util.find_spec("transformers.models.deepseek_v4") is not None


def register(override_native: bool = True) -> bool:
    """Register our classes with the transformers Auto classes; returns whether they were registered.

    With ``override_native=False`` and a transformers that has a native ``deepseek_v4``, nothing is registered and
    the Auto classes keep resolving to the native implementation.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if has_native_deepseek_v4() and not override_native:
        return False
    AutoConfig.register(DeepseekV4Config.model_type, DeepseekV4Config, exist_ok=True)
    AutoModel.register(DeepseekV4Config, DeepseekV4Model, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekV4Config, DeepseekV4ForCausalLM, exist_ok=True)
    for hook in _extension_hooks():
        hook(DeepseekV4Config)
    return True


def _extension_hooks() -> list:
    """Registration functions of the optional subpackages (tokenizer, quantizer, Hub publisher), in a fixed
    order."""
    from .publishing import register_publishing
    from .quantization import register_quantization
    from .tokenization import register_tokenizer

    return [register_tokenizer, register_quantization, register_publishing]


register(override_native=os.environ.get("TDSEEK_NO_OVERRIDE", "") not in ("1", "true", "yes"))
