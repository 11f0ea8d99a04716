"""Completion-text parser: the shared parser cases, template round trips, and fuzzing for ValueError-only."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import encoding_dir
from transformers_deepseek.tokenization import load_default_tokenizer, parse_message_from_completion_text
from transformers_deepseek.tokenization.dsml import DSMLParseError, _match_invoke_header, _match_parameter

PARSE_FILES = sorted((encoding_dir() / "parse").glob("*.json"))
D = "｜DSML｜"
EOS = "<｜end▁of▁sentence｜>"
ASSISTANT = "<｜Assistant｜>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


def test_parser_cases_present(encoding_dir: Path) -> None:
    assert len(list((encoding_dir / "parse").glob("*.json"))) >= 5


@pytest.mark.parametrize("path", PARSE_FILES, ids=lambda p: p.stem)
def test_parser_case(path: Path, encoding_dir: Path) -> None:
    case = json.loads(path.read_text(encoding="utf-8"))
    if case["raises"] is None:
        assert parse_message_from_completion_text(case["text"], **case["kwargs"]) == case["expected"]
        return
    # The official code raises AssertionError or ValueError; ours always raises ValueError with the position.
    assert case["raises"]["type"] in ("AssertionError", "ValueError")
    with pytest.raises(ValueError, match=r"at position \d+") as info:
        parse_message_from_completion_text(case["text"], **case["kwargs"])
    assert isinstance(info.value, DSMLParseError) and 0 <= info.value.position <= len(case["text"])


def test_default_mode_is_thinking() -> None:
    assert parse_message_from_completion_text("r</think>c" + EOS)["reasoning_content"] == "r"
    with pytest.raises(ValueError, match="thinking_mode"):
        parse_message_from_completion_text("c" + EOS, thinking_mode="fast")


# ------------------------------------------------------- round trip: template renders, parser reads back
_plain_text = st.text(st.characters(codec="utf-8", exclude_characters="<｜"), max_size=12)
_values = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="<｜"), max_size=8),
    st.integers(-1000, 1000),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text("abc", max_size=3), st.integers(0, 9), max_size=2),
)
_calls = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.text("abcdef_", min_size=1, max_size=8),
            "arguments": st.dictionaries(st.text("abcxyz_", min_size=1, max_size=6), _values, max_size=3),
        }
    ),
    max_size=3,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=_plain_text,
    reasoning=_plain_text,
    calls=_calls,
    mode=st.sampled_from(["chat", "thinking"]),
)
def test_rendered_assistant_turn_parses_back(content, reasoning, calls, mode, tokenizer) -> None:
    tool_calls = [
        {"type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls
    ]
    assistant = {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, assistant], tokenize=False, thinking_mode=mode, drop_thinking=False
    )
    opener = ASSISTANT + ("<think>" if mode == "thinking" else "</think>")
    completion = prompt[prompt.index(opener) + len(opener) :]
    parsed = parse_message_from_completion_text(completion, thinking_mode=mode)
    assert parsed["content"] == content
    assert parsed["reasoning_content"] == (reasoning if mode == "thinking" else "")
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == [c["name"] for c in calls]
    assert [json.loads(c["function"]["arguments"]) for c in parsed["tool_calls"]] == [c["arguments"] for c in calls]


# ---------------------------------------------------------------------- malformed input: ValueError only
_atoms = [
    "\n\n<" + D + "tool_calls",
    ">\n",
    "<" + D + "invoke",
    ' name="f">\n',
    "</" + D + "invoke",
    "<" + D + "parameter",
    ' name="a" string="true">',
    ' string="false">',
    "<",
    "/" + D + "parameter",
    "</" + D + "tool_calls>",
    EOS,
    "</think>",
    "<think>",
    "<｜begin▁of▁sentence｜>",
    D,
    '"',
    "\n",
    "x",
]
_valid_completion = (
    f'why</think>Sure.\n\n<{D}tool_calls>\n<{D}invoke name="f">\n'
    f'<{D}parameter name="a" string="true">v</{D}parameter>\n'
    f'<{D}parameter name="n" string="false">[1]</{D}parameter>\n'
    f"</{D}invoke>\n</{D}tool_calls>{EOS}"
)


@st.composite
def _mutated_completions(draw: st.DrawFn) -> str:
    text = _valid_completion
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "truncate"]))
        if op == "insert":
            text = text[:at] + draw(st.sampled_from(_atoms) | st.text(max_size=3)) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 12)) :]
        else:
            text = text[:at]
    return text


_fuzz_texts = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(_atoms) | st.text(max_size=3), max_size=16).map("".join),
    _mutated_completions(),
)


@settings(max_examples=400, deadline=timedelta(seconds=2))
@given(text=_fuzz_texts, mode=st.sampled_from(["chat", "thinking"]))
def test_fuzz_raises_only_value_error(text: str, mode: str) -> None:
    try:
        message = parse_message_from_completion_text(text, thinking_mode=mode)
    except DSMLParseError as error:
        assert 0 <= error.position <= len(text) and f"at position {error.position}" in str(error)
        return
    assert set(message) == {"role", "content", "reasoning_content", "tool_calls"}
    for call in message["tool_calls"]:
        assert call["type"] == "function" and isinstance(call["function"]["arguments"], str)


@settings(max_examples=3, deadline=timedelta(seconds=5))
@given(repeat=st.integers(2000, 4000))
def test_large_adversarial_input_is_fast(repeat: int) -> None:
    # Many `" string="true">` markers inside one parameter: quadratic for a backtracking regex, linear here.
    body = ' name="' + '" string="true">x' * repeat
    text = "</think>\n\n<" + D + "tool_calls>\n<" + D + 'invoke name="f">\n<' + D + "parameter" + body
    with pytest.raises(ValueError):
        parse_message_from_completion_text(text * 3)


# The official grammar of the two tag bodies, as regular expressions (DOTALL; `$` also matches before a
# final newline). The parser matches them without regexes; hypothesis checks the two agree.
_INVOKE_RE = re.compile(r'^\s*name="(.*?)">\n$', re.DOTALL)
_PARAM_RE = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)
_tag_pieces = st.lists(
    st.sampled_from([' name="', 'name="', '" string="true">', '" string="false">', '">\n', "<", "\n", '"', " ", "a"])
    | st.text(max_size=2),
    max_size=8,
).map("".join)


@settings(max_examples=300)
@given(body=_tag_pieces)
def test_tag_matchers_agree_with_the_official_grammar(body: str) -> None:
    invoke = _INVOKE_RE.findall(body)
    assert _match_invoke_header(body) == (invoke[0] if len(invoke) == 1 else None)
    param = _PARAM_RE.findall(body)
    expected: Any = (param[0][0], param[0][1] == "true", param[0][2]) if len(param) == 1 else None
    assert _match_parameter(body) == expected


def test_fuzz_seed_completion_is_valid() -> None:
    # The mutation fuzzer starts from a well-formed completion, so its mutants cover near-valid DSML.
    message = parse_message_from_completion_text(_valid_completion)
    assert message["reasoning_content"] == "why" and len(message["tool_calls"]) == 1
