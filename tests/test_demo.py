"""The demo (`python -m transformers_deepseek.demo`): the vocabulary expansion is exact, the pipeline (train -> the
released FP8 layout -> cache -> Auto load -> chat with DeepseekV4Cache) runs, a second run uses the cache."""

from __future__ import annotations

import math

import torch

from publishing_helpers import SHORT_TRAINING, trained_demo_model
from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers_deepseek.demo import DEMO, TINY, _rare_offset_loss, expand_vocab, main
from transformers_deepseek.publishing import validate_checkpoint


def test_tiny_is_still_exported():  # examples/train_tiny_mtp.py imports it
    assert TINY["num_hidden_layers"] == 4 and DEMO["num_hidden_layers"] == 2


def test_expand_vocab_is_exact():
    torch.manual_seed(0)
    keep = [7, 3, 150, 42, 99]  # trained ids, in row order; row 5 is the rare class
    config = DeepseekV4Config(vocab_size=len(keep) + 1, bos_token_id=None, eos_token_id=None, **DEMO)
    small = DeepseekV4ForCausalLM(config)  # fp32, as trained (the fp32 model runs in training mode)
    full = expand_vocab(small, keep, 200).train()
    rows = torch.full((200,), len(keep))
    rows[keep] = torch.arange(len(keep))
    full_ids = torch.tensor([[7, 1, 150, 42, 8, 3, 199, 99, 7, 0, 3, 150]])
    with torch.no_grad():
        a = small(rows[full_ids]).logits  # [1, S, K + 1]
        b = full(full_ids).logits  # [1, S, 200]
    # Every id gets its trained row (rare ids: the rare row) of the embedding, head and hash routes, bit for bit...
    assert torch.equal(full.embed.weight, small.embed.weight[rows]) and torch.equal(
        full.head.weight, small.head.weight[rows]
    )
    assert torch.equal(full.layers[0].ffn.gate.tid2eid, small.layers[0].ffn.gate.tid2eid[rows])
    # ...so its logits are the trained ones (the only difference: fp32 GEMM rounding of a 200- vs 6-wide head).
    torch.testing.assert_close(b, a[..., rows], rtol=1e-6, atol=1e-6)
    # The training loss is the full model's cross-entropy: equal on kept targets, minus log(n_rare) on rare ones.
    n_rare = 200 - len(keep)
    targets = torch.tensor([[3, 150, 5, 99, 7, 42, 1, 7, 3, 150, 42, 0]])
    per_token = torch.nn.functional.cross_entropy(b.flatten(0, 1), targets.flatten(), reduction="none")
    is_rare = (rows[targets] == len(keep)).flatten().float()
    assert 0 < is_rare.sum() < is_rare.numel()
    trained = _rare_offset_loss(a, rows[targets], n_rare)
    torch.testing.assert_close(trained, (per_token - is_rare * math.log(n_rare)).mean(), rtol=1e-5, atol=1e-5)


def test_demo_pipeline_and_cached_run(capsys):
    path = trained_demo_model()
    report = validate_checkpoint(path)  # the released layout, FP8 + FP4 experts, full V4 vocabulary
    assert (report.dense_format, report.expert_format) == ("fp8", "fp4") and report.has_tokenizer
    assert report.config.vocab_size == 129280 and report.config.compress_ratios == [4, 128]
    args = ["--cache-dir", str(path.parent), "--max-new-tokens", "6", "--prompt", "Explain the json module."]
    args += [f"--{k}={v}" for k, v in SHORT_TRAINING.items()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/3] cached:" in out and "training the demo model" not in out  # no retraining
    assert "AutoModelForCausalLM -> DeepseekV4ForCausalLM" in out and "FP8 + FP4 experts" in out
    assert "'<｜begin▁of▁sentence｜><｜User｜>Explain the json module.<｜Assistant｜></think>'" in out
    cache_line = next(line for line in out.splitlines() if "DeepseekV4Cache:" in line)
    assert "L0 ratio 4" in cache_line and "L1 ratio 128" in cache_line and " 0.0 KiB" not in cache_line
