"""One torchrun worker running every multi-process scenario of tests/test_distributed.py on CPU / gloo.

Usage: ``torchrun --nproc-per-node 2 worker.py <checkpoint dir> <output dir>``. Rank 0 writes ``<scenario>.pt`` per
scenario into the output directory; the test compares them with a single-process run.

Scenarios:
- ``ddp``: DistributedDataParallel, one training step, each rank a different micro-batch.
- ``fsdp``: FSDP2 (``fully_shard`` on every decoder layer, then the root), one training step; full gradients gathered.
- ``tp_ep``: ``from_pretrained(tp_plan="auto")`` (the config's ``base_model_tp_plan``) plus
  ``distribute_experts()`` (expert parallelism), forward logits of the whole batch on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

import transformers_deepseek  # noqa: F401  (registers the model)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_inputs import global_batch, micro_batch  # noqa: E402


def load(ckpt: str, **kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _direct_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters(recurse=False)}


def _is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters(recurse=False))


def _touch_every_expert(moe: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """FSDP2 reduce-scatters the gradients a group's parameters received, so every rank must produce one for every
    expert, also those its tokens did not pick: each expert runs on an empty batch, adding an exact 0 to the output
    and a zero gradient to its weights."""
    empty = args[0].reshape(-1, args[0].shape[-1])[:0]
    return output + sum(expert(empty).sum() for expert in moe.experts)


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
    mesh = init_device_mesh("cpu", (world,))
    # Gradients are reduced in fp32 and cast once to the parameter dtype, as one process accumulating them would.
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    kw = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": False}
    # FSDP2 wants one dtype per parameter group and a layer mixes bf16 linears with fp32 norms / mixers /
    # compressors (SPEC §3-§4). Per decoder layer: the MoE (all bf16) is a group, the other bf16 linears of the layer
    # (each called exactly once per forward, so every rank issues the same collectives) a second one, and the
    # layer's fp32 rest a third; the embedding and the fp32 root (head, final norm, hc_head) close it.
    for block in [*model.layers, *model.mtp]:
        block.ffn.register_forward_hook(_touch_every_expert)
        fully_shard(block.ffn, **kw)
        bf16 = [m for m in block.modules() if _direct_dtypes(m) == {torch.bfloat16} and not _is_sharded(m)]
        fully_shard(bf16, **kw)
        fully_shard(block, **kw)
    fully_shard(model.embed, **kw)
    fully_shard(model, **kw)
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
