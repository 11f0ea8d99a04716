"""DeepSeek-V4 tokenizer loading: packaged default, checkpoint directories, save/reload, AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

from transformers_deepseek.tokenization import (
    DeepseekV4TokenizerFast,
    default_tokenizer_dir,
    load_chat_template,
    load_default_tokenizer,
    register_tokenizer,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
SAMPLE = "Hello DeepSeek-V4! 你好，世界 12345 <｜User｜>hi<｜Assistant｜></think>ok" + EOS


@pytest.fixture(scope="module")
def tokenizer() -> DeepseekV4TokenizerFast:
    return load_default_tokenizer()


def _released_tokenizer_json() -> dict:
    return json.loads((default_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))


def test_default_tokenizer_is_the_released_one(tokenizer: DeepseekV4TokenizerFast) -> None:
    released = _released_tokenizer_json()
    assert isinstance(tokenizer, DeepseekV4TokenizerFast)
    assert len(tokenizer) == len(released["model"]["vocab"]) + sum(
        t["content"] not in released["model"]["vocab"] for t in released["added_tokens"]
    )
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, EOS)
    ids_by_token = {t["content"]: t["id"] for t in released["added_tokens"]}
    assert tokenizer.bos_token_id == ids_by_token[BOS] and tokenizer.eos_token_id == ids_by_token[EOS]
    assert tokenizer.chat_template == load_chat_template()


def test_encoding_matches_the_released_tokenizer(tokenizer: DeepseekV4TokenizerFast) -> None:
    reference = Tokenizer.from_file(str(default_tokenizer_dir() / "tokenizer.json"))
    ids = tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert ids == reference.encode(SAMPLE, add_special_tokens=False).ids
    # Chat control tokens are single added tokens, and nothing is prepended by `encode`.
    assert tokenizer.convert_tokens_to_ids("<｜User｜>") in ids and ids[0] != tokenizer.bos_token_id
    assert tokenizer.decode(ids) == SAMPLE


def test_empty_directory_falls_back_to_the_packaged_tokenizer(tmp_path: Path) -> None:
    tokenizer = DeepseekV4TokenizerFast.from_pretrained(tmp_path)
    assert tokenizer.encode(SAMPLE, add_special_tokens=False) == load_default_tokenizer().encode(
        SAMPLE, add_special_tokens=False
    )
    assert tokenizer.bos_token == BOS and tokenizer.chat_template == load_chat_template()


def test_checkpoint_tokenizer_json_wins_over_the_default(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = DeepseekV4TokenizerFast.from_pretrained(tmp_path)
    assert len(tokenizer.get_vocab()) <= len(vocab) + 3  # + the V4 special tokens filled in as defaults
    assert tokenizer.encode("hello world", add_special_tokens=False) == [1, 2]
    assert tokenizer.chat_template == load_chat_template()


def test_checkpoint_chat_template_is_kept(tmp_path: Path, tokenizer: DeepseekV4TokenizerFast) -> None:
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    reloaded = DeepseekV4TokenizerFast.from_pretrained(tmp_path)
    assert reloaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x"


def test_save_pretrained_keeps_the_template(tmp_path: Path, tokenizer: DeepseekV4TokenizerFast) -> None:
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == load_chat_template()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "DeepseekV4TokenizerFast"
    for cls in (DeepseekV4TokenizerFast, PreTrainedTokenizerFast):
        reloaded = cls.from_pretrained(tmp_path)
        assert reloaded.chat_template == load_chat_template()
        assert reloaded.encode(SAMPLE, add_special_tokens=False) == tokenizer.encode(SAMPLE, add_special_tokens=False)


class _ThrowawayV4Config(PretrainedConfig):
    model_type = "deepseek_v4"


def _config_classes() -> list[type]:
    classes: list[type] = [_ThrowawayV4Config]
    try:
        from transformers_deepseek.modeling.configuration_deepseek_v4 import DeepseekV4Config
    except Exception:  # the modeling package is developed in parallel; the throwaway config still covers this
        return classes
    return [*classes, DeepseekV4Config]


@pytest.mark.parametrize("config_class", _config_classes(), ids=lambda c: c.__module__.split(".")[0])
def test_register_tokenizer_with_auto_tokenizer(
    config_class: type, tmp_path: Path, tokenizer: DeepseekV4TokenizerFast
) -> None:
    register_tokenizer(config_class)
    register_tokenizer(config_class)  # idempotent: the package's register() may run more than once
    tokenizer.save_pretrained(tmp_path)
    by_config = AutoTokenizer.from_pretrained(tmp_path, config=config_class())
    assert type(by_config) is DeepseekV4TokenizerFast
    # A saved tokenizer_config.json names the class, which AutoTokenizer resolves once registered.
    by_name = AutoTokenizer.from_pretrained(tmp_path)
    assert type(by_name) is DeepseekV4TokenizerFast
    assert by_name.chat_template == load_chat_template()
