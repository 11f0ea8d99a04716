"""Parse one DeepSeek-V4 completion (an assistant turn) into an OpenAI-style assistant message.

Grammar of a completion, as the official `parse_message_from_completion_text` reads it:

    [reasoning "</think>"]                       # thinking mode only
    content
    ( "<｜end▁of▁sentence｜>"
    | "\\n\\n<｜DSML｜tool_calls>\\n" invoke* "</｜DSML｜tool_calls>" ["<｜end▁of▁sentence｜>"] )

    invoke    = '<｜DSML｜invoke name="NAME">\\n' parameter* '</｜DSML｜invoke>\\n'
    parameter = '<｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>\\n'

Valid text gives the official result exactly (including its leniencies, e.g. a truncated tool block at the end of
the text). Malformed text raises `DSMLParseError`, a `ValueError` whose message and `.position` give the character
offset where the problem was found; the official code raises AssertionError for some of these.
Runs in time linear in the number of tags times the text length; no regex backtracking.
"""

from __future__ import annotations

import json
from typing import Any

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML_TOKEN = "｜DSML｜"

TOOL_CALLS_START = f"\n\n<{DSML_TOKEN}tool_calls"
TOOL_CALLS_END = f"</{DSML_TOKEN}tool_calls>"
INVOKE_START = f"<{DSML_TOKEN}invoke"
INVOKE_END = f"</{DSML_TOKEN}invoke"
PARAM_START = f"<{DSML_TOKEN}parameter"
# The closing parameter tag is searched without its "<", which therefore ends the parameter body.
PARAM_END = f"/{DSML_TOKEN}parameter"
TAG_CLOSE = ">\n"

# Tokens that may never appear inside the parsed content or reasoning.
RESERVED_TOKENS = (BOS_TOKEN, EOS_TOKEN, THINK_START, THINK_END, DSML_TOKEN)


class DSMLParseError(ValueError):
    """Malformed completion text; `position` is the character offset where parsing failed."""

    def __init__(self, reason: str, position: int) -> None:
        super().__init__(f"{reason} (at position {position})")
        self.reason = reason
        self.position = position


class _Reader:
    """A cursor over the completion text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def read_until(self, *stops: str) -> tuple[str, str | None]:
        """Text up to the earliest of `stops` (first listed wins a tie), moving past it; all the rest if none."""
        best, found = len(self.text), None
        for stop in stops:
            at = self.text.find(stop, self.pos, best + len(stop))
            if at != -1 and at < best:
                best, found = at, stop
        chunk = self.text[self.pos : best]
        self.pos = best + len(found) if found is not None else len(self.text)
        return chunk, found


def _match_invoke_header(header: str) -> str | None:
    """Tool name from `<ws>name="NAME">\\n`; the official `$` also accepts one extra trailing newline."""
    start = len(header) - len(header.lstrip()) + len('name="')
    if not header.startswith('name="', start - len('name="')):
        return None
    for tail in ('">\n', '">\n\n'):
        end = len(header) - len(tail)
        if header.endswith(tail) and end >= start:
            return header[start:end]
    return None


def _match_parameter(body: str) -> tuple[str, bool, str] | None:
    """(key, is_string, value) from ` name="KEY" string="true|false">VALUE<` (optionally followed by one newline).

    KEY is the shortest prefix followed by a `" string="..">` marker, as the official non-greedy regex takes it.
    """
    prefix = ' name="'
    if not body.startswith(prefix):
        return None
    if body.endswith("<"):
        value_end = len(body) - 1
    elif body.endswith("<\n"):
        value_end = len(body) - 2
    else:
        return None
    best: tuple[int, str] | None = None
    for flag in ("true", "false"):
        at = body.find(f'" string="{flag}">', len(prefix))
        if at != -1 and (best is None or at < best[0]):
            best = (at, flag)
    if best is None:
        return None
    key_end, flag = best
    value_start = key_end + len(f'" string="{flag}">')
    if value_start > value_end:
        return None
    return body[len(prefix) : key_end], flag == "true", body[value_start:value_end]


def _arguments_json(params: dict[str, tuple[str, bool]]) -> str:
    # Same text as the official decoder: string values JSON-quoted, the others inserted verbatim.
    items = (
        f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False) if is_string else value}"
        for key, (value, is_string) in params.items()
    )
    return "{" + ", ".join(items) + "}"


def _parse_tool_calls(reader: _Reader) -> list[dict[str, Any]]:
    """Invokes after the opening `\\n\\n<｜DSML｜tool_calls`; stops after `</｜DSML｜tool_calls>` or at the end."""
    calls: list[dict[str, Any]] = []
    text = reader.text
    while reader.pos < len(text):
        start = reader.pos
        gap, stop = reader.read_until(INVOKE_START, TOOL_CALLS_END)
        if gap != TAG_CLOSE:
            raise DSMLParseError(f"expected '>\\n' to close a DSML tag, got {gap[:40]!r}", start)
        if stop == TOOL_CALLS_END:
            break
        if stop is None:
            raise DSMLParseError(
                f"unterminated tool_calls block: expected {INVOKE_START!r} or {TOOL_CALLS_END!r}", len(text)
            )
        start = reader.pos
        header, stop = reader.read_until(PARAM_START, INVOKE_END)
        name = _match_invoke_header(header)
        if name is None:
            raise DSMLParseError(f"malformed invoke header, expected ' name=\"...\">\\n', got {header[:40]!r}", start)
        params: dict[str, tuple[str, bool]] = {}
        while stop == PARAM_START:
            start = reader.pos
            body, _ = reader.read_until(PARAM_END)
            parsed = _match_parameter(body)
            if parsed is None:
                raise DSMLParseError(
                    f'malformed parameter, expected \' name="..." string="true|false">...<\', got {body[:40]!r}', start
                )
            key, is_string, value = parsed
            if key in params:
                raise DSMLParseError(f"duplicate parameter name {key!r}", start)
            params[key] = (value, is_string)
            start = reader.pos
            gap, stop = reader.read_until(PARAM_START, INVOKE_END)
            if gap != TAG_CLOSE:
                raise DSMLParseError(f"expected '>\\n' after a parameter, got {gap[:40]!r}", start)
        calls.append({"type": "function", "function": {"name": name, "arguments": _arguments_json(params)}})
    return calls


def parse_message_from_completion_text(text: str, thinking_mode: str = "thinking") -> dict[str, Any]:
    """Parse a completion (one assistant turn, EOS included) into an assistant message.

    Returns `{"role": "assistant", "content", "reasoning_content", "tool_calls"}` with OpenAI-format tool calls
    whose `arguments` are JSON strings. Raises `DSMLParseError` (a ValueError naming the position) on malformed text.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")

    reader = _Reader(text)
    reasoning = ""
    reasoning_start = 0
    if thinking_mode == "thinking":
        reasoning, stop = reader.read_until(THINK_END, TOOL_CALLS_START)
        if stop != THINK_END:
            raise DSMLParseError("invalid thinking format: missing </think>", len(reasoning))

    content_start = reader.pos
    content, stop = reader.read_until(EOS_TOKEN, TOOL_CALLS_START)
    tool_calls: list[dict[str, Any]] = []
    if stop == TOOL_CALLS_START:
        tool_calls = _parse_tool_calls(reader)
        start = reader.pos
        trailing, stop = reader.read_until(EOS_TOKEN)
        if trailing:
            raise DSMLParseError(f"unexpected text after the tool calls: {trailing[:40]!r}", start)
    elif stop is None:
        raise DSMLParseError("invalid format: missing the end-of-sentence token", len(text))
    if reader.pos != len(text):
        raise DSMLParseError("unexpected text after the end-of-sentence token", reader.pos)

    for part, offset in ((content, content_start), (reasoning, reasoning_start)):
        for token in RESERVED_TOKENS:
            at = part.find(token)
            if at != -1:
                raise DSMLParseError(f"unexpected special token {token!r} in the message", offset + at)

    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}
