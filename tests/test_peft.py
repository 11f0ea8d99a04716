"""PEFT LoRA on DeepSeek-V4: the grouped wo_a, frozen packed FP8/FP4 linears, Trainer, chat labels, adapter
save/load, merge-lora export loaded by our plugin and by native transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from helpers import has_native_deepseek_v4, require_fixture
from transformers_deepseek import DeepseekV4ForCausalLM
from transformers_deepseek.modeling.modeling_deepseek_v4 import DeepseekV4GroupedLinear
from transformers_deepseek.parity import checkpoint_dir
from transformers_deepseek.quantization.modules import FP4Linear, FP8Linear, fp8_activation

peft = pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402

from transformers_deepseek.training import (  # noqa: E402
    DataCollatorForChat,
    GroupedLoraLinear,
    PackedLoraLinear,
    check_frozen_base,
    load_adapter,
    lora_config,
    prepare_chat_example,
)


def _load(name: str) -> DeepseekV4ForCausalLM:
    with checkpoint_dir(require_fixture(name)) as ckpt:
        return DeepseekV4ForCausalLM.from_pretrained(ckpt)


def _randomize_lora_b(model: nn.Module, seed: int = 0) -> None:
    """PEFT initialises B to zero (the adapter starts as a no-op); a trained-like adapter has B != 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _read(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (safe_open is not a mapping)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The LoRA layers
# ---------------------------------------------------------------------------------------------------------------------
class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_grouped_lora_is_per_group_w_plus_scaled_ba_and_merges_to_the_released_layout():
    torch.manual_seed(0)
    groups, rank, d, r, alpha = 3, 8, 16, 4, 6.0
    base = DeepseekV4GroupedLinear(d, groups * rank, groups, dtype=torch.float32)
    model = get_peft_model(_Holder(base), lora_config(r=r, lora_alpha=alpha, target_modules=["proj"], task_type=None))
    layer = model.base_model.model.proj
    assert isinstance(layer, GroupedLoraLinear)
    _randomize_lora_b(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (r, d) and b.shape == (groups * rank, r)  # the shapes merge-lora reads
    x = torch.randn(2, 5, groups, d)
    w = base.weight.detach() + (alpha / r) * (b @ a).detach()  # [groups * rank, d]
    expected = torch.stack([x[:, :, g] @ w[g * rank : (g + 1) * rank].T for g in range(groups)], dim=2)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert type(merged.proj) is DeepseekV4GroupedLinear
    torch.testing.assert_close(merged.proj.weight, w, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [FP8Linear, FP4Linear])
def test_packed_lora_keeps_the_official_packed_forward_and_an_fp32_adapter(cls):
    from transformers_deepseek.quantization import formats

    torch.manual_seed(0)
    w = torch.randn(256, 256) * 0.05
    layer = cls(256, 256)
    if cls is FP8Linear:
        q, s = formats.quantize_fp8_blocks(w.bfloat16())
    else:
        q, s = formats.quantize_fp4_e2m1(w.bfloat16())
    layer.weight.data, layer.scale.data = q, s
    model = get_peft_model(_Holder(layer), lora_config(r=4, lora_alpha=8, target_modules=["proj"], task_type=None))
    wrapped = model.base_model.model.proj
    assert isinstance(wrapped, PackedLoraLinear)
    a, b = wrapped.lora_A["default"], wrapped.lora_B["default"]
    assert a.weight.dtype == b.weight.dtype == torch.float32  # not cast to the packed storage dtype
    assert layer.weight.dtype in (torch.float8_e4m3fn, torch.int8) and not layer.weight.requires_grad
    _randomize_lora_b(model)
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16, requires_grad=True)
    y = model(x)
    # Base: the official act quant + dequantized GEMM (SPEC §5.1-5.3), bit for bit; plus 2 * B(A(x)) in fp32.
    deq = layer.dequantized_weight(torch.float32)
    base = F.linear(fp8_activation(x.detach()), deq).bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x.detach()), base)
        ref = (base.float() + 2.0 * b(a(x.detach().float()))).bfloat16()
    assert torch.equal(y, ref)
    # Backward: adapters get gradients, the packed storage none; the input gradient goes straight through the
    # activation quantization and re-dequantizes the weight (same as autograd through the dequantized weight).
    y.float().square().sum().backward()
    assert a.weight.grad is not None and b.weight.grad is not None
    assert layer.weight.grad is None and layer.scale.grad is None
    x2 = x.detach().clone().requires_grad_(True)
    ste = x2.float() + (fp8_activation(x2.detach()) - x2.detach().float())
    y2 = (F.linear(ste, deq).bfloat16().float() + 2.0 * b(a(x2.float()))).bfloat16()
    y2.float().square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="merge-lora"):
        model.merge_adapter()


def test_lora_on_the_fp8_fp4_checkpoint_trains_only_adapters():
    model = _load("tiny-fp8-fp4")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    pm = get_peft_model(model, lora_config(r=4))
    inner = pm.base_model.model
    assert isinstance(inner.layers[1].attn.wo_a, GroupedLoraLinear)
    for name in ("attn.wq_a", "attn.wo_b", "ffn.shared_experts.w2", "ffn.experts.3.w1"):
        assert isinstance(inner.layers[1].get_submodule(name), PackedLoraLinear), name
    assert not isinstance(inner.layers[1].attn.compressor.wkv, peft.tuners.lora.LoraLayer)  # read as a weight
    assert not isinstance(inner.mtp[0].attn.wq_a, peft.tuners.lora.LoraLayer)  # MTP is not in the LM loss
    check_frozen_base(pm)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids, use_cache=False).logits, ref)  # B = 0: exactly the base model
    _randomize_lora_b(pm)
    pm.train()
    pm(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    attn = [n for n in trainable if ".attn." in n or "shared_experts" in n]
    assert all(trainable[n].grad is not None and trainable[n].grad.abs().sum() > 0 for n in attn)
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)
    # The router bias is a buffer (moved by the balancing callback), never an optimizer parameter.
    gate = inner.layers[1].ffn.gate
    assert "bias" in dict(gate.named_buffers()) and "bias" not in dict(gate.named_parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Chat data
# ---------------------------------------------------------------------------------------------------------------------
CHATS = [
    [{"role": "user", "content": "What does str.strip do?"},
     {"role": "assistant", "content": "A copy of the string without leading and trailing whitespace."}],
    [{"role": "system", "content": "Answer in one sentence."},
     {"role": "user", "content": "What is a list?"},
     {"role": "assistant", "content": "A mutable sequence of objects.", "reasoning_content": "Define it."},
     {"role": "user", "content": "And a tuple?"},
     {"role": "assistant", "content": "An immutable sequence of objects.", "reasoning_content": "Contrast it."}],
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    from transformers_deepseek.tokenization import load_default_tokenizer

    return load_default_tokenizer()


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_labels_cover_exactly_the_assistant_turns(tokenizer, thinking):
    ex = prepare_chat_example(tokenizer, CHATS[1], thinking=thinking)
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
    text = tokenizer.apply_chat_template(CHATS[1], tokenize=False, thinking=thinking)
    assert tokenizer.decode(ex["input_ids"]) == text
    target = tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100])
    eos = tokenizer.eos_token
    # Earlier turns lose their reasoning in the rendering (thinking mode); the last turn keeps it.
    last = "Contrast it.</think>An immutable sequence of objects." if thinking else "An immutable sequence of objects."
    assert target == f"A mutable sequence of objects.{eos}{last}{eos}"
    assert all(lab in (-100, t) for t, lab in zip(ex["input_ids"], ex["labels"], strict=True))
    with pytest.raises(ValueError, match="assistant"):
        prepare_chat_example(tokenizer, CHATS[1][:3][1:2])


def test_collator_pads_right_with_ignored_labels(tokenizer):
    feats = [prepare_chat_example(tokenizer, c, thinking=False) for c in CHATS]
    batch = DataCollatorForChat(pad_token_id=7, pad_to_multiple_of=8)(feats)
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(n0, n1)
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (width - n)
    assert (batch["input_ids"][short, n:] == 7).all() and (batch["labels"][short, n:] == -100).all()


# ---------------------------------------------------------------------------------------------------------------------
# Trainer -> adapter save / load -> merge-lora export -> our plugin and native transformers
# ---------------------------------------------------------------------------------------------------------------------
def _chat_dataset(tokenizer, vocab: int) -> list[dict[str, list[int]]]:
    """Chat examples with token ids remapped densely into the tiny model's vocabulary."""
    feats = [prepare_chat_example(tokenizer, c, thinking=False) for c in CHATS] * 4
    seen = sorted({t for f in feats for t in f["input_ids"]})
    assert len(seen) <= vocab
    to_model = {t: i for i, t in enumerate(seen)}
    return [
        {"input_ids": [to_model[t] for t in f["input_ids"]], "attention_mask": f["attention_mask"],
         "labels": [to_model[t] if t != -100 else -100 for t in f["labels"]]}
        for f in feats
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """The tiny-bf16 fixture fine-tuned for a few Trainer steps with LoRA (attention incl. wo_a + experts)."""
    from transformers import Trainer, TrainingArguments

    tmp = tmp_path_factory.mktemp("lora")
    with checkpoint_dir(require_fixture("tiny-bf16")) as ckpt:
        base_dir = Path(ckpt)
        model = DeepseekV4ForCausalLM.from_pretrained(base_dir)
        data = _chat_dataset(tokenizer, model.config.vocab_size)
        pm = get_peft_model(model, lora_config(r=4, lora_alpha=8))
        before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
        args = TrainingArguments(
            output_dir=str(tmp / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
            use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, remove_unused_columns=False,
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = Trainer(model=pm, args=args, train_dataset=data, data_collator=DataCollatorForChat(pad_token_id=0))
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        pm.eval()
        probe = DataCollatorForChat(pad_token_id=0)(data[:2])
        with torch.no_grad():
            logits = pm(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        pm.save_pretrained(tmp / "adapter")
        yield {"base": base_dir, "model": pm, "adapter": tmp / "adapter", "probe": probe, "logits": logits,
               "losses": losses, "changed": changed, "tmp": tmp}  # fmt: skip


def test_trainer_runs_unchanged_and_moves_every_adapter_kind(trained):
    assert len(trained["losses"]) == 3 and all(torch.isfinite(torch.tensor(trained["losses"])))
    changed = trained["changed"]
    for kind in ("attn.wo_a.lora_B", "attn.wq_a.lora_A", "shared_experts.w2.lora_B", "ffn.experts."):
        assert any(kind in n for n in changed), kind


def test_adapter_save_load_reproduces_the_logits_exactly(trained):
    cfg = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    fresh = DeepseekV4ForCausalLM.from_pretrained(trained["base"])
    reloaded = load_adapter(fresh, trained["adapter"]).eval()
    assert isinstance(reloaded.base_model.model.layers[2].attn.wo_a, GroupedLoraLinear)
    probe = trained["probe"]
    with torch.no_grad():
        again = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.equal(again, trained["logits"])


@pytest.fixture(scope="module")
def merged(trained):
    from transformers_deepseek.conversion import converters
    from transformers_deepseek.conversion.io import run_job

    out = trained["tmp"] / "merged"
    run_job(converters.merge_lora(trained["base"], out, trained["adapter"]), progress=False, log=lambda m: None)
    return out


def test_merged_export_is_w_plus_scaled_ba_in_the_released_layout(trained, merged):
    src, got = _read(trained["base"]), _read(merged)
    assert set(got) == set(src)
    lora = trained["model"].base_model.model
    adapted = {n for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert "layers.1.attn.wo_a" in adapted and "layers.3.ffn.experts.5.w3" in adapted
    for name in adapted:
        layer = lora.get_submodule(name)
        delta = layer.scaling["default"] * (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight)
        w = src[f"{name}.weight"]
        expected = torch.where(delta == 0, w.float(), w.float() + delta.detach()).to(w.dtype)
        assert torch.equal(got[f"{name}.weight"], expected), name
    touched = {f"{n}.weight" for n in adapted}
    assert all(torch.equal(got[k], src[k]) for k in src if k not in touched)
    # Our plugin loads the export; its wo_a is the merged grouped projection.
    model = DeepseekV4ForCausalLM.from_pretrained(merged).eval()
    assert torch.equal(model.layers[1].attn.wo_a.weight, got["layers.1.attn.wo_a.weight"])


_NATIVE = textwrap.dedent("""
    import json, sys, torch
    from transformers.models.deepseek_v4 import DeepseekV4ForCausalLM  # the native class; our package not imported
    assert "transformers_deepseek" not in sys.modules
    model, info = DeepseekV4ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, output_loading_info=True)
    model.eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits.float()
    torch.save(logits, sys.argv[3])
    model.save_pretrained(sys.argv[4])
    print(json.dumps({k: sorted(map(str, v)) for k, v in info.items()}))
""")


@pytest.mark.skipif(not has_native_deepseek_v4(), reason="needs transformers with a native deepseek_v4 (>= 5.8)")
def test_merged_export_loads_in_native_transformers_with_the_same_weights(trained, merged):
    tmp = trained["tmp"]
    probe = trained["probe"]
    torch.save({"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}, tmp / "probe.pt")
    env = {**os.environ, "TDSEEK_NO_OVERRIDE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _NATIVE, str(merged), str(tmp / "probe.pt"), str(tmp / "native.pt"), str(tmp / "nat")],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])  # native has no MTP block (SPEC §9.13)
    # Native holds exactly the merged weights: its save, brought back to the released layout by `from-native`, is
    # the export's tensors (minus MTP).
    from transformers_deepseek.conversion import converters
    from transformers_deepseek.conversion.io import run_job

    run_job(converters.from_native(tmp / "nat", tmp / "nat_released"), progress=False, log=lambda m: None)
    export, nat = _read(merged), _read(tmp / "nat_released")
    assert set(nat) == {k for k in export if not k.startswith("mtp.")}
    assert all(torch.equal(nat[k], export[k]) for k in nat)
    # Logits: native vs ours on the same export. Native computes without the official FP8 KV / FP4 indexer
    # simulation and in bf16 where the official model uses fp32 (SPEC §9), so they differ by design, by the same
    # amount as on the unmerged base checkpoint (the merge adds no discrepancy of its own).
    ours = DeepseekV4ForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        mine = ours(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    native = torch.load(tmp / "native.pt")
    mask = probe["attention_mask"].bool()
    rel = float((native[mask] - mine[mask]).norm() / mine[mask].norm())
    print(f"\nmerged bf16 export: logits rel-L2 native vs transformers_deepseek = {rel:.3e}")
    assert 0 < rel < 1
