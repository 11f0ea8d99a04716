"""QLoRA: transformers' bitsandbytes 4-bit quantizer on the tiny bf16 checkpoint, PEFT LoRA on top (issue 8).

The user passes a plain `BitsAndBytesConfig`; which linears bitsandbytes may convert comes from the model
(`DeepseekV4PreTrainedModel._keep_in_fp32_modules`), never from `llm_int8_skip_modules`.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import transformers_deepseek  # noqa: E402,F401  (registers the model)
from transformers_deepseek.parity import checkpoint_dir  # noqa: E402

# Linears that must stay as they are (see `_keep_in_fp32_modules`): grouped wo_a, fp32 compressor projections and
# head, the indexer's weights_proj (bf16 in the release), routed experts.
KEPT = re.compile(r"(\.wo_a|\.compressor\.(wkv|wgate)|\.weights_proj|^head|\.ffn\.experts\.\d+\.w[123])$")
# What LoRA adapts in these tests: the bitsandbytes-quantized dense projections of the decoder layers (the MTP block
# takes no part in the causal-LM loss).
LORA_TARGETS = r"layers\.\d+\.(attn\.(wq_a|wq_b|wkv|wo_b)|ffn\.shared_experts\.(w1|w2|w3))"


def _bnb_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


@pytest.fixture(scope="module")
def models(fixtures_dir):
    with checkpoint_dir(fixtures_dir / "tiny-bf16") as ckpt:
        ref = AutoModelForCausalLM.from_pretrained(ckpt)
        quant = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=_bnb_config())
    return ref, quant


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _resident_bytes(module: nn.Module) -> int:
    """Bytes held by one linear: its own parameters and buffers plus, for bitsandbytes, the quantization state
    (absmax, code book and the nested double-quantization state) that lives outside the parameter."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    state = getattr(module.weight, "quant_state", None)
    while state is not None:
        tensors += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
        state = state.state2
    return sum(t.numel() * t.element_size() for t in tensors)


def test_dense_linears_quantized_and_exclusions_automatic(models) -> None:
    ref, quant = models
    assert quant.config.quantization_config.llm_int8_skip_modules is None  # nothing passed by the user
    ref_linears, q_linears = _linears(ref), _linears(quant)
    assert ref_linears.keys() == q_linears.keys()
    converted = {n for n, m in q_linears.items() if isinstance(m, bnb.nn.Linear4bit)}
    expected = {n for n in ref_linears if not KEPT.search(n)}
    assert converted == expected
    # Every kind of dense projection is converted, in the layers and in the MTP block.
    kinds = {re.sub(r"^(layers|mtp)\.\d+\.", "", n) for n in converted}
    assert kinds >= {"attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "attn.indexer.wq_b", "e_proj", "h_proj"}
    assert {f"ffn.shared_experts.w{i}" for i in (1, 2, 3)} <= kinds
    # The kept ones are untouched: same class, dtype and values as in the bf16 load.
    for name in ref_linears.keys() - converted:
        assert type(q_linears[name]) is type(ref_linears[name]), name
        assert torch.equal(q_linears[name].weight, ref_linears[name].weight), name
    assert quant.layers[1].ffn.experts[0].w1.weight.dtype == torch.bfloat16
    assert quant.head.weight.dtype == torch.float32
    # The converted ones hold the checkpoint's weights, up to NF4 rounding.
    for name in converted:
        w = q_linears[name].weight
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        exact = ref_linears[name].weight.float()
        assert (deq - exact).norm() / exact.norm() < 0.15, name


def test_dense_linear_memory_drops_at_least_3x(models) -> None:
    ref, quant = models
    ref_linears, q_linears = _linears(ref), _linears(quant)
    converted = [n for n, m in q_linears.items() if isinstance(m, bnb.nn.Linear4bit)]
    bf16 = sum(_resident_bytes(ref_linears[n]) for n in converted)
    nf4 = sum(_resident_bytes(q_linears[n]) for n in converted)
    params = sum(ref_linears[n].weight.numel() for n in converted)
    assert bf16 == 2 * params  # all bf16 in the reference
    print(
        f"\ndense linears ({len(converted)} modules, {params} weights): "
        f"bf16 {bf16} B, 4-bit {nf4} B, {bf16 / nf4:.2f}x"
    )
    assert bf16 / nf4 >= 3.0


def test_qlora_trains(models) -> None:
    _, quant = models
    torch.manual_seed(0)  # LoRA's A initialisation
    model = peft.get_peft_model(
        quant, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    )
    adapted = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.Linear4bit)]
    assert len(adapted) == 7 * quant.config.num_hidden_layers  # 4 attention + 3 shared-expert projections per layer
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    ids = torch.randint(0, quant.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).repeat(1, 2)
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if losses:  # from the second step on (LoRA's B starts at zero, so A has no gradient at first)
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"\nQLoRA loss: {' '.join(f'{x:.3f}' for x in losses)}")
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
