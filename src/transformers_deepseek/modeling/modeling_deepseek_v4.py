"""DeepSeek-V4 for transformers, computing what the official ``inference/model.py`` computes (SPEC §4-§7).

Module attribute paths are the released tensor names (``layers.3.attn.wq_a.weight``, ``hc_head_fn``,
``mtp.0.e_proj.weight``, ...), so a released checkpoint loads with no renaming and ``save_pretrained`` writes the
released layout. Dtypes follow the official model: bf16 linears (or quantized modules swapped in by the quantizer),
fp32 norms / hyper-connection mixers / compressor projections / attention sinks / head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from . import kernels
from .cache_deepseek_v4 import (
    ChunkView,
    DeepseekV4Cache,
    DeepseekV4CacheLayer,
    Store,
    _take,
    pack_index_keys,
    pack_kv,
    unpack_index_keys,
    unpack_kv,
)
from .configuration_deepseek_v4 import DeepseekV4Config
from .numerics import (
    apply_rope,
    fp4_simulate,
    fp8_simulate,
    hadamard_rotate,
    linear,
    pointwise,
    rope_cis,
    row_bucket,
    rsqrt,
    topk_indices,
    yarn_inv_freq,
)

# Official kernel constants (SPEC §5-§6).
KV_FP8_BLOCK = 64
INDEXER_FP4_BLOCK = 32
ATTN_INDEX_BLOCK = 64  # sparse_attn walks the index list in blocks of 64 with an online softmax
_QUERY_CHUNK_ELEMS = 1 << 22  # bound on gathered-KV elements materialised per attention / indexer chunk
_INDEX_KEY_SLICE = 8192  # indexer keys decoded and scored about this many at a time (2 MiB of bf16)
_SINKHORN_NUMPY_TOKENS = 16  # Sinkhorn iterations of at most this many tokens run in numpy (see sinkhorn_split)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------
class DeepseekV4RMSNorm(nn.Module):
    """RMSNorm in fp32 with an fp32 weight, cast back to the input dtype (SPEC §4)."""

    def __init__(self, dim: int, eps: float, batch_invariant: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.batch_invariant = batch_invariant
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * rsqrt(x.square().mean(-1, keepdim=True) + self.eps, self.batch_invariant)
        return (self.weight * x).to(dtype)


def _linear(in_features: int, out_features: int, dtype: torch.dtype | None = None) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False, dtype=dtype)


class DeepseekV4GroupedLinear(nn.Linear):
    """The grouped output projection ``wo_a`` (SPEC §4): ``weight [groups * rank, in_per_group]`` as released; group
    ``g`` of the input ``[B, S, groups, in_per_group]`` goes through rows ``g * rank .. (g + 1) * rank`` of the
    weight, giving ``[B, S, groups, rank]`` (a bf16 einsum in the activation dtype, no activation quantization).

    A module of its own (rather than an einsum on ``weight`` inside the attention) so that adapters such as LoRA can
    wrap it like any linear: ``weight + B @ A`` keeps its meaning, group ``g`` reading rows ``g * rank ..`` of ``B``.
    """

    def __init__(
        self, in_features: int, out_features: int, groups: int, device=None, dtype: torch.dtype | None = None
    ) -> None:
        if out_features % groups:
            raise ValueError(f"wo_a: out_features={out_features} is not a multiple of o_groups={groups}")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] != self.groups or x.shape[3] != self.in_features:
            raise ValueError(
                f"wo_a: expected input [batch, seq, {self.groups}, {self.in_features}], got {list(x.shape)}"
            )
        weight = self.weight.view(self.groups, self.out_features // self.groups, -1).to(x.dtype)
        return torch.einsum("bsgd,grd->bsgr", x, weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"


def sinkhorn_split(
    mixes: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc: int,
    iters: int,
    eps: float,
    batch_invariant: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hc_split_sinkhorn`` (SPEC §6): mixes ``[B,S,(2+hc)hc]`` fp32 -> pre ``[B,S,hc]``, post ``[B,S,hc]``,
    comb ``[B,S,hc,hc]``."""
    # pre and post gates in one sigmoid call (elementwise: the same values as two calls)
    gates = mixes[..., : 2 * hc] * scale[:2].repeat_interleave(hc) + base[: 2 * hc]
    gates = pointwise(torch.sigmoid, gates, batch_invariant)
    pre, post = gates[..., :hc] + eps, 2 * gates[..., hc:]
    comb = mixes[..., 2 * hc :].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc :].view(hc, hc)
    # Kernel softmax spelled out (exp(x - max) / sum): torch.softmax rounds differently in the last fp32 bit, which
    # flips bf16 roundings of the streams downstream; this form reproduces the official streams bit for bit.
    comb = pointwise(torch.exp, comb - comb.amax(-1, keepdim=True), batch_invariant)
    if kernels.sinkhorn_normalize(comb, iters, eps):  # comb is fresh: in place (not in an autograd graph)
        return pre, post, comb
    comb = comb / comb.sum(-1, keepdim=True) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    if comb.requires_grad:
        for _ in range(iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + eps)
            comb = comb / (comb.sum(-2, keepdim=True) + eps)
    elif comb.device.type == "cpu" and comb.shape[:-2].numel() <= _SINKHORN_NUMPY_TOKENS:
        # A decode step runs this loop 2 * iters times per layer on hc*hc values, where the cost is per call: numpy
        # calls cost a third of torch's. Same float32 arithmetic in the same order (a sum of hc values adds them
        # left to right in both; tests/test_batch_invariance.py checks it against the torch loop bit for bit).
        c, e = comb.numpy(), numpy.float32(eps)  # comb is a fresh tensor: updated in place
        for _ in range(iters - 1):
            c /= c.sum(-1, keepdims=True) + e
            c /= c.sum(-2, keepdims=True) + e
    else:
        for _ in range(iters - 1):
            comb.div_(comb.sum(-1, keepdim=True).add_(eps))
            comb.div_(comb.sum(-2, keepdim=True).add_(eps))
    return pre, post, comb


def hc_mix_logits(x: torch.Tensor, fn: torch.Tensor, eps: float, batch_invariant: bool = True) -> torch.Tensor:
    """Mixing logits of the flattened streams: ``F.linear(x, fn) * rsqrt(mean(x^2) + eps)`` in fp32 (SPEC §4)."""
    scale = rsqrt(x.square().mean(-1, keepdim=True) + eps, batch_invariant)
    return linear(x, fn, batch_invariant) * scale


# ---------------------------------------------------------------------------------------------------------------
# Attention pieces
# ---------------------------------------------------------------------------------------------------------------
def window_positions(positions: torch.Tensor, window: int, full_width: bool = False) -> torch.Tensor:
    """Absolute key positions of each query's sliding window, oldest first, ``-1`` padded: ``[B, S, w]``.

    Official order (SPEC §4): ``max(0, t-win+1) .. t`` then ``-1`` for rows shorter than the window. ``w`` is the
    window, or with ``full_width=False`` only as much of it as the chunk's last position can fill.
    """
    width = window if full_width else max(1, min(window, int(positions.max().item()) + 1))
    first = (positions - window + 1).clamp(min=0).unsqueeze(-1)
    keys = first + torch.arange(width, device=positions.device)
    return torch.where((keys > positions.unsqueeze(-1)) | (positions.unsqueeze(-1) < 0), -1, keys)


Fill = Callable[[torch.Tensor, torch.Tensor], None]  # (indices [B, s, k], out fp32 [B, s, k, D]) -> keys into out
KeySource = tuple[Fill, torch.Tensor]


def dense_source(keys: torch.Tensor, indices: torch.Tensor) -> KeySource:
    """A key source over a dense ``[B, N, D]`` tensor: ``indices [B, S, k]`` into it (``-1`` = empty)."""
    bsz, n, dim = keys.shape
    flat = keys.reshape(-1, dim)
    base = (torch.arange(bsz, device=keys.device) * n).view(bsz, 1, 1)

    def fill(idx: torch.Tensor, out: torch.Tensor) -> None:  # row copies (index_select), not an element-wise index
        out.copy_(flat.index_select(0, (idx.clamp(min=0) + base).flatten()).view(*idx.shape, dim))

    return fill, indices


def sparse_attention(
    q: torch.Tensor, sink: torch.Tensor, scale: float, sources: list[KeySource], batch_invariant: bool = True
) -> torch.Tensor:
    """The official ``sparse_attn`` (SPEC §6) as a gather over index lists.

    q ``[B,S,H,D]`` bf16; ``sources`` are ``(fill, indices [B,S,k])`` pairs whose gathered keys (K = V, bf16
    values, ``[B,s,k,D]``) are concatenated in order (window first, then compressed entries, as the official index
    list); ``-1`` marks an empty slot. Logits in fp32; an online softmax over blocks of 64 indices whose
    probabilities are rounded to bf16 for P.V (fp32 accumulation) while the denominator keeps fp32 P; the sink
    ``[H]`` joins the denominator only. Output bf16. ``batch_invariant``: every block is a full 64 slots, empty ones
    masked, as in the kernel, so that a query's blocks are the same whatever the other queries of the call need.
    """
    exp = lambda t: pointwise(torch.exp, t, batch_invariant)  # noqa: E731
    bsz, seqlen, heads, dim = q.shape
    k_total = sum(idx.shape[-1] for _, idx in sources)
    chunk = max(1, _QUERY_CHUNK_ELEMS // max(1, bsz * k_total * dim))
    width = k_total + (-k_total % ATTN_INDEX_BLOCK if batch_invariant else 0)
    out = q.new_empty(bsz, seqlen, heads, dim)
    # Without autograd (which saves each chunk's keys) one key buffer serves every query chunk. Fresh buffers per
    # chunk fragment glibc's heap: the output rows of one chunk land in the hole the last buffer left, the next buffer
    # no longer fits there and takes new pages (a 128K prefill's RSS grew by gigabytes that way).
    rows = min(chunk, seqlen)
    fresh_per_chunk = torch.is_grad_enabled()
    for s0 in range(0, seqlen, chunk):
        s1 = min(seqlen, s0 + chunk)
        n = s1 - s0
        if s0 == 0 or fresh_per_chunk:
            key_buf = q.new_empty(bsz * rows * width * dim, dtype=torch.float32)
            valid_buf = torch.empty(bsz * rows * width, dtype=torch.bool, device=q.device)
        # One fp32 buffer filled source by source (a single upcasting copy); empty slots are zero keys, masked.
        gathered = key_buf[: bsz * n * width * dim].view(bsz, n, width, dim)  # [B, s, K, D]
        valid = valid_buf[: bsz * n * width].view(bsz, n, width)
        k0 = 0
        for fill, idx in sources:
            part = idx[:, s0:s1]
            fill(part, gathered[:, :, k0 : k0 + part.shape[-1]])
            valid[:, :, k0 : k0 + part.shape[-1]] = part >= 0
            k0 += part.shape[-1]
        gathered[:, :, k_total:] = 0.0
        valid[:, :, k_total:] = False
        logits = torch.einsum("bshd,bskd->bshk", q[:, s0:s1].float(), gathered) * scale
        logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
        softmax = _blockwise_softmax_pv if batch_invariant else _online_softmax_pv
        acc, denom, running_max = softmax(logits, gathered, exp)
        denom = denom + exp(sink.float().view(1, 1, heads) - running_max)
        out[:, s0:s1] = acc / denom.unsqueeze(-1)  # rounded to bf16 on the copy
    return out


def _online_softmax_pv(logits: torch.Tensor, values: torch.Tensor, exp: Callable) -> tuple[torch.Tensor, ...]:
    """The kernel's online softmax, one 64-slot block after the other: ``(acc [B,s,H,D], denom, running max)``.

    ``logits [B,s,H,K]`` fp32 (-inf = empty), ``values [B,s,K,D]`` fp32; the last block may be partial."""
    running_max = acc = denom = None
    for k0 in range(0, logits.shape[-1], ATTN_INDEX_BLOCK):
        block = logits[..., k0 : k0 + ATTN_INDEX_BLOCK]
        block_max = block.amax(-1)
        new_max = block_max if running_max is None else torch.maximum(running_max, block_max)
        p = exp(block - new_max.unsqueeze(-1))
        pv = torch.einsum("bshk,bskd->bshd", p.to(torch.bfloat16).float(), values[:, :, k0 : k0 + ATTN_INDEX_BLOCK])
        if running_max is None:
            acc, denom = pv, p.sum(-1)
        else:
            alpha = exp(running_max - new_max)
            acc = acc * alpha.unsqueeze(-1) + pv
            denom = denom * alpha + p.sum(-1)
        running_max = new_max
    return acc, denom, running_max


def _blockwise_softmax_pv(logits: torch.Tensor, values: torch.Tensor, exp: Callable) -> tuple[torch.Tensor, ...]:
    """:func:`_online_softmax_pv` with every block's max, probabilities, row sums and P.V computed at once.

    Only the rescale-and-add recurrence stays sequential. Same values as block by block (the running max is a
    cumulative max; each block's P.V is its own [H,64]x[64,D] product in one batched GEMM), which needs
    offset-independent ``exp`` and whole blocks: batch-invariant mode, where ``K`` is a multiple of 64."""
    bsz, seqlen, heads, width = logits.shape
    nb = width // ATTN_INDEX_BLOCK
    blocks = logits.view(bsz, seqlen, heads, nb, ATTN_INDEX_BLOCK).transpose(2, 3)  # [B,s,nb,H,64]
    running = blocks.amax(-1).cummax(2).values  # [B,s,nb,H]: the running max after each block
    p = exp(blocks - running.unsqueeze(-1))
    pv = torch.matmul(p.to(torch.bfloat16).float(), values.view(bsz, seqlen, nb, ATTN_INDEX_BLOCK, -1))
    psum = p.sum(-1)
    acc, denom = pv[:, :, 0], psum[:, :, 0]
    if nb > 1:
        alpha = exp(running[:, :, :-1] - running[:, :, 1:])
        fused = kernels.softmax_blocks(pv, psum, alpha)  # the loop below in one compiled call (same bits)
        if fused is not None:
            return *fused, running[:, :, -1]
        # views of every block taken once (a decode step walks ~10 blocks per layer)
        alphas, columns = alpha.unbind(2), alpha.unsqueeze(-1).unbind(2)
        blocks = zip(alphas, columns, pv[:, :, 1:].unbind(2), psum[:, :, 1:].unbind(2), strict=True)
        for a, a_col, pv_b, psum_b in blocks:
            acc = acc * a_col + pv_b
            denom = denom * a + psum_b
    return acc, denom, running[:, :, -1]


@dataclass
class ChunkState:
    """What one forward chunk needs to know about the sequence so far (shared by every layer)."""

    positions: torch.Tensor  # [B, S] absolute positions, -1 at padding
    old_len: torch.Tensor  # [B] tokens before the chunk
    new_len: torch.Tensor  # [B] tokens after the chunk
    dense: bool | None = None  # no padding in the chunk (worked out from `positions` when not given)
    rope: dict = field(default_factory=dict)  # RoPE rotations of `positions` per frequency set, shared by layers

    def __post_init__(self) -> None:
        if self.dense is None:
            self.dense = bool((self.positions >= 0).all())

    @classmethod
    def prefill(cls, positions: torch.Tensor) -> ChunkState:
        """A chunk that starts the sequence: ``positions [B, S]`` are ``0 .. S-1`` (``-1`` at padding)."""
        zeros = positions.new_zeros(positions.shape[0])
        return cls(positions, zeros, (positions >= 0).sum(1))


@dataclass
class CompressorRows:
    """The raw rows a layer's compressors pool (the attention's and the indexer's read the same ones): the cached rows
    of unfinished blocks, then the chunk's, ``[B, prev + S, dim]`` in the input dtype, and their :class:`ChunkView`.

    Rows are kept unprojected: a compressor projects a block's rows when the block completes (one decode step in
    ``ratio``) instead of one row per step."""

    rows: torch.Tensor
    view: ChunkView

    @classmethod
    def of(cls, x: torch.Tensor, chunk: ChunkState, cache: DeepseekV4CacheLayer | None) -> CompressorRows:
        """The rows of chunk ``x [B, S, dim]`` after the cached ones; updates the cache's buffer of recent rows."""
        rows, view = _after_cached_rows({"x": x}, chunk, cache, "rows")
        return cls(rows["x"], view)


def _after_cached_rows(
    rows: Store, chunk: ChunkState, cache: DeepseekV4CacheLayer | None, name: str
) -> tuple[Store, ChunkView]:
    """A chunk's compressor rows ``[B, S, ...]`` after those the cache keeps under ``name``, and their
    :class:`ChunkView`; the cache then keeps the last ``tail_cap`` of them."""
    tail = cache.tail(name) if cache is not None else None
    prev = 0 if tail is None else next(iter(tail.values())).shape[1]
    view = ChunkView(chunk.positions, chunk.old_len, prev, chunk.dense)
    if tail is not None:
        rows = {k: torch.cat([tail[k], v], dim=1) for k, v in rows.items()}
    if cache is not None:
        keep = min(cache.tail_cap, prev + chunk.positions.shape[1])
        cache.set_tail(name, view.keep_last(rows, chunk.new_len, keep))
    return rows, view


class DeepseekV4Compressor(nn.Module):
    """Gated pooling of every ``ratio`` consecutive positions into one KV entry (SPEC §4).

    Ratio 4 overlaps: entry i pools the first-half channels of block i-1 and the second-half channels of block i.
    Projections, softmax and pooling run in fp32; the pooled entry is cast to bf16, normalised, rotated at the
    position of its block's first token, then FP8-simulated (main compressor) or Hadamard-rotated and
    FP4-simulated (indexer compressor). Blocks are pooled as soon as their last position arrives, from the raw rows
    of the chunk and of the cache (the unfinished block and, for overlap, the previous block).
    """

    def __init__(self, config: DeepseekV4Config, ratio: int, head_dim: int, rotate: bool) -> None:
        super().__init__()
        self.ratio = ratio
        self.head_dim = head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.overlap = ratio == 4
        self.rotate = rotate
        self.batch_invariant = config.batch_invariant
        width = (2 if self.overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.wkv = _linear(config.hidden_size, width, dtype=torch.float32)
        self.wgate = _linear(config.hidden_size, width, dtype=torch.float32)
        self.norm = DeepseekV4RMSNorm(head_dim, config.rms_norm_eps, config.batch_invariant)

    def forward(
        self,
        x: torch.Tensor,
        chunk: ChunkState,
        inv_freq: torch.Tensor,
        cache: DeepseekV4CacheLayer | None = None,
        name: str = "kv",
        src: CompressorRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entries completed by chunk ``x [B, S, dim]``: ``(entries [B, nb, d] bf16, first entry index [B], count
        [B])``.

        With ``src`` (:meth:`CompressorRows.of`, batch-invariant kernels) the blocks are pooled from its raw rows,
        projected when their block completes. Without it each chunk's rows are projected as they arrive, as the
        official code does (its one-row decode GEMMs round as ours do with ``batch_invariant=False``), and the
        cache layer keeps the projections under ``name``."""
        ratio, d = self.ratio, self.head_dim
        if src is None:
            rows, view = _after_cached_rows(self._project(x), chunk, cache, name)
        else:
            view = src.view
        first, count = chunk.old_len // ratio, chunk.new_len // ratio - chunk.old_len // ratio
        nb = int(count.max())
        if nb == 0:  # most decode steps: no block completes
            return x.new_zeros(x.shape[0], 0, d), first, count
        blocks = first.unsqueeze(1) + torch.arange(nb, device=first.device)  # [B, nb]
        span = 2 * ratio if self.overlap else ratio
        pos = (blocks * ratio - (ratio if self.overlap else 0)).unsqueeze(-1) + torch.arange(span, device=first.device)
        slots = view.slot(pos)  # [B, nb, span]; -1 = before position 0 (no previous block)
        missing = slots < 0
        lo = 0
        if src is not None:
            # Project the rows from the first one a block reads (a decode step: the `span` rows of its block). A row's
            # fp32 projection does not depend on the rows computed with it (batch-invariant GEMM): the values are
            # those of projecting every row as it arrives.
            lo = int(slots.masked_fill(missing, src.rows.shape[1]).min())
            rows = self._project(src.rows[:, lo:])
        g = _take(rows, slots - lo)  # missing slots are clamped: masked below
        kv = g["kv"].masked_fill(missing.unsqueeze(-1), 0.0)
        score = (g["score"] + self.ape[pos.clamp(min=0) % ratio]).masked_fill(missing.unsqueeze(-1), float("-inf"))
        if self.overlap:  # previous block's first-half channels, then this block's second-half channels
            kv = torch.cat([kv[:, :, :ratio, :d], kv[:, :, ratio:, d:]], dim=2)
            score = torch.cat([score[:, :, :ratio, :d], score[:, :, ratio:, d:]], dim=2)
        pooled = (kv * score.softmax(dim=2)).sum(dim=2)  # [B, nb, d] fp32
        # Rows of a padded batch complete fewer blocks: their surplus slots (all -inf scores) are zeroed, not NaN.
        pooled = pooled.masked_fill((torch.arange(nb, device=first.device) >= count.unsqueeze(1)).unsqueeze(-1), 0.0)
        return self.finish(pooled.to(x.dtype), blocks * ratio, inv_freq), first, count

    def _project(self, x: torch.Tensor) -> Store:
        """KV and gate-score rows ``[B, T, w]`` fp32 of input rows ``x [B, T, dim]`` (the position bias ``ape`` is
        added to the gathered scores)."""
        xf = x.float()
        return {
            "kv": linear(xf, self.wkv.weight.float(), self.batch_invariant),
            "score": linear(xf, self.wgate.weight.float(), self.batch_invariant),
        }

    def finish(self, pooled: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Norm, RoPE at ``positions [B, n]`` and the low-precision simulation of pooled bf16 entries ``[B, n, d]``."""
        kv = self.norm(pooled)
        rd = self.rope_dim
        rope = apply_rope(kv[..., -rd:], rope_cis(inv_freq, positions, self.batch_invariant))
        if self.rotate:
            kv = torch.cat([kv[..., :-rd], rope], dim=-1)
            return fp4_simulate(hadamard_rotate(kv, self.batch_invariant), INDEXER_FP4_BLOCK)
        return torch.cat([fp8_simulate(kv[..., :-rd], KV_FP8_BLOCK), rope], dim=-1)


def _entries(
    new: torch.Tensor,
    first: torch.Tensor,
    count: torch.Tensor,
    cache: DeepseekV4CacheLayer | None,
    name: str,
    pack: Callable[[torch.Tensor], Store],
    unpack: Callable[..., torch.Tensor],
) -> Fill:
    """Store this chunk's new entries (with a cache) and return a gather over every entry of the sequence.

    ``unpack(store, out=None)`` decodes packed entries (into ``out`` when given)."""
    if cache is None:  # no history: the chunk's entries are all there is (bf16, differentiable)
        return dense_source(new, first.new_zeros(1, 1, 1))[0]
    cache.write_entries(name, new, pack, first, count)
    if name not in cache.entries:  # no entry complete yet: every index list is empty
        return dense_source(new, first.new_zeros(1, 1, 1))[0]
    store = cache.entries[name]
    dense_fill: Fill | None = None

    def fill(idx: torch.Tensor, out: torch.Tensor) -> None:
        nonlocal dense_fill
        # A query chunk that gathers more entries than are stored (prefill: S*k >> n) decodes every stored entry
        # once instead of each gathered copy; decoding is elementwise, so the values are identical either way.
        if dense_fill is None and idx[0].numel() >= store["q"].shape[1]:
            complete = max(1, int((first + count).max()))  # entries that exist (the rest is spare capacity)
            dense_fill = dense_source(unpack({k: v[:, :complete] for k, v in store.items()}), idx)[0]
        if dense_fill is not None:
            dense_fill(idx, out)
        else:
            unpack(cache.read_entries(name, idx), out=out)

    return fill


class DeepseekV4Indexer(nn.Module):
    """Lightning indexer of ratio-4 layers: picks the top-k compressed entries per query (SPEC §4, §5.6-5.8)."""

    def __init__(self, config: DeepseekV4Config, ratio: int) -> None:
        super().__init__()
        self.heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.topk = config.index_topk
        self.ratio = ratio
        self.batch_invariant = config.batch_invariant
        self.wq_b = _linear(config.q_lora_rank, self.heads * self.head_dim)
        self.weights_proj = _linear(config.hidden_size, self.heads)
        self.compressor = DeepseekV4Compressor(config, ratio, self.head_dim, rotate=True)
        self.weight_scale = self.head_dim**-0.5 * self.heads**-0.5

    def queries(self, qr: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        q = self.wq_b(qr).unflatten(-1, (self.heads, self.head_dim))  # [B, S, H, d]
        rd = self.rope_dim
        q = torch.cat([q[..., :-rd], apply_rope(q[..., -rd:], cis)], dim=-1)
        return fp4_simulate(hadamard_rotate(q, self.batch_invariant), INDEXER_FP4_BLOCK)

    def forward(
        self,
        x: torch.Tensor,
        qr: torch.Tensor,
        chunk: ChunkState,
        cis: torch.Tensor,
        inv_freq: torch.Tensor,
        cache: DeepseekV4CacheLayer | None = None,
        src: CompressorRows | None = None,
    ) -> torch.Tensor:
        """Top-k compressed-entry ids per query ``[B, S, min(topk, n)]``, ``-1`` where the query cannot see the
        entry yet (SPEC §4 Indexer); ``n`` = complete entries of the longest row. ``src``: the raw rows the layer's
        compressors share (see :meth:`DeepseekV4Compressor.forward`)."""
        new, first, count = self.compressor(x, chunk, inv_freq, cache, "index", src)
        n = int((chunk.new_len // self.ratio).max())
        keys = lambda a, b: new[:, a:b]  # noqa: E731  (no cache: this chunk's entries are all there is)
        if cache is not None:
            cache.write_entries("index", new, pack_index_keys, first, count)
            if n:  # stored keys, decoded a slice at a time inside select (a decode step's slices into one buffer)
                store = cache.entries["index"]

                def keys(a: int, b: int) -> torch.Tensor:
                    part = {k: v[:, a:b] for k, v in store.items()}
                    if b - a > 2 * _INDEX_KEY_SLICE:  # all of a prefill's keys at once: no lasting buffer that big
                        return unpack_index_keys(part)
                    shape = part["q"].shape
                    return unpack_index_keys(part, cache.scratch_buffer("index_keys", shape, torch.int32, x.device))

        return self.select(x, self.queries(qr, cis), keys, chunk.positions, n)

    def select(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        keys: Callable[[int, int], torch.Tensor],
        positions: torch.Tensor,
        n_entries: int,
    ) -> torch.Tensor:
        """Top-k over the first ``n_entries`` keys per query; ``-1`` for entries the query cannot see yet.
        ``keys(a, b)`` gives keys ``a .. b-1`` as bf16 ``[B, b - a, d]``.

        Scores are a bf16 einsum of the FP4-simulated queries with the FP4-simulated keys, ReLU, weighted by
        ``weights_proj(x) * d^-0.5 * H^-0.5`` and summed over heads, all in bf16 as the official code does.
        """
        bsz, seqlen = positions.shape
        n = n_entries
        k = min(self.topk, n)
        if k == 0:
            return positions.new_full((bsz, seqlen, 0), -1)
        weights = self.weights_proj(x) * self.weight_scale  # [B, S, H] bf16
        chunk = max(1, _QUERY_CHUNK_ELEMS // max(1, bsz * self.heads * n))
        if seqlen > chunk:  # several query chunks (a prefill): get the keys once, not once per query chunk
            every_key = keys(0, n)
            keys = lambda a, b: every_key[:, a:b]  # noqa: E731
        # Compiled kernels: each slice's scores go straight to the top-k keys (kernels.index_score_keys)
        fused = self.batch_invariant and q.dtype == torch.bfloat16 and n <= 1 << 16 and not q.requires_grad
        fused = fused and kernels.available()
        # equal slices of about _INDEX_KEY_SLICE keys (no short last slice paying a slice's fixed cost)
        key_slice = -(-n // max(1, round(n / _INDEX_KEY_SLICE)))
        out = positions.new_empty(bsz, seqlen, k)  # written in place: see sparse_attention on heap holes
        order = torch.empty(bsz, min(chunk, seqlen), n, dtype=torch.int32, device=x.device) if fused else None
        for s0 in range(0, seqlen, chunk):
            # [B, s, H, d] x keys [B, n, d] -> [B, s, H, n] in the official layout: the sum over heads runs over a
            # strided dim, one head after the other. The keys enter bmm as a transposed view (no copy; matmul would
            # copy them), a slice at a time, each scored while it is in cache.
            qc = q[:, s0 : s0 + chunk]
            qf, w = qc.flatten(1, 2), weights[:, s0 : s0 + chunk].unsqueeze(-1)
            visible = (positions[:, s0 : s0 + chunk] + 1) // self.ratio  # entries i < visible are complete
            parts = []
            order_c = order[:, : qc.shape[1]] if order is not None else None
            for k0 in range(0, n, key_slice):
                k1 = min(n, k0 + key_slice)
                part = torch.bmm(qf, keys(k0, k1).transpose(1, 2)).unflatten(1, qc.shape[1:3])  # [B, s, H, slice]
                if order_c is None:
                    parts.append((part.relu_() * w).sum(dim=2))  # [B, s, slice] bf16
                elif not kernels.index_score_keys(part, w[..., 0], visible, k0, order_c[..., k0:k1]):
                    raise RuntimeError("index_score_keys refused the indexer scores")  # `fused` checks what it needs
            if order_c is not None:
                top = order_c.topk(k, dim=-1).indices
            else:
                score = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
                hidden = torch.arange(n, device=x.device) >= visible.unsqueeze(-1)
                top = topk_indices(score.masked_fill(hidden, float("-inf")), k, self.batch_invariant)
            out[:, s0 : s0 + chunk] = torch.where(top >= visible.unsqueeze(-1), -1, top)
        return out


class DeepseekV4Attention(nn.Module):
    """MQA with one shared K=V head, sliding window, optional compressed entries, attention sink (SPEC §4)."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.window = config.sliding_window
        self.groups = config.o_groups
        self.o_lora_rank = config.o_lora_rank
        self.eps = config.rms_norm_eps
        self.batch_invariant = config.batch_invariant
        self.ratio = config.layer_compress_ratio(layer_idx)
        self.scale = self.head_dim**-0.5
        dim = config.hidden_size
        self.attn_sink = nn.Parameter(torch.zeros(self.heads, dtype=torch.float32))
        self.wq_a = _linear(dim, config.q_lora_rank)
        self.q_norm = DeepseekV4RMSNorm(config.q_lora_rank, self.eps, self.batch_invariant)
        self.wq_b = _linear(config.q_lora_rank, self.heads * self.head_dim)
        self.wkv = _linear(dim, self.head_dim)
        self.kv_norm = DeepseekV4RMSNorm(self.head_dim, self.eps, self.batch_invariant)
        self.wo_a = DeepseekV4GroupedLinear(
            self.heads * self.head_dim // self.groups, self.groups * self.o_lora_rank, self.groups
        )
        self.wo_b = _linear(self.groups * self.o_lora_rank, dim)
        if self.ratio:
            self.compressor = DeepseekV4Compressor(config, self.ratio, self.head_dim, rotate=False)
            self.indexer = DeepseekV4Indexer(config, self.ratio) if self.ratio == 4 else None
        else:
            self.compressor = None
            self.indexer = None
        # Compressed layers: compress_rope_theta with YaRN; sliding-window layers: rope_theta, no YaRN (SPEC §4).
        # Computed on first use per device (rd/2 values), not held in a buffer that meta-device loading leaves empty.
        self.rope_base = config.compress_rope_theta if self.ratio else config.rope_theta
        self.yarn = config.yarn if self.ratio else None

    @property
    def inv_freq(self) -> torch.Tensor:
        device = self.attn_sink.device
        cached = self.__dict__.get("_inv_freq")
        if cached is None or cached.device != device:
            with torch.inference_mode(False):  # usable by later training forwards too
                cached = yarn_inv_freq(self.rope_dim, self.rope_base, self.yarn).to(device)
            self.__dict__["_inv_freq"] = cached
        return cached

    def window_kv(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """Per-position KV ``[B,S,head_dim]``: kv_norm(wkv(x)), RoPE on the last dims, FP8 round trip of the
        nope dims after norm and RoPE (SPEC §5.4)."""
        rd = self.rope_dim
        kv = self.kv_norm(self.wkv(x))
        return torch.cat([fp8_simulate(kv[..., :-rd], KV_FP8_BLOCK), apply_rope(kv[..., -rd:], cis)], dim=-1)

    def forward(self, x: torch.Tensor, chunk: ChunkState, cache: DeepseekV4CacheLayer | None = None) -> torch.Tensor:
        """``x [B,S,dim]`` (normed, bf16) of a chunk (see :class:`ChunkState`); ``cache`` holds earlier chunks."""
        bsz, seqlen, _ = x.shape
        rd = self.rope_dim
        positions = chunk.positions
        inv_freq = self.inv_freq
        key = (self.rope_base, self.yarn is not None)  # the two frequency sets of a model (SPEC §4)
        cis = chunk.rope.get(key)
        if cis is None:
            cis = chunk.rope[key] = rope_cis(inv_freq, positions.clamp(min=0), self.batch_invariant)  # [B, S, rd/2]

        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.heads, self.head_dim))
        # bf16 arithmetic, no weight (SPEC §7)
        q = q * pointwise(torch.rsqrt, q.square().mean(-1, keepdim=True) + self.eps, self.batch_invariant)
        q = torch.cat([q[..., :-rd], apply_rope(q[..., -rd:], cis)], dim=-1)

        # Window keys: the cached window of earlier chunks, then this chunk's KV.
        kv = self.window_kv(x, cis)
        # Only the newest `window - 1` cached positions can be in a window of this chunk (the buffer keeps more, for
        # crop): decode just those; a suffix of a right-aligned buffer is a right-aligned buffer.
        prev = cache.window_len() if cache is not None else 0
        used = min(prev, self.window - 1)
        suffix = {k: v[:, prev - used :] for k, v in cache.window.items()} if used else None
        view = ChunkView(positions, chunk.old_len, prev, chunk.dense)
        win_idx = view.slot(window_positions(positions, self.window, self.batch_invariant))  # [B, S, w]
        if prev > used:  # slots of cat(suffix, chunk): the skipped oldest slots are never in a window
            win_idx = torch.where(win_idx >= 0, win_idx - (prev - used), -1)
        # A padding query attends to its own slot only (its output is discarded; this keeps the softmax finite).
        if not chunk.dense:
            own = used + torch.arange(seqlen, device=x.device)
            win_idx[..., 0] = torch.where(positions < 0, own, win_idx[..., 0])
        if seqlen == 1 and chunk.dense and used == self.window - 1 and int(chunk.old_len.min()) >= used:
            # A decode step, every row's window full: its keys are the cached suffix then this token, in slot order
            # (win_idx is 0 .. used in every row), decoded straight into the attention's buffer.
            def fill_window(idx: torch.Tensor, out: torch.Tensor) -> None:
                unpack_kv(suffix, out=out[:, 0, :used])
                out[:, 0, used] = kv[:, 0]

            sources: list[KeySource] = [(fill_window, win_idx)]
        else:
            sources = [dense_source(kv if suffix is None else torch.cat([unpack_kv(suffix), kv], 1), win_idx)]
        if cache is not None:
            packed = pack_kv(kv, rd) if prev == 0 else {
                k: torch.cat([cache.window[k], v], dim=1) for k, v in pack_kv(kv, rd).items()
            }  # fmt: skip
            cache.set_window(view.keep_last(packed, chunk.new_len, min(cache.window_cap, prev + seqlen)))

        if self.ratio:
            # raw rows shared by the layer's compressors (batch-invariant kernels; see DeepseekV4Compressor.forward)
            src = CompressorRows.of(x, chunk, cache) if self.batch_invariant else None
            new, first, count = self.compressor(x, chunk, inv_freq, cache, "kv", src)
            gather = _entries(new, first, count, cache, "kv", lambda t: pack_kv(t, rd), unpack_kv)
            if self.indexer is not None:
                picked = self.indexer(x, qr, chunk, cis, inv_freq, cache, src)
            else:
                n = int((chunk.new_len // self.ratio).max())
                visible = (positions + 1) // self.ratio
                picked = torch.arange(n, device=x.device).expand(bsz, seqlen, n)
                picked = torch.where(picked >= visible.unsqueeze(-1), -1, picked)
            sources.append((gather, picked))
        o = sparse_attention(q, self.attn_sink, self.scale, sources, self.batch_invariant)
        o = torch.cat([o[..., :-rd], apply_rope(o[..., -rd:], cis, inverse=True)], dim=-1)
        o = self.wo_a(o.view(bsz, seqlen, self.groups, -1))  # [B, S, groups, o_lora_rank]
        return self.wo_b(o.flatten(2))


# ---------------------------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------------------------
class DeepseekV4Expert(nn.Module):
    """SwiGLU expert with the official clamp and the routing weight applied before ``w2`` in fp32 (SPEC §4)."""

    def __init__(self, config: DeepseekV4Config) -> None:
        super().__init__()
        self.w1 = _linear(config.hidden_size, config.moe_intermediate_size)
        self.w2 = _linear(config.moe_intermediate_size, config.hidden_size)
        self.w3 = _linear(config.hidden_size, config.moe_intermediate_size)
        self.limit = config.swiglu_limit
        self.batch_invariant = config.batch_invariant

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        gate = self.w1(x).float()
        up = self.w3(x).float()
        if self.limit > 0:
            up = up.clamp(-self.limit, self.limit)
            gate = gate.clamp(max=self.limit)
        h = pointwise(F.silu, gate, self.batch_invariant) * up
        if weight is not None:
            h = weight * h
        return self.w2(h.to(x.dtype))


class DeepseekV4Gate(nn.Module):
    """Router: fp32 scores, bias used for selection only, hash routing on the first ``num_hash_layers`` layers."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int) -> None:
        super().__init__()
        self.topk = config.num_experts_per_tok
        self.score_func = config.scoring_func
        self.route_scale = config.routed_scaling_factor
        self.n_experts = config.n_routed_experts
        self.hash = layer_idx < config.num_hash_layers
        self.batch_invariant = config.batch_invariant
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if self.hash:
            self.register_buffer(
                "tid2eid", torch.zeros(config.vocab_size, config.num_experts_per_tok, dtype=torch.int64)
            )
            self.bias = None
        else:
            # Selection-only bias: no gradient reaches it (a buffer, not a parameter); DeepSeek's auxiliary-loss-free
            # balancing updates it in place.
            self.register_buffer("bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, dim]`` -> routing weights ``[T, k]`` fp32 and expert ids ``[T, k]``."""
        scores = linear(x.float(), self.weight.float(), self.batch_invariant)
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1)
        elif self.score_func == "sigmoid":
            scores = pointwise(torch.sigmoid, scores, self.batch_invariant)
        else:
            scores = pointwise(lambda s: F.softplus(s).sqrt(), scores, self.batch_invariant)
        if self.hash:
            if input_ids is None:
                raise ValueError("hash-routed layers (num_hash_layers > 0) need `input_ids`, not only `inputs_embeds`")
            indices = self.tid2eid[input_ids]
        else:
            biased = scores + self.bias if self.bias is not None else scores
            indices = topk_indices(biased, self.topk, self.batch_invariant)
        weights = scores.gather(1, indices)
        if self.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, indices


class _CopyToExpertRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the expert-parallel group (each rank saw some experts)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverExpertRanks(torch.autograd.Function):
    """All-reduce (sum) of the ranks' partial expert outputs; the consumers are replicated, so the gradient passes."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, group) -> torch.Tensor:
        y = y.clone()
        torch.distributed.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class DeepseekV4MoE(nn.Module):
    def __init__(self, config: DeepseekV4Config, layer_idx: int) -> None:
        super().__init__()
        self.gate = DeepseekV4Gate(config, layer_idx)
        self.experts = nn.ModuleList(DeepseekV4Expert(config) for _ in range(config.n_routed_experts))
        self.shared_experts = DeepseekV4Expert(config)
        # Expert parallelism (DeepseekV4PreTrainedModel.distribute_experts): this rank runs `local_experts` only.
        self.local_experts = range(config.n_routed_experts)
        self.expert_group = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x, None if input_ids is None else input_ids.reshape(-1))
        y = torch.zeros_like(x, dtype=torch.float32)
        xe, we = x, weights
        if self.expert_group is not None:
            xe, we = (
                _CopyToExpertRanks.apply(x, self.expert_group),
                _CopyToExpertRanks.apply(weights, self.expert_group),
            )
        if x.shape[0] == 1:  # one token (a decode step): slices instead of index lists, same arithmetic and order
            ids = indices[0].tolist()
            slot_of = {e: slot for slot, e in enumerate(ids)}  # a repeated expert: its last slot, as index_put
            for e in sorted(slot_of):
                if e in self.local_experts:
                    y[:1] += self.experts[e](xe[:1], we[:1, slot_of[e], None])
        else:
            counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist()
            for e, count in enumerate(counts):
                if count == 0 or e not in self.local_experts:
                    continue
                rows, slot = torch.where(indices == e)
                xr, wr = xe[rows], we[rows, slot, None]
                padded = row_bucket(count)  # a GEMM shape of a few (numerics.row_bucket); zero rows, dropped
                if padded > count:
                    xr, wr = F.pad(xr, (0, 0, 0, padded - count)), F.pad(wr, (0, 0, 0, padded - count))
                # Same indexed update as the official code (a token listing an expert twice is written once).
                y[rows] += self.experts[e](xr, wr)[:count]
        if self.expert_group is not None:
            # The official expert-parallel reduction: one fp32 all-reduce of the partial sums, before the shared
            # expert. Exact for top-2 routing on 2 ranks (a + b == b + a); fp32 reassociation otherwise.
            y = _SumOverExpertRanks.apply(y, self.expert_group)
        y = y + self.shared_experts(x)
        return y.to(x.dtype).view(shape)


# ---------------------------------------------------------------------------------------------------------------
# Decoder layer with hyper-connections
# ---------------------------------------------------------------------------------------------------------------
class DeepseekV4DecoderLayer(nn.Module):
    """One block: ``hc_pre -> attn_norm -> attention -> hc_post``, then the same around the MoE (SPEC §4)."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hc = config.hc_mult
        self.iters = config.hc_sinkhorn_iters
        self.hc_eps = config.hc_eps
        self.norm_eps = config.rms_norm_eps
        self.attn = DeepseekV4Attention(config, layer_idx)
        self.ffn = DeepseekV4MoE(config, layer_idx)
        self.batch_invariant = config.batch_invariant
        self.attn_norm = DeepseekV4RMSNorm(config.hidden_size, config.rms_norm_eps, config.batch_invariant)
        self.ffn_norm = DeepseekV4RMSNorm(config.hidden_size, config.rms_norm_eps, config.batch_invariant)
        mix, width = config.hc_mix_dim, config.hc_mult * config.hidden_size
        for part in ("attn", "ffn"):
            self.register_parameter(f"hc_{part}_fn", nn.Parameter(torch.zeros(mix, width, dtype=torch.float32)))
            self.register_parameter(f"hc_{part}_base", nn.Parameter(torch.zeros(mix, dtype=torch.float32)))
            self.register_parameter(f"hc_{part}_scale", nn.Parameter(torch.ones(3, dtype=torch.float32)))

    def _hc_pre(self, streams: torch.Tensor, part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = streams.flatten(2).float()  # [B, S, hc*dim]
        mixes = hc_mix_logits(flat, getattr(self, f"hc_{part}_fn"), self.norm_eps, self.batch_invariant)
        pre, post, comb = sinkhorn_split(
            mixes, getattr(self, f"hc_{part}_scale"), getattr(self, f"hc_{part}_base"), self.hc, self.iters,
            self.hc_eps, self.batch_invariant,
        )  # fmt: skip
        x = (pre.unsqueeze(-1) * flat.view(streams.shape)).sum(dim=2)
        return x.to(streams.dtype), post, comb

    @staticmethod
    def _hc_post(out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        # y_k = post_k * out + sum_j comb[j, k] * residual_j, in fp32, one cast.
        y = post.unsqueeze(-1) * out.unsqueeze(-2) + (comb.unsqueeze(-1) * residual.unsqueeze(-2)).sum(dim=2)
        return y.to(out.dtype)

    def forward(
        self,
        streams: torch.Tensor,
        chunk: ChunkState | torch.Tensor,
        input_ids: torch.Tensor | None,
        cache: DeepseekV4CacheLayer | None = None,
    ) -> torch.Tensor:
        """``streams [B,S,hc,dim]`` of a chunk (a :class:`ChunkState`, or plain positions ``[B,S]`` of a prefill
        from position 0) -> streams after the layer; ``cache`` holds this layer's state of earlier chunks."""
        if not isinstance(chunk, ChunkState):
            chunk = ChunkState.prefill(chunk)
        x, post, comb = self._hc_pre(streams, "attn")
        x = self.attn(self.attn_norm(x), chunk, cache)
        streams = self._hc_post(x, streams, post, comb)
        x, post, comb = self._hc_pre(streams, "ffn")
        x = self.ffn(self.ffn_norm(x), input_ids)
        return self._hc_post(x, streams, post, comb)


def hc_head_reduce(
    streams: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    norm_eps: float,
    hc_eps: float,
    batch_invariant: bool = True,
) -> torch.Tensor:
    """``hc_head``: sigmoid-weighted sum of the streams ``[B,S,hc,dim]`` -> ``[B,S,dim]`` (SPEC §4)."""
    flat = streams.flatten(2).float()
    mixes = hc_mix_logits(flat, fn, norm_eps, batch_invariant) * scale + base
    pre = pointwise(torch.sigmoid, mixes, batch_invariant) + hc_eps
    return (pre.unsqueeze(-1) * flat.view(streams.shape)).sum(dim=2).to(streams.dtype)


class DeepseekV4MTPBlock(DeepseekV4DecoderLayer):
    """Multi-token-prediction block: a full decoder layer fed with the next token's embedding (SPEC §4)."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        dim = config.hidden_size
        self.e_proj = _linear(dim, dim)
        self.h_proj = _linear(dim, dim)
        self.enorm = DeepseekV4RMSNorm(dim, config.rms_norm_eps, config.batch_invariant)
        self.hnorm = DeepseekV4RMSNorm(dim, config.rms_norm_eps, config.batch_invariant)
        self.norm = DeepseekV4RMSNorm(dim, config.rms_norm_eps, config.batch_invariant)
        self.hc_head_fn = nn.Parameter(torch.zeros(config.hc_mult, config.hc_mult * dim, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(config.hc_mult, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(  # type: ignore[override]
        self,
        streams: torch.Tensor,
        embeds: torch.Tensor,
        chunk: ChunkState | torch.Tensor,
        next_ids: torch.Tensor,
        cache: DeepseekV4CacheLayer | None = None,
    ) -> torch.Tensor:
        """Main-model final ``streams [B,S,hc,dim]`` + ``embeds`` of the next tokens -> normed hidden ``[B,S,dim]``.

        ``chunk`` as in :meth:`DeepseekV4DecoderLayer.forward`; ``cache`` holds this block's own state (SPEC §4)."""
        x = self.e_proj(self.enorm(embeds)).unsqueeze(2) + self.h_proj(self.hnorm(streams))
        x = super().forward(x, chunk, next_ids, cache)
        x = hc_head_reduce(
            x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm_eps, self.hc_eps, self.batch_invariant
        )
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DeepseekV4ModelOutput(BaseModelOutputWithPast):
    """``last_hidden_state`` is the normed ``hc_head`` output ``[B,S,dim]``; ``hidden_states`` are the mHC streams
    ``[B,S,hc,dim]`` after the embedding and after each layer; ``streams`` the final streams (MTP input)."""

    streams: torch.Tensor | None = None


@dataclass
class DeepseekV4CausalLMOutput(CausalLMOutputWithPast):
    streams: torch.Tensor | None = None


class DeepseekV4PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV4Config
    config: DeepseekV4Config
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV4DecoderLayer", "DeepseekV4MTPBlock"]
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    # The official model keeps these in fp32 whatever the checkpoint stores (SPEC §3-§4).
    _keep_in_fp32_modules_strict = [
        "norm", "attn_sink", "hc_", "ape", "compressor.wkv", "compressor.wgate", "gate.bias", "head",
    ]  # fmt: skip
    # Linears a weight-only quantizer must leave as they are. transformers' quantizers (bitsandbytes 4/8-bit among
    # them) add this list to `modules_to_not_convert`, so `BitsAndBytesConfig` needs no skip list from the user and
    # quantizes exactly the linears the release stores in FP8 minus wo_a: wo_a is a grouped einsum
    # (DeepseekV4GroupedLinear) that a bitsandbytes matmul cannot compute; the compressor projections and the head
    # are fp32 by contract (SPEC §3-§4) and read through `.weight.float()`; the indexer's weights_proj is bf16 in the
    # release; routed experts keep the checkpoint's own form (bf16, or our FP4/FP8 modules). Non-strict: no dtype
    # effect at bf16 (the model does not run in fp16).
    _keep_in_fp32_modules = [
        "wo_a", "compressor.wkv", "compressor.wgate", "weights_proj", "head", r"(?:layers|mtp)\.\d+\.ffn\.experts",
    ]  # fmt: skip

    def distribute_experts(self, group: object | None = None) -> None:
        """Expert parallelism over ``group`` (default: the whole ``torch.distributed`` world, already initialised).

        Rank ``r`` of ``w`` keeps routed experts ``[r*n/w, (r+1)*n/w)`` of every MoE layer (the others are dropped,
        freeing their memory); everything else stays replicated. Each rank routes every token, runs its own experts,
        and the fp32 partial sums are all-reduced before the shared expert is added (SPEC §4 accumulates the experts
        in fp32). Call after loading, before the forward.
        """
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        for module in self.modules():
            if not isinstance(module, DeepseekV4MoE):
                continue
            n = len(module.experts)
            if n % world:
                raise ValueError(f"n_routed_experts={n} is not divisible by the expert-parallel world size {world}")
            module.local_experts = range(rank * n // world, (rank + 1) * n // world)
            for e in range(n):
                if e not in module.local_experts:
                    module.experts[e] = nn.Identity()
            module.expert_group = group if group is not None else dist.group.WORLD

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype is its embedding's (bf16 in the release): the fp32 norms / mixers / head are kept-in-fp32
        exceptions (SPEC §3-§4), and save_pretrained writes this as `torch_dtype`."""
        return self.get_input_embeddings().weight.dtype

    # Tensor name -> on-disk dtype for the tensors held in another dtype than the release stores (the fp32-held
    # RMSNorm weights, compressor projections and head are bf16 on disk). Installed by
    # transformers_deepseek.register() from the weight table, which modeling/ does not import.
    released_dtypes: Callable[[nn.Module], dict[str, torch.dtype]] | None = None

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):  # type: ignore[override]
        """``PreTrainedModel.save_pretrained`` writing the released layout: tensors the model holds in fp32 but the
        release stores in bf16 are saved in bf16 (a quantized model's quantizer does this itself)."""
        rule = type(self).released_dtypes
        if state_dict is None and getattr(self, "hf_quantizer", None) is None and rule is not None:
            dtypes = rule(self)
            state_dict = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in self.state_dict().items()}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    # ``push_to_hub`` through the package's publisher (validated checkpoint, generated model card). Installed by
    # transformers_deepseek.register(); without it, transformers' own push_to_hub runs.
    hub_publisher: Callable[..., object] | None = None

    def push_to_hub(self, repo_id: str, *args, **kwargs):  # type: ignore[override]
        publisher = type(self).hub_publisher
        if publisher is None or args:
            return super().push_to_hub(repo_id, *args, **kwargs)
        return publisher(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):  # type: ignore[override]
        """``PreTrainedModel.from_pretrained`` that refuses incomplete checkpoints.

        transformers only warns about missing or misshaped tensors and initialises them at random; a V4 checkpoint
        missing a tensor is corrupt, so this raises ``ValueError`` naming every such tensor instead. Tensors the
        model does not use (e.g. ``head``/``mtp`` when loading the bare :class:`DeepseekV4Model`) are reported
        by transformers as unexpected keys, as usual.
        """
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        # Load with mismatches tolerated so that they can be reported here by name (transformers' own error only
        # points at its log); unless the caller allowed them, they are still an error.
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        problems = []
        if info.get("missing_keys"):
            problems.append(f"missing tensors: {sorted(info['missing_keys'])}")
        if info.get("mismatched_keys") and not allow_mismatch:
            shapes = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in info["mismatched_keys"]]
            problems.append(f"tensors of the wrong shape: {shapes}")
        if problems:
            raise ValueError(
                f"{cls.__name__}.from_pretrained: the checkpoint does not match the config; " + "; ".join(problems)
            )
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeepseekV4RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DeepseekV4Gate):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            if module.hash and not getattr(module.tid2eid, "_is_hf_initialized", False):
                # Any valid expert ids: random distinct experts per token.
                ids = torch.rand(module.tid2eid.shape[0], module.n_experts).argsort(-1)[:, : module.topk]
                init.copy_(module.tid2eid, ids.to(module.tid2eid.dtype))
        elif isinstance(module, DeepseekV4Attention):
            init.zeros_(module.attn_sink)
        elif isinstance(module, DeepseekV4Compressor):
            init.zeros_(module.ape)
        if isinstance(module, DeepseekV4DecoderLayer):
            for part in ("attn", "ffn"):
                init.normal_(getattr(module, f"hc_{part}_fn"), mean=0.0, std=std)
                init.zeros_(getattr(module, f"hc_{part}_base"))
                init.ones_(getattr(module, f"hc_{part}_scale"))
        if isinstance(module, (DeepseekV4MTPBlock, DeepseekV4Model)):
            init.normal_(module.hc_head_fn, mean=0.0, std=std)
            init.zeros_(module.hc_head_base)
            init.ones_(module.hc_head_scale)


class DeepseekV4Model(DeepseekV4PreTrainedModel):
    """Embedding, decoder layers with hyper-connections, ``hc_head`` and final norm (no LM head)."""

    def __init__(self, config: DeepseekV4Config) -> None:
        super().__init__(config)
        self._build_backbone(config)
        self.post_init()

    def _build_backbone(self, config: DeepseekV4Config) -> None:
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekV4DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekV4RMSNorm(config.hidden_size, config.rms_norm_eps, config.batch_invariant)
        hc, width = config.hc_mult, config.hc_mult * config.hidden_size
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, width, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(hc, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def _check_inputs(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref.dim() < 2 or ref.shape[1] == 0:
            raise ValueError(f"input_ids: expected a non-empty [batch, seq] input, got shape {tuple(ref.shape)}")
        if input_ids is not None:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids: token ids must lie in [0, vocab_size={self.config.vocab_size}), found [{lo}, {hi}]"
                )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: object,
    ) -> DeepseekV4ModelOutput:
        self._check_inputs(input_ids, inputs_embeds)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, seqlen = embeds.shape[:2]
        cache = past_key_values
        if cache is not None and not isinstance(cache, DeepseekV4Cache):
            raise TypeError(f"past_key_values must be a DeepseekV4Cache, got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = DeepseekV4Cache(config=self.config)
        chunk = self._chunk_state(attention_mask, cache, bsz, seqlen, embeds.device)
        streams = embeds.unsqueeze(2).repeat(1, 1, self.config.hc_mult, 1)  # [B, S, hc, dim]
        all_streams = [streams] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and state is None:
                streams = self._gradient_checkpointing_func(layer.__call__, streams, chunk, input_ids)
            else:
                streams = layer(streams, chunk, input_ids, state)
            if all_streams is not None:
                all_streams.append(streams)
        if cache is not None:
            cache.commit(chunk.new_len, seqlen)
        hidden = hc_head_reduce(
            streams, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.config.rms_norm_eps,
            self.config.hc_eps, self.config.batch_invariant,
        )  # fmt: skip
        return DeepseekV4ModelOutput(
            last_hidden_state=self.norm(hidden),
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_streams) if all_streams is not None else None,
            streams=streams,
        )

    def _chunk_state(
        self, attention_mask: torch.Tensor | None, cache: DeepseekV4Cache | None, bsz: int, seqlen: int, device
    ) -> ChunkState:
        """Positions of this chunk's tokens from the cache's per-row lengths and the padding in ``attention_mask``
        (``[B, past + S]`` as generate() passes it, or ``[B, S]``)."""
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            valid = torch.ones(bsz, seqlen, dtype=torch.bool, device=device)
        else:
            if (
                attention_mask.dim() != 2
                or attention_mask.shape[0] != bsz
                or attention_mask.shape[1] not in (seqlen, past + seqlen)
            ):
                raise ValueError(
                    f"attention_mask: expected shape [{bsz}, {seqlen}] or [{bsz}, {past + seqlen}] "
                    "(past + new tokens), "
                    f"got {list(attention_mask.shape)}"
                )
            valid = attention_mask[:, -seqlen:].bool()
        if cache is None:
            old = torch.zeros(bsz, dtype=torch.long, device=device)
        else:
            if cache.lengths is not None and cache.lengths.shape[0] != bsz:
                raise ValueError(f"input batch size {bsz} does not match the cache's {cache.lengths.shape[0]}")
            old = cache.lengths if cache.lengths is not None else torch.zeros(bsz, dtype=torch.long, device=device)
        positions = torch.where(valid, old.unsqueeze(1) + valid.long().cumsum(1) - 1, -1)
        new = old + valid.long().sum(1)
        limit = self.config.max_position_embeddings
        if int(new.max()) > limit:
            raise ValueError(
                f"position {int(new.max()) - 1} is beyond max_position_embeddings={limit} "
                "(the YaRN-extended context of this checkpoint)"
            )
        return ChunkState(positions, old, new)


class DeepseekV4ForCausalLM(DeepseekV4Model, GenerationMixin):
    """DeepSeek-V4 with its fp32 LM head and the MTP block(s).

    The causal-LM model extends :class:`DeepseekV4Model` in place rather than wrapping it under a ``model.``
    prefix, so module paths are exactly the released tensor names (``embed.weight``, ``head.weight``,
    ``mtp.0.*``): released checkpoints load and save with no renaming.
    """

    _tied_weights_keys: list[str] = []

    def __init__(self, config: DeepseekV4Config) -> None:
        DeepseekV4PreTrainedModel.__init__(self, config)  # not DeepseekV4Model.__init__: one post_init, at the end
        self._build_backbone(config)
        self.head = _linear(config.hidden_size, config.vocab_size, dtype=torch.float32)
        first = config.num_hidden_layers
        self.mtp = nn.ModuleList(DeepseekV4MTPBlock(config, first + k) for k in range(config.num_nextn_predict_layers))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the forward creates its DeepseekV4Cache on the first call.
        return False

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.head = value

    def get_decoder(self) -> DeepseekV4ForCausalLM:
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of normed hidden states ``[..., dim]`` with the fp32 head (SPEC §4)."""
        return linear(hidden.float(), self.head.weight.float(), self.config.batch_invariant)

    def mtp_logits(
        self,
        streams: torch.Tensor,
        next_ids: torch.Tensor,
        depth: int = 0,
        past_key_values: DeepseekV4Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits of MTP block ``depth``: final main-model ``streams [B,S,hc,dim]`` at positions ``t`` and the next
        tokens ``next_ids [B,S]`` (token ``t + 1``) -> ``[B,S,vocab]`` fp32 predicting token ``t + 2`` (SPEC §4).

        Without a cache the positions start at 0 (fresh state). With ``past_key_values`` they continue the cache's
        ``mtp_lengths[depth]`` and the block's state is kept in ``mtp_layers[depth]``; ``attention_mask [B,S]``
        marks padding columns with 0. ``logits_to_keep`` as in :meth:`forward`."""
        bsz, seqlen = next_ids.shape
        valid = torch.ones_like(next_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        old = None if past_key_values is None else past_key_values.mtp_lengths[depth]
        old = next_ids.new_zeros(bsz) if old is None else old
        positions = torch.where(valid, old.unsqueeze(1) + valid.long().cumsum(1) - 1, -1)
        chunk = ChunkState(positions, old, old + valid.long().sum(1))
        state = None if past_key_values is None else past_key_values.mtp_layers[depth]
        hidden = self.mtp[depth](streams, self.embed(next_ids), chunk, next_ids, state)
        if past_key_values is not None:
            past_key_values.mtp_lengths[depth] = chunk.new_len
        return self.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):  # type: ignore[override]
        """``GenerationMixin.generate``, plus speculative decoding with the MTP head when ``use_mtp=True`` is passed
        or set in the generation config (see :func:`~.generation_deepseek_v4.mtp_generate`)."""
        from .generation_deepseek_v4 import mtp_generate, pop_use_mtp

        use_mtp, generation_config = pop_use_mtp(self, generation_config, kwargs)
        if use_mtp:
            return mtp_generate(self, inputs, generation_config, **kwargs)
        return super().generate(inputs, generation_config, **kwargs)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: object,
    ) -> DeepseekV4CausalLMOutput:
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.logits(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return DeepseekV4CausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            streams=out.streams,
        )
