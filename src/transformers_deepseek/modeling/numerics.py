"""The official model's simulated low-precision points (SPEC §5-§6) as plain, differentiable torch functions.

These are part of the architecture, not of a storage format: even a bf16 checkpoint runs its KV nope dims through
an FP8 round trip and its indexer queries/keys through an FP4 round trip, because the released weights were
trained (QAT) with exactly this rounding. Each function reproduces the kernel semantics bit for bit on CPU:
power-of-two (ue8m0) scales by an exact ceil, round-to-nearest-even onto the e4m3 / e2m1 grids, clamping, and
the dtype round trips of the official ``inplace=True`` kernels.
"""

from __future__ import annotations

import functools
import math

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4  # SPEC §6: act_quant clamps amax from below
FP4_AMAX_FLOOR = 6.0 * 2.0**-126  # SPEC §6: fp4_act_quant clamps amax from below


def ceil_pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """ue8m0 scale ``2^ceil(log2(amax * fp32(1/qmax)))`` computed on the fp32 bit pattern (exact, SPEC §5.9).

    For a positive finite ``a``, adding ``2^23 - 1`` to its bits carries into the exponent exactly when the mantissa
    is non-zero; masking the mantissa off then leaves the next power of two at or above ``a``.
    """
    a = amax.float() * (1.0 / qmax)  # a Python float: multiplied as fp32(1/qmax), as the kernel does
    return (a.view(torch.int32) + 0x7FFFFF).bitwise_and_(0x7F800000).view(torch.float32)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values in [-6, 6] to the nearest e2m1 value (0, .5, 1, 1.5, 2, 3, 4, 6), ties to even code.

    The grid spacing is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]; ``torch.round`` is round-half-to-even on the
    rescaled value, which is exactly the e2m1 tie rule (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4).
    """
    mag = x.abs()
    step = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
    return torch.copysign(torch.round(mag / step) * step, x)


class _StraightThrough(torch.autograd.Function):
    """Forward: the simulated value; backward: identity (the usual QAT straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return simulated

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the quantization block {block}")
    return x.float().unflatten(-1, (-1, block))


def fp8_simulate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``act_quant(x, block, "ue8m0", inplace=True)`` of the current kernel (SPEC §6): e4m3 round trip per block.

    Returns ``x.dtype`` values ``bf16(float(e4m3(clamp(x / s))) * s)`` with ``s`` the ue8m0 scale of each block.
    Gradients pass straight through.
    """
    xb = _blocks(x, block)  # [..., n_blocks, block]
    scale = ceil_pow2_scale(xb.abs().amax(-1, keepdim=True).clamp_min(FP8_AMAX_FLOOR), FP8_MAX)
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    simulated = (q * scale).flatten(-2).to(x.dtype)
    return _StraightThrough.apply(x, simulated) if x.requires_grad else simulated


def fp4_simulate(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``fp4_act_quant(x, block, inplace=True)`` (SPEC §6): e2m1 round trip per block with a ue8m0 scale."""
    xb = _blocks(x, block)
    scale = ceil_pow2_scale(xb.abs().amax(-1, keepdim=True).clamp_min(FP4_AMAX_FLOOR), FP4_MAX)
    q = round_to_e2m1((xb / scale).clamp(-FP4_MAX, FP4_MAX))
    simulated = (q * scale).flatten(-2).to(x.dtype)
    return _StraightThrough.apply(x, simulated) if x.requires_grad else simulated


def quantize_activation_fp8(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``act_quant(x, block, "ue8m0")``, not in place: e4m3 values as fp32 ``[..., N]`` and fp32 scales
    ``[..., N/block]``."""
    xb = _blocks(x, block)
    scale = ceil_pow2_scale(xb.abs().amax(-1, keepdim=True).clamp_min(FP8_AMAX_FLOOR), FP8_MAX)
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return q.flatten(-2), scale.squeeze(-1)


@functools.lru_cache(maxsize=16)
def _hadamard(n: int, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def sylvester_hadamard(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Sylvester-ordered Hadamard matrix ``H_n`` (entries +-1), ``n`` a power of two. Built once per size and
    device (a decode step rotates the indexer's queries and keys in every ratio-4 layer); do not modify it."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return _hadamard(n, torch.device(device if device is not None else "cpu"))


def hadamard_rotate(x: torch.Tensor, batch_invariant: bool = True) -> torch.Tensor:
    """``hadamard_transform(x, scale=d^-0.5)``: orthonormal Walsh-Hadamard in fp32, result in ``x.dtype`` (SPEC §6)."""
    d = x.shape[-1]
    h = sylvester_hadamard(d, x.device)
    flat = x.float().reshape(-1, d)
    rotated = _gemm_rows(lambda m: torch.matmul(m, h), flat) if batch_invariant else torch.matmul(flat, h)
    return (rotated * (d**-0.5)).view(x.shape).to(x.dtype)


def yarn_inv_freq(dim: int, base: float, yarn: dict[str, float] | None) -> torch.Tensor:
    """Inverse RoPE frequencies ``[dim/2]`` (fp32), with the official YaRN ramp when ``yarn`` is given (SPEC §4).

    The official code interpolates ``f/factor*(1-smooth) + f*smooth`` with a ramp between the floor/ceil
    correction dims of ``beta_fast`` / ``beta_slow`` and applies no mscale.
    """
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is None:
        return freqs
    original = yarn["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(yarn["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / yarn["factor"] * (1 - smooth) + freqs * smooth


def rope_cis(inv_freq: torch.Tensor, positions: torch.Tensor, batch_invariant: bool = True) -> torch.Tensor:
    """Complex rotations ``exp(i * pos * f)`` as complex64 ``[*positions.shape, dim/2]``."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return pointwise(lambda a: torch.polar(torch.ones_like(a), a), angles, batch_invariant)


def apply_rope(x: torch.Tensor, cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [..., S, (H,) rd]`` by ``cis [B or 1, S, rd/2]`` in fp32 complex arithmetic.

    Out of place; the result is cast back to ``x.dtype`` (the official in-place copy into a bf16 tensor).
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    if inverse:
        cis = cis.conj()
    if xc.dim() == 4:  # [B, S, H, rd/2]
        cis = cis.unsqueeze(2)
    return torch.view_as_real(xc * cis).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Shape-independent CPU kernels (config.batch_invariant)
# ---------------------------------------------------------------------------------------------------------------------
# A token's result should not depend on what it is computed with: the other rows of a padded batch, the rest of a
# prefill chunk, the extra tokens of a speculative verification. Three CPU kernel behaviours break that, each
# measured on torch 2.13 (tests/test_batch_invariance.py checks them on the machine that runs the tests):
# - Elementwise kernels (exp, sigmoid, rsqrt, silu, cos/sin, ...) run 2-vector strides through SIMD code and the
#   remainder of each thread's range through scalar libm, which rounds differently: an element's value depends on
#   its offset in the flattened tensor. Padding the flat tensor so that no range has a remainder sends every
#   element through the SIMD code, as a full-size call (a prefill, or the official model's precomputed RoPE table)
#   does.
# - fp32 GEMMs with few rows (M < 12 and not a multiple of 4) take other micro-kernels than large ones. Padding to
#   the next multiple of 4 rows gives every row the large-M result (and costs less than padding to 16: a decode
#   step runs ~25 fp32 GEMMs of one row). (bf16 GEMMs are row-independent at every M.)
# - torch.topk breaks ties depending on the row length. Keys made unique by the index make the selection and its
#   order a function of the values only: larger score first, lower index first among equal scores.
_SIMD_STRIDE = 256  # elements; a multiple of every 2-vector stride (64 bf16 values in two 512-bit registers)
_PARALLEL_GRAIN = 32768  # at::internal::GRAIN_SIZE: elementwise ops split ranges over threads above this size
_GEMM_MIN_ROWS = 12  # from 12 rows on, every M takes the large-M micro-kernels


def _aligned_numel(n: int) -> int:
    """Smallest size >= ``n`` whose per-thread ranges (ATen: ``min(threads, ceil(n / grain))`` equal chunks) are all
    multiples of the SIMD stride."""
    threads = max(1, torch.get_num_threads())
    size = n
    while True:
        used = max(1, min(threads, -(-size // _PARALLEL_GRAIN)))
        step = _SIMD_STRIDE * used
        aligned = -(-size // step) * step
        if aligned == size:
            return size
        size = aligned


def pointwise(fn, x: torch.Tensor, batch_invariant: bool = True) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn`` whose result per element does not depend on ``x``'s shape (see above)."""
    if not batch_invariant or x.numel() == 0:
        return fn(x)
    n = x.numel()
    flat = x.reshape(-1)
    size = _aligned_numel(n)
    if size != n:
        flat = torch.nn.functional.pad(flat, (0, size - n))
    return fn(flat)[:n].view(x.shape)


def rsqrt(x: torch.Tensor, batch_invariant: bool = True) -> torch.Tensor:
    """``torch.rsqrt`` whose per-element result does not depend on the call. In fp32 both the SIMD and the scalar
    code compute ``1 / sqrt(x)`` with IEEE (correctly rounded) square root and division, so every element gets the
    same bits without padding (a decode step's norms take ~100 one-element calls); bf16 rounds differently in the
    scalar code and goes through :func:`pointwise`."""
    if x.dtype == torch.float32:
        return torch.rsqrt(x)
    return pointwise(torch.rsqrt, x, batch_invariant)


def linear(x: torch.Tensor, weight: torch.Tensor, batch_invariant: bool = True) -> torch.Tensor:
    """``F.linear(x, weight)`` whose rows do not depend on how many rows are computed together (see above)."""
    if not batch_invariant or x.dtype != torch.float32:
        return torch.nn.functional.linear(x, weight)
    flat = x.reshape(-1, x.shape[-1])
    out = _gemm_rows(lambda m: torch.nn.functional.linear(m, weight), flat)
    return out.view(*x.shape[:-1], weight.shape[0])


def _gemm_rows(fn, flat: torch.Tensor) -> torch.Tensor:
    """``fn(flat)`` for a row-wise fp32 GEMM ``fn`` of ``flat [M, K]``, with zero rows added (their results dropped)
    when M is below ``_GEMM_MIN_ROWS`` and not a multiple of 4, so that a small M takes the large-M micro-kernels."""
    m = flat.shape[0]
    if m == 0 or m >= _GEMM_MIN_ROWS or m % 4 == 0:
        return fn(flat)
    return fn(torch.nn.functional.pad(flat, (0, 0, 0, -m % 4)))[:m]


def row_bucket(m: int) -> int:
    """The row count to run an ``m``-row GEMM at: ``m`` itself up to 16, above that ``m`` rounded up to one of 8 steps
    per power of two (at most 1/8 extra rows). For the experts of a prefill, whose row counts change from call to
    call: oneDNN builds, JIT-compiles and caches a bf16 GEMM per row count (~1 MB each, up to 1024 of them), so
    unbucketed counts grow the process by about a gigabyte over a long prefill; bucketed, the shapes in use are a few
    dozen. The padding rows are zeros and their results are dropped; the other rows do not depend on the row count
    (bf16 GEMMs at every ``m``, fp32 ones through :func:`linear`)."""
    if m <= 16:
        return m
    step = 1 << (m.bit_length() - 4)  # 1/8 of the power of two below m
    return -(-m // step) * step


def _order_preserving_int(x: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Integer keys (``dtype``) ordered as the floats ``x`` (bf16 / fp16 / fp32; NaN not supported)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        bits, magnitude = x.view(torch.int16).to(dtype), 0x7FFF
    else:
        bits, magnitude = x.float().view(torch.int32).to(dtype), 0x7FFFFFFF
    return torch.where(bits < 0, bits ^ magnitude, bits)


def topk_indices(scores: torch.Tensor, k: int, batch_invariant: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` along the last dim, largest first.

    Batch-invariant: ties go to the lower index, so the result depends on the values only, not on the row length.
    """
    if not batch_invariant:
        return scores.topk(k, dim=-1).indices
    n = scores.shape[-1]
    # key = order bits above (reversed) index bits: a 16-bit float and at most 2^16 indices fit one int32 (half the
    # traffic of int64)
    dtype, shift = (torch.int32, 16) if scores.element_size() == 2 and n <= 1 << 16 else (torch.int64, 32)
    index = torch.arange(n, device=scores.device, dtype=dtype)
    keys = (_order_preserving_int(scores, dtype) << shift) | ((1 << shift) - 1 - index)
    return keys.topk(k, dim=-1).indices
