"""Forward API: loss, hidden streams, logits_to_keep, generate/pipeline, and bad input naming the field."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from helpers import read_tensors, require_fixture, same_bytes
from transformers_deepseek import DeepseekV4ForCausalLM, DeepseekV4Model


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(require_fixture("tiny-bf16") / "checkpoint").eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))


def test_labels_give_the_shifted_causal_lm_loss(model, ids):
    with torch.no_grad():
        out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 1024), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert out.logits.dtype == torch.float32  # fp32 head (SPEC §4)


def test_hidden_states_are_the_hc_streams(model, ids):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    cfg = model.config
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert all(h.shape == (2, 24, cfg.hc_mult, cfg.hidden_size) for h in out.hidden_states)
    # Stream 0 after the embedding is the embedding itself, repeated into every stream.
    assert torch.equal(out.hidden_states[0][:, :, 2], model.embed(ids))
    assert torch.equal(out.hidden_states[-1], out.streams)


def test_logits_to_keep_and_base_model(model, ids):
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        base = DeepseekV4Model.from_pretrained(require_fixture("tiny-bf16") / "checkpoint")(ids)
    # Same values up to fp32 GEMM blocking (the head sees a different number of rows).
    assert torch.allclose(last[:, -1], full[:, -1], rtol=0, atol=1e-4)
    assert torch.equal(model.logits(base.last_hidden_state), full)


def test_training_step_reaches_every_trainable_parameter(ids):
    model = DeepseekV4ForCausalLM.from_pretrained(require_fixture("tiny-bf16") / "checkpoint").train()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    no_grad = [
        n for n, p in model.named_parameters()
        if p.requires_grad and p.grad is None and not n.startswith("mtp.")
    ]  # fmt: skip
    # No gradient is expected only for: experts no token was routed to; the lightning indexer, whose output is a
    # discrete top-k selection (the official model has no gradient path through it either); and the ratio-128
    # compressor, which emits no entry for 24 tokens.
    unexpected = [
        n for n in no_grad if not (".experts." in n or ".indexer." in n or n.startswith("layers.2.attn.compressor"))
    ]
    assert not unexpected, unexpected
    assert not any(n.startswith(("layers.0.attn.", "layers.1.attn.wq", "layers.1.attn.compressor")) for n in no_grad)


def test_generate_greedy_starts_with_the_prefill_argmax(model, ids):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        first = model(ids).logits[:, -1].argmax(-1)
    assert out.shape == (2, 28)
    assert torch.equal(out[:, 24], first)


def test_text_generation_pipeline():
    from transformers_deepseek.tokenization import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    config = transformers.AutoConfig.from_pretrained(require_fixture("tiny-bf16") / "checkpoint")
    config.vocab_size = len(tokenizer)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    result = pipe("Hello", max_new_tokens=3, do_sample=False)
    assert result[0]["generated_text"].startswith("Hello")


@pytest.mark.parametrize(
    ("make_ids", "field"),
    [
        (lambda: torch.tensor([[1, 2, 1024]]), "input_ids"),
        (lambda: torch.tensor([[1, -3]]), "input_ids"),
        (lambda: torch.zeros(1, 0, dtype=torch.long), "input_ids"),
    ],
    ids=["id-beyond-vocab", "negative-id", "empty"],
)
def test_bad_input_ids_raise_naming_the_field(model, make_ids, field):
    with pytest.raises(ValueError, match=field):
        model(make_ids())


def test_inputs_embeds_on_hash_layers_needs_ids(model, ids):
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=model.embed(ids))


def _corrupt_copy(tmp_path, edit):
    """The tiny-bf16 checkpoint rewritten with ``edit(tensors)`` applied to every shard (index kept in sync)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = require_fixture("tiny-bf16") / "checkpoint"
    for f in src.glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        edit(tensors)
        save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
        for name in list(index["weight_map"]):
            if index["weight_map"][name] == shard and name not in tensors:
                del index["weight_map"][name]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


def test_checkpoint_missing_a_tensor_is_refused_by_name(tmp_path):
    path = _corrupt_copy(tmp_path, lambda t: t.pop("layers.1.attn.wkv.weight", None))
    with pytest.raises(ValueError, match=r"missing tensors: \['layers\.1\.attn\.wkv\.weight'\]"):
        AutoModelForCausalLM.from_pretrained(path)


def test_checkpoint_tensor_of_wrong_shape_is_refused_by_name(tmp_path):
    def shrink(t):
        if "layers.2.attn.wq_a.weight" in t:
            t["layers.2.attn.wq_a.weight"] = t["layers.2.attn.wq_a.weight"][:, :128].contiguous()

    path = _corrupt_copy(tmp_path, shrink)
    with pytest.raises(
        ValueError, match=r"layers\.2\.attn\.wq_a\.weight: checkpoint \(128, 128\) vs model \(128, 256\)"
    ):
        AutoModelForCausalLM.from_pretrained(path)


def test_bf16_checkpoint_load_save_is_byte_identical(tmp_path):
    """An unquantized model saves the released on-disk dtypes: the fp32-held RMSNorm weights, compressor projections
    and head go back to bf16, so load -> save reproduces every tensor of tiny-bf16 byte for byte."""
    from transformers_deepseek.parity import checkpoint_dir, load_golden

    golden = load_golden(require_fixture("tiny-bf16"))
    with checkpoint_dir(golden.root) as ckpt:
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        assert model.layers[0].attn_norm.weight.dtype == torch.float32  # held in fp32 (SPEC §4)
        model.save_pretrained(tmp_path)
        src, out = read_tensors(ckpt), read_tensors(tmp_path)
    assert src.keys() == out.keys()
    for k in src:
        assert same_bytes(src[k], out[k]), k
