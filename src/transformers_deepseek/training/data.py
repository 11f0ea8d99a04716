"""Chat-formatted training data through the V4 chat template, with the loss on assistant tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # transformers' loss functions skip this label


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], **template_kwargs: Any) -> tuple[str, list]:
    """The rendered conversation and the character spans ``[(start, end)]`` the assistant writes in it.

    Turn ``i``'s span is what the rendering of ``messages[: i + 1]`` adds to the rendering of ``messages[:i]`` with
    the generation prompt (``<｜Assistant｜><think>`` / ``</think>``): reasoning, content, tool calls and the
    end-of-sentence token. The V4 template renders an earlier turn as a chat turn when a later user turn drops its
    reasoning (SPEC: encoding_dsv4 ``drop_thinking``), so that rendering is tried second. Raises ``ValueError`` when
    neither is a prefix of the full rendering.
    """
    full = _render(tokenizer, messages, False, **template_kwargs)
    chat_kwargs = {k: v for k, v in template_kwargs.items() if k not in ("thinking", "thinking_mode")}
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        for kwargs in (template_kwargs, {**chat_kwargs, "thinking_mode": "chat"}):
            prompt = _render(tokenizer, messages[:i], True, **kwargs) if i else ""
            through = _render(tokenizer, messages[: i + 1], False, **kwargs)
            if through.startswith(prompt) and full.startswith(through) and len(through) > len(prompt):
                spans.append((len(prompt), len(through)))
                break
        else:
            raise ValueError(
                f"messages[{i}] (assistant): the chat template does not render it as a continuation of the earlier "
                "turns, so its tokens cannot be located in the conversation; split the conversation before it"
            )
    return full, spans


def prepare_chat_example(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    max_length: int | None = None,
    **template_kwargs: Any,
) -> dict[str, list[int]]:
    """``{"input_ids", "attention_mask", "labels"}`` of one conversation rendered by the tokenizer's chat template
    (template options such as ``thinking=False`` pass through); ``labels`` are the token ids on assistant tokens and
    ``-100`` elsewhere (system / user / tool turns, the BOS and the generation prompts). ``max_length`` truncates."""
    if not messages or not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("messages: a training conversation needs at least one assistant turn")
    text, spans = assistant_spans(tokenizer, messages, **template_kwargs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (start, end) in zip(ids, offsets, strict=True):
        inside = any(s <= start and end <= e for s, e in spans) and end > start
        labels.append(tok if inside else IGNORE_INDEX)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": labels}


@dataclass
class DataCollatorForChat:
    """Right-pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0) and ``labels`` (-100) to the longest
    example (rounded up to ``pad_to_multiple_of``); returns ``torch.long`` tensors for ``Trainer``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollatorForChat: empty batch")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            n = length - len(ids)
            mask = list(f.get("attention_mask", [1] * len(ids)))
            labels = list(f.get("labels", ids))
            if len(mask) != len(ids) or len(labels) != len(ids):
                raise ValueError(
                    f"DataCollatorForChat: input_ids ({len(ids)}), attention_mask ({len(mask)}) and labels "
                    f"({len(labels)}) must have the same length"
                )
            batch["input_ids"].append(ids + [self.pad_token_id] * n)
            batch["attention_mask"].append(mask + [0] * n)
            batch["labels"].append(labels + [IGNORE_INDEX] * n)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
