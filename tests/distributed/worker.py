"""One torchrun worker running every multi-process scenario of tests/test_distributed.py on CPU / gloo.

Usage: ``torchrun --nproc-per-node 2 worker.py <checkpoint dir> <output dir>``. Rank 0 writes ``<scenario>.pt`` per
scenario into the output directory; the test compares them with a single-process run.

Scenarios:
- ``ddp``: DistributedDataParallel, one training step, each rank a different micro-batch.
- ``fsdp``: FSDP2 through ``transformers_deepseek.training.fsdp.shard_model``, one training step; full gradients
  gathered.
- ``tp_ep``: ``from_pretrained(tp_plan="auto")`` (the config's ``base_model_tp_plan``) plus
  ``distribute_experts()`` (expert parallelism), forward logits of the whole batch on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

import transformers_deepseek  # noqa: F401  (registers the model)
from transformers_deepseek.training.fsdp import shard_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_inputs import global_batch, micro_batch  # noqa: E402


def load(ckpt: str, **kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train_step(model: torch.nn.Module, wrapped: torch.nn.Module, rank: int, world: int) -> dict:
    ids = micro_batch(model.config.vocab_size, rank, world)
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": mean / world, "grads": grads}


def main() -> None:
    ckpt, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}

    model = load(ckpt)
    model.train()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # MTP and unrouted experts get no gradient
    results["ddp"] = train_step(model, ddp, rank, world)
    del ddp, model

    model = load(ckpt)
    model.train()
    # The package's FSDP2 recipe: one dtype per group, every expert touched, fp32 gradient reduction.
    shard_model(model, init_device_mesh("cpu", (world,)), reshard_after_forward=False)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    results["fsdp"] = train_step(model, model, rank, world)
    del model

    model = load(ckpt, tp_plan="auto")
    model.distribute_experts()
    sharded = model.layers[0].attn.wq_b.weight
    local = sharded.to_local() if isinstance(sharded, DTensor) else sharded
    experts = sum(not isinstance(e, torch.nn.Identity) for e in model.layers[0].ffn.experts)
    with torch.no_grad():
        logits = model(input_ids=global_batch(model.config.vocab_size, world)).logits
    results["tp_ep"] = {"logits": logits, "wq_b_local_rows": local.shape[0], "local_experts": experts}

    if rank == 0:
        for name, value in results.items():
            torch.save(value, out / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
