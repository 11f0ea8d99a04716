"""Auxiliary-loss-free expert balancing (ExpertBalancingCallback) in the real Trainer, on a skewed token stream."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from helpers import require_fixture
from transformers_deepseek import DeepseekV4ForCausalLM
from transformers_deepseek.parity import checkpoint_dir

pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402

from transformers_deepseek.training import ExpertBalancingCallback, lora_config  # noqa: E402

STEPS = 8


class SkewedStream(Dataset):
    """Sequences drawn from 3 token ids 90 % of the time: their near-identical hidden states all pick the same few
    experts, the skew aux-loss-free balancing exists for."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        common = torch.tensor([11, 12, 13])
        ids = common[torch.randint(0, 3, (n, seq), generator=g)]
        rare = torch.rand(n, seq, generator=g) < 0.1
        self.ids = torch.where(rare, torch.randint(0, vocab, (n, seq), generator=g), ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(gamma: float, tmp_path) -> tuple[ExpertBalancingCallback, list[dict], DeepseekV4ForCausalLM, dict]:
    from transformers import Trainer, TrainingArguments

    with checkpoint_dir(require_fixture("tiny-bf16")) as ckpt:
        model = DeepseekV4ForCausalLM.from_pretrained(ckpt)
    model.config.use_cache = False
    initial = {
        i: layer.ffn.gate.bias.clone() for i, layer in enumerate(model.layers) if layer.ffn.gate.bias is not None
    }
    # A small adapter on the last layer only keeps the backward pass short; the routers see the whole forward.
    pm = get_peft_model(model, lora_config(r=2, target_modules=r"layers\.3\.attn\.wo_b"))
    callback = ExpertBalancingCallback(gamma=gamma)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"g{gamma}"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-4,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=STEPS // 2, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=pm, args=args, train_dataset=SkewedStream(64, 32, 1024), callbacks=[callback])
    trainer.train()
    return callback, trainer.state.log_history, model, initial


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("balancing")
    return {gamma: _train(gamma, tmp) for gamma in (0.0, 0.05)}


def test_bias_updates_reduce_the_max_over_mean_load(runs):
    observed, _, control, initial = runs[0.0]
    balanced, _, model, _ = runs[0.05]
    report, late, late_ref = [], [], []
    for layer in (1, 2, 3):  # score-routed layers
        before, after = observed.history[layer], balanced.history[layer]
        assert len(before) == len(after) == STEPS
        assert before[0] == after[0]  # same first step: the biases are still zero
        # Second half of the run (per-step ratios of 128 tokens are noisy: ~1.3 even when balanced).
        late.append(sum(after[STEPS // 2 :]) / (STEPS - STEPS // 2))
        late_ref.append(sum(before[STEPS // 2 :]) / (STEPS - STEPS // 2))
        report.append(f"layer {layer}: max/mean load step 1 {before[0]:.2f}; steps {STEPS // 2 + 1}-{STEPS}: "
                      f"{late[-1]:.2f} with gamma 0.05, {late_ref[-1]:.2f} with gamma 0")  # fmt: skip
        assert late[-1] < late_ref[-1], report[-1]
        moved = model.layers[layer].ffn.gate.bias - initial[layer]
        steps = moved / 0.05  # sign updates of size gamma, one per optimizer step
        assert moved.abs().max() > 0 and (steps - steps.round()).abs().max() < 1e-3 and steps.abs().max() <= STEPS
    print("\n" + "\n".join(report))
    print("per-step max/mean (gamma 0.05):", {k: [round(x, 2) for x in v] for k, v in balanced.history.items()})
    print("per-step max/mean (gamma 0):   ", {k: [round(x, 2) for x in v] for k, v in observed.history.items()})
    # The stream is skewed (1.0 = balanced, 4.0 = every token on the same 2 of 8 experts) and the update removes
    # most of the excess load.
    assert sum(observed.history[layer][0] for layer in (1, 2, 3)) / 3 >= 2.0
    assert sum(late) / 3 < 0.75 * sum(late_ref) / 3, report
    # Hash-routed layer 0 has no bias; it is observed only.
    assert model.layers[0].ffn.gate.bias is None and len(balanced.history[0]) == STEPS
    # gamma = 0 only observes.
    assert all(torch.equal(control.layers[i].ffn.gate.bias, b) for i, b in initial.items())


def test_loads_and_router_entropy_are_in_the_trainer_log_history(runs):
    _, history, _, _ = runs[0.05]
    logged = [r for r in history if "moe/max_mean_load" in r]
    assert len(logged) == 2 and all("loss" in r for r in logged)  # merged into the Trainer's own records
    for r in logged:
        for layer in range(4):
            assert r[f"moe/layer{layer}/max_mean_load"] >= 1.0
            assert 0 < r[f"moe/layer{layer}/router_entropy"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
    assert logged[-1]["moe/max_mean_load"] < logged[0]["moe/max_mean_load"]


def test_hooks_never_change_the_numerics_and_skip_eval_passes(runs):
    callback = ExpertBalancingCallback(gamma=0.05)
    _, _, model, _ = runs[0.05]
    ids = SkewedStream(2, 16, 1024, seed=1).ids
    model.eval()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        callback.attach(model)
        got = model(ids, use_cache=False).logits
    assert torch.equal(got, ref)
    assert callback.update_biases() == {}  # eval passes are not counted
    model.train()
    with torch.no_grad():
        model(ids, use_cache=False)
    ratios = callback.update_biases()
    assert set(ratios) == {0, 1, 2, 3}
    callback.detach()
    assert not any(g._forward_hooks for g in callback.gates.values())
    with pytest.raises(ValueError, match="gamma"):
        ExpertBalancingCallback(gamma=-1.0)
