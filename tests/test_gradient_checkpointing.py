"""Gradient checkpointing: the same gradients with and without it (full model and LoRA on a packed base)."""

from __future__ import annotations

import pytest
import torch

from helpers import require_fixture
from transformers_deepseek import DeepseekV4ForCausalLM
from transformers_deepseek.parity import checkpoint_dir


def _load(name: str) -> DeepseekV4ForCausalLM:
    with checkpoint_dir(require_fixture(name)) as ckpt:
        return DeepseekV4ForCausalLM.from_pretrained(ckpt)


def _grads(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # a padded row: the mHC streams and the chunk state go through the checkpoint as they are
    return ids, mask


def _assert_same(on: dict[str, torch.Tensor], off: dict[str, torch.Tensor]) -> None:
    assert on.keys() == off.keys() and len(on) > 0
    for name in off:
        assert torch.equal(on[name], off[name]), name


def test_full_model_gradients_identical_with_checkpointing():
    model = _load("tiny-bf16")
    ids, mask = _inputs(model.config.vocab_size)
    off = _grads(model, ids, mask)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    calls = []
    original = model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or original(*a, **k)
    on = _grads(model, ids, mask)
    assert len(calls) == model.config.num_hidden_layers  # every decoder layer ran checkpointed
    assert any(".hc_attn_fn" in n for n in off) and any("wo_a" in n for n in off)
    _assert_same(on, off)


def test_lora_gradients_on_the_packed_base_identical_with_checkpointing():
    peft = pytest.importorskip("peft")
    from transformers_deepseek.training import lora_config

    model = _load("tiny-fp8-fp4")
    pm = peft.get_peft_model(model, lora_config(r=4))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids, mask = _inputs(model.config.vocab_size)
    off = _grads(pm, ids, mask)
    # What Trainer(gradient_checkpointing=True) calls (PEFT forwards it to the model, inputs get requires_grad).
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.gradient_checkpointing
    on = _grads(pm, ids, mask)
    assert all("lora_" in n for n in on)
    _assert_same(on, off)
