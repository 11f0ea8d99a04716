"""Optional compiled CPU kernels (numba) for the table lookups of the cache decode and the Sinkhorn loop.

A decode step reads every stored indexer key (SPEC §4 Indexer scores all complete entries), so its cost grows with
the context, and it decodes the e4m3 KV of the window and of the selected compressed entries. In eager PyTorch a
lookup needs an index tensor as large as its input and a second pass to apply the block scales; these loops compute
the index in a register, scale, and write each value once. Results are the bits of the PyTorch path (the same
tables; products exact in fp32; bf16 rounded to nearest even): ``tests/test_kernels.py`` checks every (scale, code)
pair.

The hyper-connection Sinkhorn loop (SPEC §6) runs 2 * 20 normalisations of a 4 x 4 matrix per mixer and token: in
eager code ~60 calls of a few microseconds each, ten mixers per decoded token and layer pair. The kernel does the same
fp32 sums (left to right) and divisions in one call.

The indexer-key lookup, the one kernel whose size grows with the context, also runs on torch's thread count (numba's
``omp`` or ``tbb`` threading layer) once it decodes at least :data:`PARALLEL_MIN_VALUES` values: each row is
decoded by one thread, so the bits do not depend on the thread count.

Installed with ``pip install transformers-deepseek[fast]``. Without numba, with ``TDSEEK_NO_NUMBA=1``, or for tensors
the kernels do not take (not on the CPU, in an autograd graph), callers run their PyTorch path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

DISABLE_ENV = "TDSEEK_NO_NUMBA"  # set to 1 to use the PyTorch path even when numba is installed


@functools.cache
def _compiled() -> dict[str, Callable[..., None]] | None:
    """The jitted kernels, or None when numba is missing or disabled (imported on first use: numba's import costs
    about half a second, which a plain ``import transformers_deepseek`` should not pay)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    try:
        import numba
        import numpy as np
    except ImportError:
        return None

    @numba.njit(cache=True, boundscheck=False, inline="always")
    def e2m1_row(codes, scales, table, out):  # pragma: no cover - compiled
        # codes [16 * G] uint8, scales [G] uint8, table [256 * 256] int32, out [16 * G] int32
        for g in range(scales.shape[0]):
            base = np.int32(scales[g]) << 8
            for j in range(g * 16, g * 16 + 16):
                out[j] = table[base | np.int32(codes[j])]

    @numba.njit(cache=True, boundscheck=False)
    def e2m1_pairs(codes, scales, table, out):  # pragma: no cover - compiled
        # e2m1_row over [B, N] rows: codes [B, N, 16 * G], scales [B, N, G], out [B, N, 16 * G]
        for b in range(codes.shape[0]):
            for t in range(codes.shape[1]):
                e2m1_row(codes[b, t], scales[b, t], table, out[b, t])

    @numba.njit(cache=True, boundscheck=False, parallel=True)
    def e2m1_pairs_parallel(codes, scales, table, out):  # pragma: no cover - compiled
        # e2m1_pairs with the rows shared out over numba's threads
        rows = codes.shape[1]
        for r in numba.prange(codes.shape[0] * rows):
            b, t = r // rows, r % rows
            e2m1_row(codes[b, t], scales[b, t], table, out[b, t])

    @numba.njit(cache=True, parallel=True)
    def parallel_probe(x):  # pragma: no cover - compiled
        # a trivial parallel loop: launching it starts numba's threading layer, which can then be asked for its name
        for i in numba.prange(x.shape[0]):
            x[i] = i

    @numba.njit(cache=True, boundscheck=False, inline="always")
    def e4m3_row(codes, scales, values, scale_values, out):  # pragma: no cover - compiled
        # codes [D] uint8, scales [G] uint8 (D / G values per scale), values [256] fp32 (e4m3 table), scale_values
        # [256] fp32 (e8m0 table), out [D] fp32: the products, exact in fp32
        block = codes.shape[0] // scales.shape[0]
        for g in range(scales.shape[0]):
            s = scale_values[scales[g]]
            for j in range(g * block, g * block + block):
                out[j] = values[codes[j]] * s

    @numba.njit(cache=True, boundscheck=False)
    def e4m3_blocks(codes, scales, values, scale_values, out):  # pragma: no cover - compiled
        # e4m3_row over [B, N] rows; out [B, N, D] fp32
        for b in range(codes.shape[0]):
            for t in range(codes.shape[1]):
                e4m3_row(codes[b, t], scales[b, t], values, scale_values, out[b, t])

    @numba.njit(cache=True, boundscheck=False)
    def e4m3_blocks_bf16(codes, scales, values, scale_values, out):  # pragma: no cover - compiled
        # e4m3_row over [B, N] rows, rounded to bf16 (nearest even) into out [B, N, D] uint16
        row = np.empty(codes.shape[2], dtype=np.float32)
        bits = row.view(np.uint32)
        for b in range(codes.shape[0]):
            for t in range(codes.shape[1]):
                e4m3_row(codes[b, t], scales[b, t], values, scale_values, row)
                for j in range(codes.shape[2]):
                    u = bits[j]
                    if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN: 0xFFFF, as ATen's vectorized conversion
                        out[b, t, j] = 0xFFFF
                    else:
                        out[b, t, j] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16

    @numba.njit(cache=True, boundscheck=False)
    def sinkhorn(comb, iters, eps):  # pragma: no cover - compiled
        # comb [T, n, n] fp32 (exp of the logits), eps fp32, normalised in place as sinkhorn_split's torch loop: rows
        # (first pass: c / sum + eps), then columns (c / (sum + eps)), iters times; every sum left to right in fp32
        n = comb.shape[1]
        for t in range(comb.shape[0]):
            c = comb[t]
            for it in range(iters):
                for i in range(n):
                    s = c[i, 0]
                    for j in range(1, n):
                        s += c[i, j]
                    if it == 0:
                        for j in range(n):
                            c[i, j] = c[i, j] / s + eps
                    else:
                        s += eps
                        for j in range(n):
                            c[i, j] /= s
                for j in range(n):
                    s = c[0, j]
                    for i in range(1, n):
                        s += c[i, j]
                    s += eps
                    for i in range(n):
                        c[i, j] /= s

    @numba.njit(cache=True, boundscheck=False)
    def index_score_keys(scores, weights, visible, first, keys):  # pragma: no cover - compiled
        # scores [B, S, H, N] uint16 (bf16 bits of a slice of keys starting at entry `first`), weights [B, S, H] fp32
        # (bf16 values), visible [B, S] int64, keys [B, S, N] int32 out. Per entry: relu, times the head's weight
        # rounded to bf16, summed over heads in fp32 from zero, rounded to bf16 (nearest even), -inf at entries >=
        # visible; the key is the score's order bits above the reversed entry index. Each pass is a loop over the
        # N entries (vectorised); the bf16 <-> fp32 reinterpretations go through the two scratch rows.
        n = scores.shape[3]
        tmp_u = np.empty(n, dtype=np.uint32)
        tmp_f = tmp_u.view(np.float32)
        acc_f = np.empty(n, dtype=np.float32)
        acc_u = acc_f.view(np.uint32)
        half, low, one, zero = np.uint32(0x7FFF), np.uint32(16), np.uint32(1), np.float32(0.0)
        for b in range(scores.shape[0]):
            for s in range(scores.shape[1]):
                acc_f[:] = zero
                for h in range(scores.shape[2]):
                    w = weights[b, s, h]
                    row = scores[b, s, h]
                    for j in range(n):
                        tmp_u[j] = np.uint32(row[j]) << low
                    for j in range(n):
                        v = tmp_f[j]
                        tmp_f[j] = (v if v > zero else zero) * w  # exact: a product of two bf16 values
                    for j in range(n):
                        u = tmp_u[j]
                        tmp_u[j] = ((u + half + ((u >> low) & one)) >> low) << low
                    for j in range(n):
                        acc_f[j] += tmp_f[j]
                vis = visible[b, s]
                out = keys[b, s]
                for j in range(n):
                    u = acc_u[j]
                    bits = np.int32((u + half + ((u >> low) & one)) >> low)
                    bits = np.int32(0xFF80) if first + j >= vis else bits  # -inf
                    signed = bits - np.int32(0x10000) if bits >= np.int32(0x8000) else bits
                    order = signed ^ np.int32(0x7FFF) if signed < np.int32(0) else signed
                    out[j] = (order << np.int32(16)) | (np.int32(0xFFFF) - np.int32(first + j))

    @numba.njit(cache=True, boundscheck=False)
    def softmax_blocks(pv, psum, alpha, acc, denom):  # pragma: no cover - compiled
        # The attention's rescale-and-add recurrence over 64-slot blocks, for rows r: pv [R, nb, H, D], psum [R, nb,
        # H], alpha [R, nb - 1, H] fp32 in; acc [R, H, D], denom [R, H] fp32 out. Block k > 0: acc = acc * alpha +
        # pv, denom = denom * alpha + psum, each product and sum rounded to fp32 on its own (no fused multiply-add),
        # as the PyTorch ops of the loop do.
        for r in range(pv.shape[0]):
            for h in range(pv.shape[2]):
                out = acc[r, h]
                out[:] = pv[r, 0, h]
                den = psum[r, 0, h]
                for k in range(1, pv.shape[1]):
                    a = alpha[r, k - 1, h]
                    den = den * a + psum[r, k, h]
                    row = pv[r, k, h]
                    for d in range(out.shape[0]):
                        out[d] = out[d] * a + row[d]
                denom[r, h] = den

    return {
        "e2m1_pairs": e2m1_pairs,
        "e2m1_pairs_parallel": e2m1_pairs_parallel,
        "parallel_probe": parallel_probe,
        "e4m3_blocks": e4m3_blocks,
        "e4m3_blocks_bf16": e4m3_blocks_bf16,
        "sinkhorn": sinkhorn,
        "index_score_keys": index_score_keys,
        "softmax_blocks": softmax_blocks,
    }


PARALLEL_MIN_VALUES = 1 << 18  # smaller kernels run on one thread: a parallel launch costs more than it saves
_parallel_pid: int | None = None  # the process that first asked for threads (see parallel_threads)


@functools.cache
def _threading_layer() -> str | None:
    """numba's threading layer ("omp", "tbb" or "workqueue"), started by a trivial parallel launch."""
    compiled = _compiled()
    if compiled is None:
        return None
    import numba
    import numpy as np

    compiled["parallel_probe"](np.zeros(2, dtype=np.int64))
    return numba.threading_layer()


def parallel_threads(values: int) -> int:
    """Threads for a kernel that reads or writes ``values`` values: torch's intra-op thread count (so
    ``torch.set_num_threads`` governs the kernels too) when there are at least :data:`PARALLEL_MIN_VALUES`, else 1.

    Also 1 under numba's ``workqueue`` layer (measured slower than one thread here, and not safe to launch from
    several threads at once) and in a process forked from the one that asked first (GNU OpenMP's threads do not
    survive a fork)."""
    global _parallel_pid
    if values < PARALLEL_MIN_VALUES:  # most calls of a decode step: decided before asking anything else
        return 1
    threads = torch.get_num_threads()
    if threads < 2 or _compiled() is None:
        return 1
    if _parallel_pid is None:
        _parallel_pid = os.getpid()
    if _parallel_pid != os.getpid() or _threading_layer() not in ("omp", "tbb"):
        return 1
    import numba

    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return threads


def available() -> bool:
    """True when the compiled kernels are in use."""
    return _compiled() is not None


def lookup_e2m1_pairs(
    codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``table[(scales[..., j // 16] << 8) | codes[..., j]]`` for uint8 ``codes [..., N, 16G]`` and ``scales [..., N,
    G]`` (any strides) and an int32 ``table [65536]``: int32 ``[..., N, 16G]``, written into ``out`` when given (same
    shape, int32). None when the kernels are unavailable or the tensors do not suit them."""
    compiled = _compiled()
    if compiled is None or codes.device.type != "cpu" or codes.dim() < 2:
        return None
    try:
        c, s = _rows3(codes), _rows3(scales)
    except RuntimeError:  # leading dims not viewable as one: let the caller's PyTorch path handle it
        return None
    if out is None:
        out = torch.empty(codes.shape, dtype=torch.int32)
    elif out.shape != codes.shape or out.dtype != torch.int32 or out.device.type != "cpu":
        raise ValueError(
            f"lookup_e2m1_pairs: `out` must be int32 {list(codes.shape)}, got {out.dtype} {list(out.shape)}"
        )
    kernel = "e2m1_pairs_parallel" if parallel_threads(2 * c.numel()) > 1 else "e2m1_pairs"
    compiled[kernel](c.numpy(), s.numpy(), table.numpy(), _rows3(out).numpy())
    return out


def _rows3(t: torch.Tensor) -> torch.Tensor:
    """``[..., N, D]`` as a 3-d view (no copy; raises if the leading dims cannot be merged without one)."""
    return t.unsqueeze(0) if t.dim() == 2 else t.view(-1, *t.shape[-2:])


def decode_e4m3_blocks(
    codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor, scale_values: torch.Tensor, out: torch.Tensor
) -> bool:
    """``out[..., j] = values[codes[..., j]] * scale_values[scales[..., j // (D / G)]]`` into ``out`` (fp32, or bf16
    rounded to nearest even) for uint8 ``codes [..., N, D]``, ``scales [..., N, G]``; any strides. False (``out``
    untouched) when the kernels are unavailable or the tensors do not suit them."""
    compiled = _compiled()
    if compiled is None or codes.device.type != "cpu" or out.requires_grad or codes.dim() < 2:
        return False
    if out.dtype not in (torch.float32, torch.bfloat16) or out.shape != codes.shape:
        return False
    try:
        c, s, o = _rows3(codes), _rows3(scales), _rows3(out)
    except RuntimeError:  # leading dims not viewable as one: let the caller's PyTorch path handle it
        return False
    if out.dtype == torch.float32:
        compiled["e4m3_blocks"](c.numpy(), s.numpy(), values.numpy(), scale_values.numpy(), o.numpy())
    else:
        compiled["e4m3_blocks_bf16"](
            c.numpy(), s.numpy(), values.numpy(), scale_values.numpy(), o.view(torch.uint16).numpy()
        )
    return True


def sinkhorn_normalize(comb: torch.Tensor, iters: int, eps: float) -> bool:
    """Sinkhorn-normalise ``comb [..., n, n]`` (fp32, contiguous, the exponentiated logits) in place, as
    ``sinkhorn_split``'s loop does. False (``comb`` untouched) when the kernels are unavailable or ``comb`` does not
    suit them (not on the CPU, not contiguous fp32, in an autograd graph)."""
    compiled = _compiled()
    if compiled is None or comb.device.type != "cpu" or comb.dtype != torch.float32 or comb.requires_grad:
        return False
    if comb.dim() < 2 or comb.shape[-1] != comb.shape[-2] or not comb.is_contiguous() or iters < 1:
        return False
    import numpy as np

    compiled["sinkhorn"](comb.view(-1, *comb.shape[-2:]).numpy(), iters, np.float32(eps))
    return True


def index_score_keys(
    scores: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor, first: int, out: torch.Tensor
) -> bool:
    """The indexer's top-k keys of a slice of entries ``first ..``, fused: from bf16 ``scores [B, S, H, N]`` (query
    heads x entries) and ``weights [B, S, H]``, int32 ``out [B, S, N]`` = order bits of ``sum_h bf16(relu(scores) *
    weights)`` (bf16; -inf at entries ``>= visible [B, S]``) above the reversed entry index, as
    ``numerics.topk_indices`` builds them from the same score. Entry indices must stay below 2^16. False (``out``
    untouched) when the kernels are unavailable or the tensors do not suit them."""
    compiled = _compiled()
    if compiled is None or scores.device.type != "cpu" or scores.requires_grad or scores.dtype != torch.bfloat16:
        return False
    if scores.dim() != 4 or out.dtype != torch.int32 or first + scores.shape[-1] > 1 << 16:
        return False
    compiled["index_score_keys"](
        scores.view(torch.uint16).numpy(), weights.float().numpy(), visible.numpy(), first, out.numpy()
    )
    return True


def softmax_blocks(
    pv: torch.Tensor, psum: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sparse attention's recurrence over its ``nb`` blocks of 64 slots: from the blocks' fp32 ``pv [..., nb, H,
    D]`` (P.V), ``psum [..., nb, H]`` (row sums of P) and ``alpha [..., nb - 1, H]`` (the rescale from each block's
    running max to the next's), ``acc [..., H, D]`` and ``denom [..., H]`` with ``acc = acc * alpha + pv`` and
    ``denom = denom * alpha + psum`` block after block (fp32, no fused multiply-add: the PyTorch loop's bits). None
    when the kernels are unavailable or the tensors do not suit them (not on the CPU, not fp32, in an autograd
    graph)."""
    compiled = _compiled()
    tensors = (pv, psum, alpha)
    if compiled is None or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    if any(t.requires_grad for t in tensors) or pv.dim() < 3:
        return None
    lead, (nb, heads, dim) = pv.shape[:-3], pv.shape[-3:]
    if nb < 2 or psum.shape != (*lead, nb, heads) or alpha.shape != (*lead, nb - 1, heads):
        return None
    acc = pv.new_empty(*lead, heads, dim)
    denom = pv.new_empty(*lead, heads)
    compiled["softmax_blocks"](
        pv.reshape(-1, nb, heads, dim).numpy(),
        psum.reshape(-1, nb, heads).numpy(),
        alpha.reshape(-1, nb - 1, heads).numpy(),
        acc.view(-1, heads, dim).numpy(),
        denom.view(-1, heads).numpy(),
    )
    return acc, denom
