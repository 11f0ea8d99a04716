"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for DeepSeek-V4 models.

FSDP2 flattens each group's parameters into one buffer, so a group must hold a single dtype; a V4 decoder layer
mixes bf16 linears with the fp32 norms, hyper-connection mixers, compressor projections and attention sinks the
official model keeps in fp32 (SPEC §3-§4). :func:`shard_model` therefore shards per decoder layer (and MTP block):

1. the MoE (all bf16), with a hook that runs every expert on an empty batch, so that each rank produces a (zero)
   gradient for every expert whatever its tokens picked (FSDP2 reduce-scatters every parameter of a group, and
   the ranks must agree on the collectives);
2. the layer's other bf16 modules (each called once per forward);
3. the layer itself (its fp32 rest);

then the embedding and the root (fp32 head, final norm, ``hc_head``). With ``MixedPrecisionPolicy(reduce_dtype=
torch.float32)`` (the default here) gradients are reduced in fp32 and cast once, as one process accumulating them
would: ``tests/test_distributed.py`` checks loss and every gradient against a single-process step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _direct_dtypes(module: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters(recurse=False)}


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters(recurse=False))


def touch_every_expert(moe: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a MoE block: add each expert's output on an empty batch (an exact 0) so that every expert is
    part of the autograd graph on every rank and receives a gradient (zero for unpicked experts)."""
    empty = args[0].reshape(-1, args[0].shape[-1])[:0]
    return output + sum(expert(empty).sum() for expert in moe.experts if not isinstance(expert, nn.Identity))


def shard_model(model: nn.Module, mesh: Any = None, mp_policy: Any = None, **fully_shard_kwargs) -> nn.Module:
    """Apply FSDP2 to a :class:`DeepseekV4ForCausalLM` (or ``DeepseekV4Model``) in place and return it.

    ``mesh``: a 1-D ``DeviceMesh`` (default: every rank of the default process group on the model's device type).
    ``mp_policy``: default ``MixedPrecisionPolicy(reduce_dtype=torch.float32)``. Other keyword arguments
    (``reshard_after_forward``, ...) go to every ``fully_shard`` call.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    kw = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(reduce_dtype=torch.float32)}
    kw.update(fully_shard_kwargs)
    for block in [*model.layers, *getattr(model, "mtp", [])]:
        block.ffn.register_forward_hook(touch_every_expert)
        fully_shard(block.ffn, **kw)
        bf16 = [m for m in block.modules() if _direct_dtypes(m) == {torch.bfloat16} and not _is_sharded(m)]
        if bf16:
            fully_shard(bf16, **kw)
        fully_shard(block, **kw)
    fully_shard(model.embed, **kw)
    fully_shard(model, **kw)
    return model


__all__ = ["shard_model", "touch_every_expert"]
