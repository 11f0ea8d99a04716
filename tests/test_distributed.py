"""Multi-process CPU runs (torchrun, 2 processes, gloo) against one process (issue 8).

One torchrun launch (tests/distributed/worker.py) runs every scenario on the tiny bf16 checkpoint: a DDP training
step, an FSDP2 (``fully_shard``) training step, and a forward with the config's ``base_model_tp_plan`` applied by
``from_pretrained(tp_plan="auto")`` plus expert parallelism (``distribute_experts``). Each result must equal this
process's within 1e-5 relative.

The single-process reference of a training step is the same global batch with each rank's micro-batch run in turn
and the gradients accumulated (loss / world each): the computation data parallelism distributes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import transformers_deepseek  # noqa: F401  (registers the model)
from transformers_deepseek.parity import checkpoint_dir

WORKER_DIR = Path(__file__).resolve().parent / "distributed"
sys.path.insert(0, str(WORKER_DIR))
from dist_inputs import global_batch, micro_batch  # noqa: E402

WORLD = 2
RTOL = 1e-5

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(fixtures_dir, tmp_path_factory):
    """(results of the torchrun worker by scenario, single-process reference)."""
    out = tmp_path_factory.mktemp("distributed")
    with checkpoint_dir(fixtures_dir / "tiny-bf16") as ckpt:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
            str(WORKER_DIR / "worker.py"), str(ckpt), str(out),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        reference = _single_process(ckpt)
    results = {name: torch.load(out / f"{name}.pt") for name in ("ddp", "fsdp", "tp_ep")}
    return results, reference


def _single_process(ckpt: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        vocab = model.config.vocab_size
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=global_batch(vocab, WORLD)).logits
        model.train()
        loss = 0.0
        for rank in range(WORLD):
            ids = micro_batch(vocab, rank, WORLD)
            part = model(input_ids=ids, labels=ids).loss / WORLD
            part.backward()
            loss += part.item()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {
            "logits": logits,
            "loss": loss,
            "grads": grads,
            "wq_b_rows": model.layers[0].attn.wq_b.weight.shape[0],
            "experts": len(model.layers[0].ffn.experts),
        }
    finally:
        torch.set_num_threads(threads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def _check_step(result: dict, reference: dict, label: str) -> None:
    loss_err = abs(float(result["loss"]) - reference["loss"]) / abs(reference["loss"])
    names = result["grads"].keys() | reference["grads"].keys()
    # A parameter without a gradient on one side (an expert no token picked) must have a zero one on the other.
    errs = {}
    for n in names:
        ref = reference["grads"].get(n)
        got = result["grads"].get(n)
        ref = torch.zeros_like(got) if ref is None else ref
        got = torch.zeros_like(ref) if got is None else got
        assert got.shape == ref.shape, n
        errs[n] = _rel(got, ref)
    worst = max(errs, key=errs.get)
    print(
        f"\n{label}: loss {float(result['loss']):.6f} vs {reference['loss']:.6f} (rel {loss_err:.2e}); "
        f"{len(names)} gradients, max rel {errs[worst]:.2e} ({worst})"
    )
    assert loss_err <= RTOL
    assert len(reference["grads"]) > 100  # the step really reached the layers
    assert errs[worst] <= RTOL, worst


def test_ddp_training_step_matches_single_process(runs) -> None:
    results, reference = runs
    _check_step(results["ddp"], reference, "DDP")


def test_fsdp2_training_step_matches_single_process(runs) -> None:
    results, reference = runs
    _check_step(results["fsdp"], reference, "FSDP2")


def test_tensor_and_expert_parallel_forward_matches_single_process(runs) -> None:
    results, reference = runs
    tp = results["tp_ep"]
    # Each rank really held half of the sharded projections and half of the routed experts.
    assert tp["wq_b_local_rows"] == reference["wq_b_rows"] // WORLD
    assert tp["local_experts"] == reference["experts"] // WORLD
    err = _rel(tp["logits"], reference["logits"])
    diff = (tp["logits"] - reference["logits"]).abs().max()
    print(f"\nTP+EP logits {tuple(tp['logits'].shape)}: rel L2 {err:.2e}, max abs {diff:.2e}")
    assert err <= RTOL
