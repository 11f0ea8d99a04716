"""Speculative decoding with DeepSeek-V4's MTP head (``generate(..., use_mtp=True)``).

Each step the MTP block (SPEC §4) drafts one token from the main model's final streams at the last position and
the embedding of the last token; the main model verifies ``[last token, draft]`` in one forward; the draft is
accepted when it is the main model's choice (greedy) or with probability ``min(1, p(x) / q(x))`` (sampling,
otherwise a token is drawn from ``norm(max(0, p - q))``); after an accepted draft the verification's second
position yields a bonus token. Rejected drafts are rolled back with :meth:`DeepseekV4Cache.crop_rows`. The MTP block
only ever sees accepted tokens (its input at position ``t`` is token ``t + 1``), so its own cache never rolls back.

Works on any transformers version this package supports: transformers' own MTP machinery (5.2x
``MTPCandidateGenerator``) rebuilds MTP layers from the main model's HF-style decoder layers and masks, which
our mHC streams, compressed cache and released tensor names do not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache_deepseek_v4 import DeepseekV4Cache

if TYPE_CHECKING:
    from .modeling_deepseek_v4 import DeepseekV4ForCausalLM

# Generation options this loop does not implement; it refuses them rather than ignoring them.
_UNSUPPORTED = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "stop_strings": None, "output_scores": False,
    "output_logits": False, "output_attentions": False, "output_hidden_states": False,
    "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "guidance_scale": None, "constraints": None,
    "force_words_ids": None,
}  # fmt: skip


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """``generate(..., use_mtp=True, return_dict_in_generate=True)``: the sequences plus speculation counters.

    ``num_drafted`` / ``num_accepted``: draft tokens proposed to / accepted by rows still generating;
    ``num_main_forwards``: main-model forward calls (prefill included); ``num_new_tokens``: tokens returned per row.
    """

    num_drafted: int | None = None
    num_accepted: int | None = None
    num_main_forwards: int | None = None
    num_new_tokens: torch.LongTensor | None = None

    @property
    def acceptance_rate(self) -> float:
        return (self.num_accepted or 0) / max(1, self.num_drafted or 0)


def pop_use_mtp(
    model: DeepseekV4ForCausalLM, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> tuple[bool, GenerationConfig | None]:
    """Whether ``generate`` should speculate with the MTP head: ``use_mtp`` from the call's kwargs (removed from
    them), else from ``generation_config`` or the model's. When the answer is no, a config that says yes is copied
    with ``use_mtp=False`` so that transformers >= 5.2x does not start its own MTP path."""
    explicit = kwargs.pop("use_mtp", None)
    base = generation_config if generation_config is not None else model.generation_config
    configured = getattr(base, "use_mtp", None)
    use_mtp = bool(configured) if explicit is None else bool(explicit)
    if not use_mtp and configured:
        generation_config = GenerationConfig.from_dict({**base.to_dict(), "use_mtp": False})
    return use_mtp, generation_config


def mtp_generate(
    model: DeepseekV4ForCausalLM,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: LogitsProcessorList | None = None,
    streamer: Any = None,
    **kwargs: Any,
) -> torch.LongTensor | MTPGenerateOutput:
    """``generate`` with MTP speculative decoding (greedy or sampling); same arguments and result as ``generate``.

    Logits processors (temperature, top-k/p, repetition penalty, ...) apply to the draft and to the verification
    alike, each position with its own prefix, so rejection sampling targets exactly the distribution plain
    sampling draws from. Drafts come from the first MTP block (V4 ships one).
    """
    if not len(model.mtp):
        raise ValueError("use_mtp=True: this model has no MTP block (config.num_nextn_predict_layers == 0)")
    for name in ("stopping_criteria", "assistant_model", "past_key_values", "prefix_allowed_tokens_fn"):
        if kwargs.get(name) is not None:
            raise ValueError(f"use_mtp=True does not support `{name}`")
    gen_config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    for name, default in _UNSUPPORTED.items():
        value = getattr(gen_config, name, default)
        if value not in (default, None):
            raise ValueError(f"use_mtp=True does not support {name}={value!r}")
    input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError("use_mtp=True needs `input_ids` of shape [batch, seq]")
    attention_mask = model_kwargs.pop("attention_mask", None)
    model_kwargs.pop("use_cache", None)
    if model_kwargs:
        raise ValueError(f"use_mtp=True: unsupported generate() arguments {sorted(model_kwargs)}")
    if attention_mask is not None and bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("use_mtp=True: attention_mask must be left-padded (0s then 1s in every row)")
    if gen_config.num_return_sequences and gen_config.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(gen_config.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(gen_config.num_return_sequences, dim=0)

    model._prepare_special_tokens(gen_config, kwargs_has_attention_mask=attention_mask is not None,
                                  device=input_ids.device)  # fmt: skip
    processors = model._get_logits_processor(
        generation_config=gen_config,
        input_ids_seq_length=input_ids.shape[1],
        encoder_input_ids=input_ids,
        logits_processor=logits_processor if logits_processor is not None else LogitsProcessorList(),
        device=input_ids.device,
        model_kwargs={"attention_mask": attention_mask},
    )
    prompt = input_ids.shape[1]
    max_new = gen_config.max_new_tokens if gen_config.max_new_tokens is not None else gen_config.max_length - prompt
    eos = gen_config._eos_token_tensor
    pad = gen_config._pad_token_tensor
    pad_id = int(pad.item()) if pad is not None else (int(eos.flatten()[0]) if eos is not None else 0)
    out = speculative_decode(
        model, input_ids, attention_mask, max(0, int(max_new)), bool(gen_config.do_sample), processors,
        None if eos is None else eos.flatten(), pad_id, streamer,
    )  # fmt: skip
    return out if gen_config.return_dict_in_generate else out.sequences


def _process(processors: LogitsProcessorList, seq: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor):
    """Apply ``processors`` to ``scores [B, V]`` with each row's own prefix ``seq[b, :lengths[b]]`` (rows of equal
    length are processed together)."""
    if not processors:
        return scores
    out = torch.empty_like(scores)
    for n in lengths.unique().tolist():
        rows = (lengths == n).nonzero().squeeze(1)
        out[rows] = processors(seq[rows, :n], scores[rows].clone())
    return out


def _pick(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)


@torch.no_grad()
def speculative_decode(
    model: DeepseekV4ForCausalLM,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    do_sample: bool,
    processors: LogitsProcessorList,
    eos_token_id: torch.Tensor | None,
    pad_token_id: int,
    streamer: Any = None,
) -> MTPGenerateOutput:
    """The speculation loop: ``input_ids [B, P]`` (left-padded per ``attention_mask``) -> up to ``max_new_tokens``
    new tokens per row; rows stop after an EOS (later columns hold ``pad_token_id``)."""
    bsz, prompt = input_ids.shape
    device = input_ids.device
    if streamer is not None:
        if bsz != 1:
            raise ValueError("use_mtp=True: a streamer needs batch size 1")
        streamer.put(input_ids.cpu())
    # Rows advance by 1 or 2 tokens a step: a right-padded buffer with per-row lengths (prompt columns included).
    seq = torch.full((bsz, prompt + max_new_tokens + 2), pad_token_id, dtype=torch.long, device=device)
    seq[:, :prompt] = input_ids
    lengths = torch.full((bsz,), prompt, dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device)
    # One draft per step: the cache must take back at most one token per row.
    cache = DeepseekV4Cache(config=model.config, max_crop=1)
    done = torch.full((bsz,), max_new_tokens <= 0, dtype=torch.bool, device=device)
    drafted = accepted = forwards = 0

    def append(tokens: torch.Tensor, take: torch.Tensor) -> None:
        """Write ``tokens [B]`` at each row's end where ``take``; mark rows done at EOS or at the token budget."""
        nonlocal done
        live = take & ~done
        seq[rows[live], lengths[live]] = tokens[live]
        lengths.add_(live.long())
        hit_eos = live & torch.isin(tokens, eos_token_id) if eos_token_id is not None else torch.zeros_like(live)
        done = done | hit_eos | (lengths - prompt >= max_new_tokens)
        if streamer is not None and bool(live[0]):
            streamer.put(tokens[:1].cpu())

    if max_new_tokens > 0:
        out = model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        forwards += 1
        last = _pick(_process(processors, seq, lengths, out.logits[:, -1].float()), do_sample)
        append(last, torch.ones_like(done))
        # MTP prefill: streams at positions 0..P-1 with tokens 1..P (SPEC §4); padding columns stay padding.
        next_ids = torch.cat([input_ids[:, 1:], last[:, None]], dim=1)
        q_logits = model.mtp_logits(out.streams, next_ids, past_key_values=cache, attention_mask=attention_mask,
                                    logits_to_keep=1)[:, -1]  # fmt: skip
    while not bool(done.all()):
        q_scores = _process(processors, seq, lengths, q_logits.float())
        draft = _pick(q_scores, do_sample)
        out = model(torch.stack([last, draft], dim=1), past_key_values=cache, use_cache=True)
        forwards += 1
        p0 = _process(processors, seq, lengths, out.logits[:, 0].float())
        seq[rows, lengths] = draft  # the second position's prefix ends with the draft (overwritten if rejected)
        p1 = _process(processors, seq, lengths + 1, out.logits[:, 1].float())
        if do_sample:
            p, q = p0.softmax(-1), q_scores.softmax(-1)
            ratio = p[rows, draft] / q[rows, draft]
            ok = torch.rand(bsz, device=device) < ratio
            residual = (p - q).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: any p-sample will do
            first = torch.where(ok, draft, torch.multinomial(residual, 1).squeeze(1))
            bonus = torch.multinomial(p1.softmax(-1), 1).squeeze(1)
        else:
            first = p0.argmax(-1)
            ok = draft == first
            bonus = p1.argmax(-1)
        live = ~done
        drafted += int(live.sum())
        accepted += int((ok & live).sum())
        append(first, torch.ones_like(ok))
        append(bonus, ok)
        cache.crop_rows((~ok).long())
        last = torch.where(ok, bonus, first)
        if bool(done.all()):
            break
        # MTP input: accepted rows add positions P (token `draft`) and P+1 (token `bonus`); rejected rows only P
        # (token `first`), left-padded. The verification already computed the streams of both positions.
        second = torch.where(ok.view(-1, 1, 1), out.streams[:, 1], out.streams[:, 0])
        streams = torch.stack([out.streams[:, 0], second], dim=1)
        next_ids = torch.stack([first, last], dim=1)
        mask = torch.stack([ok, torch.ones_like(ok)], dim=1).long()
        q_logits = model.mtp_logits(streams, next_ids, past_key_values=cache, attention_mask=mask,
                                    logits_to_keep=1)[:, -1]  # fmt: skip
    if streamer is not None:
        streamer.end()

    new = lengths - prompt
    width = int(new.max()) if bsz else 0
    gen = seq[:, prompt : prompt + width]
    # After a row's first EOS, pad (as plain generate does for finished rows).
    if eos_token_id is not None and width:
        is_eos = torch.isin(gen, eos_token_id)
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        gen = gen.masked_fill(after, pad_token_id)
    return MTPGenerateOutput(
        sequences=torch.cat([input_ids, gen], dim=1),
        past_key_values=cache,
        num_drafted=drafted,
        num_accepted=accepted,
        num_main_forwards=forwards,
        num_new_tokens=new,
    )
