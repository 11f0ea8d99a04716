"""DeepSeek-V4 tokenizer loading, chat template and DSML / reasoning parser."""

from .dsml import parse_message_from_completion_text
from .tokenization_deepseek_v4 import (
    DeepseekV4TokenizerFast,
    default_tokenizer_dir,
    load_chat_template,
    load_default_tokenizer,
    register_tokenizer,
)

__all__ = [
    "DeepseekV4TokenizerFast",
    "default_tokenizer_dir",
    "load_chat_template",
    "load_default_tokenizer",
    "parse_message_from_completion_text",
    "register_tokenizer",
]
