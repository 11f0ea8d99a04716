"""Pure weight-format math for the released DeepSeek-V4 checkpoints (no modules, no I/O).

Formats (SPEC §3, §5.3):

- FP8 linears: ``weight`` float8_e4m3fn ``[out, in]`` + ``scale`` float8_e8m0fnu ``[ceil(out/128), ceil(in/128)]``;
  value = ``float(weight) * scale`` per 128x128 block.
- Routed experts: ``weight`` int8 ``[out, in/2]`` holding e2m1 pairs (element ``2j`` in the LOW nibble, codes 0-7 =
  0, .5, 1, 1.5, 2, 3, 4, 6, bit 3 = sign) + ``scale`` float8_e8m0fnu ``[out, in/32]``.

Rounding, as in the official kernels (SPEC §6, §7):

- scales are "ue8m0": ``s = 2^ceil(log2(amax * fp32(1/qmax)))`` computed with the exponent-bit trick
  (``exp(a) - 127 + (mantissa(a) != 0)``), with ``amax`` clamped from below (1e-4 for FP8, 6*2^-126 for FP4);
- values are ``x / s`` (exact: ``s`` is a power of two), clamped to ``[-qmax, qmax]`` (saturation, never inf/NaN),
  then rounded to nearest, ties to even (RNE) onto the e4m3 / e2m1 grid;
- all arithmetic is fp32, whatever the input dtype.

e8m0 bytes are produced and read through bit manipulation rather than torch casts: ``Tensor.to(float8_e8m0fnu)``
rounds to the nearest power of two, whereas the format needs the exact ceil computed by the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "E2M1_VALUES",
    "FP4_BLOCK_SIZE",
    "FP4_E2M1_MAX",
    "FP8_BLOCK_SIZE",
    "FP8_E4M3_MAX",
    "decode_e2m1",
    "dequantize_fp4",
    "dequantize_fp8_blocks",
    "dequantize_wo_a",
    "e8m0_to_float",
    "encode_e2m1",
    "float_to_e8m0",
    "fp4_to_fp8",
    "pack_fp4",
    "quantize_fp4_e2m1",
    "quantize_fp8_blocks",
    "unpack_fp4",
]

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
FP8_BLOCK_SIZE = (128, 128)
FP4_BLOCK_SIZE = 32
# SPEC §6: amax clamps of act_quant / fp4_act_quant, so an all-zero block still gets a finite, normal scale.
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
# convert.py cast_e2m1fn_to_e4m3fn: 6 * 2^6 = 384 <= 448 < 6 * 2^7, so FP4 scales within one 128x128 FP8 block may
# span at most 2^6 for every value to stay a normal e4m3 number.
FP4_TO_FP8_MAX_SPREAD_LOG2 = 6

# Magnitudes of e2m1 codes 0-7 (SPEC §3); code | 8 is the negative.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Code 8 decodes to -0.0 so that decode -> encode reproduces every byte (the official FP4_TABLE reads it as +0.0;
# the value is the same).
_E2M1_TABLE = torch.tensor([*E2M1_VALUES, *(-v for v in E2M1_VALUES)], dtype=torch.float32)

_E8M0_NAN = 0xFF
_E8M0_BIAS = 127


def _where(name: str | None) -> str:
    return f"tensor {name!r}: " if name else ""


def _require_dtype(t: torch.Tensor, dtypes: tuple[torch.dtype, ...], field: str, name: str | None) -> None:
    if t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{_where(name)}{field} has dtype {t.dtype}, expected {expected}")


def _require_2d(t: torch.Tensor, field: str, name: str | None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{_where(name)}{field} must be 2-D [out, in], got shape {tuple(t.shape)}")


def _require_finite(t: torch.Tensor, field: str, name: str | None) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{_where(name)}{field} has {bad} non-finite value(s); cannot quantize inf/NaN")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------------------------
# e8m0 (unsigned power-of-two) scales
# ---------------------------------------------------------------------------------------------------------------------


def _exponent_to_float(biased: torch.Tensor) -> torch.Tensor:
    """Biased exponents (int32, 0..255) -> fp32 ``2^(e-127)`` exactly; 255 -> NaN."""
    bits = (biased.to(torch.int32) << 23).view(torch.float32)  # exact for 1..254
    out = torch.where(biased == 0, torch.full_like(bits, 2.0**-127), bits)  # 2^-127 is an fp32 subnormal
    return torch.where(biased == _E8M0_NAN, torch.full_like(bits, float("nan")), out)


def _exponent_to_e8m0(biased: torch.Tensor) -> torch.Tensor:
    return biased.to(torch.uint8).view(torch.float8_e8m0fnu)


def _e8m0_exponent(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu -> biased exponent as int32 (the raw byte)."""
    return scale.view(torch.uint8).to(torch.int32)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode float8_e8m0fnu scales to fp32 exactly (``2^(byte-127)``; byte 255 is NaN)."""
    _require_dtype(scale, (torch.float8_e8m0fnu,), "scale", None)
    return _exponent_to_float(_e8m0_exponent(scale))


def float_to_e8m0(scale: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """Encode fp32 powers of two in ``[2^-127, 2^127]`` as float8_e8m0fnu exactly.

    Raises ValueError for anything else: e8m0 stores an exponent only, and silently rounding a scale would change
    every value of its block.
    """
    s = scale.float()
    bits = s.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    normal = (s > 0) & (exponent > 0) & (exponent < 255) & (mantissa == 0)
    subnormal_min = s == 2.0**-127
    if not bool((normal | subnormal_min).all()):
        bad = s[~(normal | subnormal_min)].flatten()[:4].tolist()
        raise ValueError(f"{_where(name)}scale values must be powers of two in [2^-127, 2^127], found e.g. {bad}")
    return _exponent_to_e8m0(torch.where(subnormal_min, torch.zeros_like(exponent), exponent))


def _scale_to_float(scale: torch.Tensor, name: str | None) -> torch.Tensor:
    # e8m0 is the release format; fp32/bf16 scales (reportedly "Base" releases, SPEC §8) are used as they are.
    _require_dtype(scale, (torch.float8_e8m0fnu, torch.float32, torch.bfloat16), "scale", name)
    if scale.dtype == torch.float8_e8m0fnu:
        return _exponent_to_float(_e8m0_exponent(scale))
    return scale.float()


def _given_exponent(
    scale: torch.Tensor, expected: tuple[int, int], weight_shape: tuple[int, ...], name: str | None
) -> torch.Tensor:
    """Validated biased exponents of caller-provided e8m0 scales."""
    _require_dtype(scale, (torch.float8_e8m0fnu,), "scale", name)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{_where(name)}scale has shape {tuple(scale.shape)}, expected {expected} for weight {weight_shape}"
        )
    exponent = _e8m0_exponent(scale)
    if bool((exponent == _E8M0_NAN).any()):
        raise ValueError(f"{_where(name)}scale contains NaN (e8m0 byte 0xFF)")
    return exponent


def _ue8m0_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Biased exponent of ``2^ceil(log2(amax * fp32(1/qmax)))``, the kernels' exponent-bit trick (SPEC §5.9, §6)."""
    # Multiply by the fp32 reciprocal, as the kernels do; amax/qmax can differ in the last bit.
    a = amax.float() * torch.tensor(1.0 / qmax, dtype=torch.float32, device=amax.device)
    bits = a.view(torch.int32)
    return ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------------
# FP8 e4m3, 128x128 blocks
# ---------------------------------------------------------------------------------------------------------------------


def _to_blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[out, in] -> [ceil(out/bo), bo, ceil(in/bi), bi], zero padded (zeros never raise a block's amax)."""
    out_dim, in_dim = x.shape
    bo, bi = block
    padded = F.pad(x, (0, _ceil_div(in_dim, bi) * bi - in_dim, 0, _ceil_div(out_dim, bo) * bo - out_dim))
    return padded.view(padded.shape[0] // bo, bo, padded.shape[1] // bi, bi)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or any(int(b) <= 0 for b in block):
        raise ValueError(f"block must be two positive ints (rows, cols), got {block!r}")
    return int(block[0]), int(block[1])


def quantize_fp8_blocks(
    weight: torch.Tensor,
    block: tuple[int, int] = FP8_BLOCK_SIZE,
    *,
    scale: torch.Tensor | None = None,
    amax_floor: float = FP8_AMAX_FLOOR,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight [out, in]`` to e4m3 with one ue8m0 scale per ``block`` (SPEC §3, §6).

    Returns ``(weight float8_e4m3fn [out, in], scale float8_e8m0fnu [ceil(out/bo), ceil(in/bi)])``. Per block:
    ``s = 2^ceil(log2(max(amax, amax_floor) * fp32(1/448)))``; ``q = e4m3_rne(clamp(w / s, -448, 448))``.
    Edge blocks (shape not a multiple of ``block``) use only the elements they contain.

    ``scale`` (e8m0, the shape above) re-encodes with given scales instead of computing them. The scale of a
    dequantized block is ambiguous when its largest value is exactly ``224 * s``: the rule above then picks ``s/2``
    (an equally exact encoding), so only passing the original scale reproduces the stored bytes in every case.
    """
    bo, bi = _check_block(block)
    _require_2d(weight, "weight", name)
    if not weight.is_floating_point() or weight.element_size() < 2:
        raise TypeError(f"{_where(name)}weight has dtype {weight.dtype}, expected a float dtype of >= 16 bits")
    _require_finite(weight, "weight", name)
    out_dim, in_dim = weight.shape
    blocks = _to_blocks(weight.float(), (bo, bi))  # [OB, bo, IB, bi]
    if scale is None:
        amax = blocks.abs().amax(dim=(1, 3)).clamp_min(amax_floor)  # [OB, IB]
        exponent = _ue8m0_exponent(amax, FP8_E4M3_MAX)
    else:
        exponent = _given_exponent(scale, (blocks.shape[0], blocks.shape[2]), tuple(weight.shape), name)
    scale = _exponent_to_float(exponent)[:, None, :, None]
    # Dividing by a power of two is exact; clamp = saturation; the e4m3 cast rounds to nearest even.
    q = (blocks / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(blocks.shape[0] * bo, blocks.shape[2] * bi)[:out_dim, :in_dim].contiguous()
    return q, _exponent_to_e8m0(exponent)


def dequantize_fp8_blocks(
    weight: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = FP8_BLOCK_SIZE,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """``float(weight) * scale`` per block, computed in fp32 and cast once to ``out_dtype`` (SPEC §3).

    ``weight`` float8_e4m3fn [out, in]; ``scale`` float8_e8m0fnu (or fp32) [ceil(out/bo), ceil(in/bi)].
    Exact in bf16/fp32 for e8m0 scales (3 mantissa bits times a power of two).
    """
    bo, bi = _check_block(block)
    _require_dtype(weight, (torch.float8_e4m3fn,), "weight", name)
    _require_2d(weight, "weight", name)
    _require_2d(scale, "scale", name)
    out_dim, in_dim = weight.shape
    expected = (_ceil_div(out_dim, bo), _ceil_div(in_dim, bi))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{_where(name)}scale has shape {tuple(scale.shape)}, expected {expected} "
            f"for weight {tuple(weight.shape)} with {bo}x{bi} blocks"
        )
    s = _scale_to_float(scale, name)
    s = s.repeat_interleave(bo, dim=0)[:out_dim].repeat_interleave(bi, dim=1)[:, :in_dim]  # [out, in]
    return (weight.float() * s).to(out_dtype)


def dequantize_wo_a(weight: torch.Tensor, scale: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """BF16 ``wo_a`` exactly as convert.py writes it: each 128x128 block times its scale in fp32, then bf16.

    The official model uses ``wo_a`` as a BF16 einsum weight without activation quantization (SPEC §3, §5.3).
    """
    _require_dtype(scale, (torch.float8_e8m0fnu, torch.float32), "scale", name)
    return dequantize_fp8_blocks(weight, scale, torch.bfloat16, FP8_BLOCK_SIZE, name=name)


# ---------------------------------------------------------------------------------------------------------------------
# FP4 e2m1, 1x32 blocks, two codes per byte
# ---------------------------------------------------------------------------------------------------------------------


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already scaled, |x| <= 6 after saturation) to e2m1 codes (uint8, 0-15), RNE.

    The grid step is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; ``torch.round`` rounds halves to even, and on each
    segment the even multiple of the step is the code with a zero mantissa bit, so ties go to even codes:
    0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (SPEC §6). Values beyond +-6 saturate to +-6.
    The sign bit follows the sign of ``x`` (including -0.0 and negatives that round to zero).
    """
    if not x.is_floating_point():
        raise TypeError(f"encode_e2m1 expects a float tensor, got {x.dtype}")
    x = x.float()
    mag = x.abs().clamp_max(FP4_E2M1_MAX)
    rounded = torch.where(
        mag < 2.0, torch.round(mag * 2.0) * 0.5, torch.where(mag < 4.0, torch.round(mag), torch.round(mag * 0.5) * 2.0)
    )
    # magnitudes {0, .5, 1, 1.5, 2} -> codes 0..4; 3 -> 5; 4 -> 6, 6 -> 7
    code = torch.where(rounded <= 2.0, rounded * 2.0, torch.where(rounded == 3.0, 5.0, rounded * 0.5 + 4.0))
    code = code.to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (integer tensor, 0-15) -> fp32 values; code 8 -> -0.0 (so decode/encode round-trips bytes)."""
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"decode_e2m1 expects integer codes, got {codes.dtype}")
    return _E2M1_TABLE.to(codes.device)[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 codes ``[..., n]`` (0-15, n even) into int8 ``[..., n/2]``; element 2j in the LOW nibble (SPEC §3)."""
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"pack_fp4 expects integer codes 0-15, got dtype {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(f"pack_fp4 expects codes in [0, 15], found range [{int(codes.min())}, {int(codes.max())}]")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: int8/uint8/float4_e2m1fn_x2 ``[..., m]`` -> uint8 codes ``[..., 2m]``."""
    _require_dtype(packed, (torch.int8, torch.uint8, torch.float4_e2m1fn_x2), "packed", None)
    b = packed.view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


def _check_fp4_pair(packed: torch.Tensor, scale: torch.Tensor, block: int, name: str | None) -> tuple[int, int]:
    _require_dtype(packed, (torch.int8, torch.uint8, torch.float4_e2m1fn_x2), "weight", name)
    _require_2d(packed, "weight", name)
    _require_2d(scale, "scale", name)
    out_dim, in_dim = packed.shape[0], packed.shape[1] * 2
    expected = (out_dim, _ceil_div(in_dim, block))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{_where(name)}scale has shape {tuple(scale.shape)}, expected {expected} for packed weight "
            f"{tuple(packed.shape)} (= {in_dim} e2m1 values per row, 1x{block} blocks)"
        )
    return out_dim, in_dim


def quantize_fp4_e2m1(
    weight: torch.Tensor,
    block: int = FP4_BLOCK_SIZE,
    *,
    scale: torch.Tensor | None = None,
    amax_floor: float = FP4_AMAX_FLOOR,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight [out, in]`` (in even) to packed e2m1 with one ue8m0 scale per 1x``block`` (SPEC §3, §6).

    Returns ``(packed int8 [out, in/2], scale float8_e8m0fnu [out, ceil(in/block)])``. Per block:
    ``s = 2^ceil(log2(max(amax, amax_floor) * fp32(1/6)))``; ``code = e2m1_rne(clamp(w / s, -6, 6))``.

    ``scale`` re-encodes with given scales. As for FP8, a dequantized block whose largest value is exactly ``3 * s``
    gets ``s/2`` from the rule above (codes doubled, same values); pass the original scale to reproduce the bytes.
    """
    if block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    _require_2d(weight, "weight", name)
    if not weight.is_floating_point() or weight.element_size() < 2:
        raise TypeError(f"{_where(name)}weight has dtype {weight.dtype}, expected a float dtype of >= 16 bits")
    out_dim, in_dim = weight.shape
    if in_dim % 2:
        raise ValueError(f"{_where(name)}weight needs an even number of columns to pack e2m1 pairs, got {in_dim}")
    _require_finite(weight, "weight", name)
    blocks = _to_blocks(weight.float(), (1, block)).squeeze(1)  # [out, IB, block]
    if scale is None:
        amax = blocks.abs().amax(dim=-1).clamp_min(amax_floor)  # [out, IB]
        exponent = _ue8m0_exponent(amax, FP4_E2M1_MAX)
    else:
        exponent = _given_exponent(scale, (out_dim, blocks.shape[1]), tuple(weight.shape), name)
    y = (blocks / _exponent_to_float(exponent)[..., None]).clamp(-FP4_E2M1_MAX, FP4_E2M1_MAX)
    codes = encode_e2m1(y).flatten(1)[:, :in_dim]  # [out, in]
    return pack_fp4(codes), _exponent_to_e8m0(exponent)


def dequantize_fp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = FP4_BLOCK_SIZE,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """``e2m1(packed) * scale`` per 1x``block``, fp32 then ``out_dtype`` (exact in bf16) -> ``[out, in]``."""
    out_dim, in_dim = _check_fp4_pair(packed, scale, block, name)
    values = decode_e2m1(unpack_fp4(packed))  # [out, in]
    s = _scale_to_float(scale, name).repeat_interleave(block, dim=1)[:, :in_dim]  # [out, in]
    return (values * s).to(out_dtype)


def fp4_to_fp8(
    packed: torch.Tensor,
    scale: torch.Tensor,
    *,
    name: str | None = None,
    max_spread_log2: int = FP4_TO_FP8_MAX_SPREAD_LOG2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless FP4 -> FP8 re-encode of an expert weight, as convert.py ``--expert-dtype fp8`` (SPEC §3).

    ``packed`` int8 [out, in/2] + ``scale`` e8m0 [out, in/32] -> ``(float8_e4m3fn [out, in], e8m0 [out/128, in/128])``.
    Per 128x128 block the new scale is ``max(fp4 scales) / 2^6`` and each value is multiplied by its power-of-two
    offset ``s / new_scale`` (at most 2^6, so |value| <= 6 * 2^6 = 384 <= 448). Code 8 (-0) becomes +0, as the
    official table reads it. Requires ``out`` and ``in`` to be multiples of 128 and, per block, fp4 scales spanning
    at most ``2^max_spread_log2`` (default 6, the official design bound; larger spreads are accepted up to the
    point where a value would not be exact in e4m3, which is always checked). Raises ValueError otherwise.
    """
    out_dim, in_dim = _check_fp4_pair(packed, scale, FP4_BLOCK_SIZE, name)
    _require_dtype(scale, (torch.float8_e8m0fnu,), "scale", name)
    bo, bi = FP8_BLOCK_SIZE
    if out_dim % bo or in_dim % bi:
        raise ValueError(
            f"{_where(name)}FP4 -> FP8 needs out and in to be multiples of {bo}, got out={out_dim}, in={in_dim}"
        )
    exponent = _e8m0_exponent(scale)  # [out, in/32]
    if bool((exponent == _E8M0_NAN).any()):
        raise ValueError(f"{_where(name)}scale contains NaN (e8m0 byte 0xFF)")
    groups = bi // FP4_BLOCK_SIZE
    exp_blocks = exponent.view(out_dim // bo, bo, in_dim // bi, groups)  # [OB, 128, IB, 4]
    block_max = exp_blocks.amax(dim=(1, 3))  # [OB, IB]
    spread = block_max - exp_blocks.amin(dim=(1, 3))
    if int(spread.max()) > max_spread_log2:
        ob, ib = divmod(int(spread.argmax()), spread.shape[1])
        raise ValueError(
            f"{_where(name)}fp4 scales of 128x128 block ({ob}, {ib}) span 2^{int(spread.max())}, "
            f"expected at most 2^{max_spread_log2} for a lossless FP8 re-encode"
        )
    new_exponent = block_max - FP4_TO_FP8_MAX_SPREAD_LOG2
    if int(new_exponent.min()) < 0:
        raise ValueError(
            f"{_where(name)}FP8 block scale would be 2^{int(new_exponent.min()) - _E8M0_BIAS}, "
            f"below the e8m0 minimum 2^-{_E8M0_BIAS}"
        )
    # offset = 2^(e - max + 6) per 1x32 group, an exact power of two.
    shift = exp_blocks - block_max[:, None, :, None] + FP4_TO_FP8_MAX_SPREAD_LOG2  # [OB, 128, IB, 4]
    offset = _exponent_to_float((shift + _E8M0_BIAS).clamp_min(0)).view(out_dim, -1)
    offset = offset.repeat_interleave(FP4_BLOCK_SIZE, dim=1)  # [out, in]
    values = decode_e2m1(unpack_fp4(packed)) + 0.0  # [out, in]; -0.0 + 0.0 = +0.0, like the official table
    q = (values * offset).to(torch.float8_e4m3fn)
    new_scale = _exponent_to_e8m0(new_exponent)
    # Only reachable with max_spread_log2 > 6: small values of low-scale groups leave the e4m3 normal range.
    if not torch.equal(
        dequantize_fp8_blocks(q, new_scale, torch.float32).abs(), dequantize_fp4(packed, scale, torch.float32).abs()
    ):
        raise ValueError(f"{_where(name)}fp4 scale spread too large: some values are not exact in e4m3")
    return q, new_scale
