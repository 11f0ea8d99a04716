"""FP8 / FP4 weight-format math: properties, and bit-exact checks against the released-format golden fixtures.

Fixture facts these tests establish (figures printed with ``pytest -s``):
- dequantize -> quantize with the stored scale reproduces every FP8 / FP4 tensor and scale byte for byte;
- dequantize -> quantize with freshly computed scales reproduces the values always, and the bytes except in blocks
  whose largest magnitude is exactly half the format maximum (224 * s for e4m3, 3 * s for e2m1): there the ue8m0
  rule picks s/2 and doubles the codes. No value-only rule can do better: a block holding max 3 * s may come from
  (s, code 3) or (s/2, code 6);
- quantizing the tiny-bf16 master weights reproduces every FP8 scale and every element except exact bf16 ties: the
  released tensors were quantized from unrounded masters (double rounding), so bf16 masters cannot be bit-exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from helpers import require_fixture
from transformers_deepseek.quantization import (
    E2M1_VALUES,
    decode_e2m1,
    dequantize_fp4,
    dequantize_fp8_blocks,
    dequantize_wo_a,
    e8m0_to_float,
    encode_e2m1,
    float_to_e8m0,
    fp4_to_fp8,
    pack_fp4,
    quantize_fp4_e2m1,
    quantize_fp8_blocks,
    unpack_fp4,
)

PROPS = settings(max_examples=60, deadline=None)

# Every finite e4m3 magnitude, sorted; the RNE / tie references below are brute force over this grid.
_E4M3_ALL = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_GRID = torch.unique(_E4M3_ALL[torch.isfinite(_E4M3_ALL)].abs())
E4M3_MIDPOINTS = (E4M3_GRID[1:] + E4M3_GRID[:-1]) / 2
E2M1_GRID = torch.tensor(E2M1_VALUES)
E2M1_MIDPOINTS = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _ref_ue8m0(amax: float, qmax: float) -> float:
    """Independent reference: 2^ceil(log2(fp32(amax) * fp32(1/qmax))) in exact Python arithmetic."""
    a = float(torch.tensor(amax, dtype=torch.float32) * torch.tensor(1.0 / qmax, dtype=torch.float32))
    mantissa, exponent = math.frexp(a)  # a = mantissa * 2^exponent, mantissa in [0.5, 1)
    return 2.0 ** (exponent - 1) if mantissa == 0.5 else 2.0**exponent


def _ref_requantized_scale(block_max: torch.Tensor, scale: torch.Tensor, floor: float, qmax: float) -> torch.Tensor:
    """Reference scales for re-quantizing dequantized blocks: block amax = max |code| * old scale."""
    pairs = zip(block_max.flatten().tolist(), scale.flatten().tolist(), strict=True)
    return torch.tensor([_ref_ue8m0(max(m * s, floor), qmax) for m, s in pairs]).view_as(scale)


def _ref_rne(y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Brute-force round-to-nearest-even of |y| onto a sorted magnitude grid whose odd indices are odd codes."""
    dist = (y.abs().flatten()[:, None] - grid[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    candidates = dist == best
    # Ties: grid index parity is the mantissa's last bit for both e4m3 and e2m1 magnitude grids.
    even = candidates & (torch.arange(grid.numel()) % 2 == 0)
    idx = torch.where(even.any(dim=1), even.float().argmax(dim=1), candidates.float().argmax(dim=1))
    return (grid[idx] * torch.where(torch.signbit(y.flatten()), -1.0, 1.0)).view_as(y)


# ---------------------------------------------------------------------------------------------------------------------
# e8m0 scales
# ---------------------------------------------------------------------------------------------------------------------


def test_e8m0_decode_matches_torch_and_encode_inverts_it():
    raw = torch.arange(256, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    ours = e8m0_to_float(raw)
    assert torch.equal(ours[:255], raw[:255].float())
    assert torch.equal(ours[:255], torch.tensor([2.0 ** (b - 127) for b in range(255)]))
    assert torch.isnan(ours[255])
    assert torch.equal(_bytes(float_to_e8m0(ours[:255])), torch.arange(255, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [0.0, -1.0, 3.0, 0.75, float("inf"), float("nan"), 2.0**-130])
def test_float_to_e8m0_rejects_non_powers_of_two(bad):
    with pytest.raises(ValueError, match="wq_a.scale"):
        float_to_e8m0(torch.tensor([1.0, bad]), name="wq_a.scale")


@PROPS
@given(st.floats(min_value=1e-4, max_value=1e30, allow_subnormal=False), st.sampled_from([448.0, 6.0]))
def test_ue8m0_scale_is_exact_ceil_power_of_two(amax, qmax):
    w = torch.zeros(1, 32)
    w[0, 5] = amax
    if qmax == 448.0:
        _, scale = quantize_fp8_blocks(w, (1, 32))
    else:
        _, scale = quantize_fp4_e2m1(w, 32)
    assert e8m0_to_float(scale).item() == _ref_ue8m0(amax, qmax)


# ---------------------------------------------------------------------------------------------------------------------
# FP4 e2m1 codes and packing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)],
)
def test_e2m1_ties_round_to_even(value, expected):
    # SPEC §6 lists exactly these ties.
    x = torch.tensor([value, -value])
    assert decode_e2m1(encode_e2m1(x)).tolist() == [expected, -expected]


def test_e2m1_grid_codes_and_saturation():
    codes = torch.arange(16, dtype=torch.uint8)
    values = decode_e2m1(codes)
    assert values[:8].tolist() == list(E2M1_VALUES)
    assert values[8:].tolist() == [-v for v in E2M1_VALUES]
    assert torch.signbit(values[8])  # code 8 is -0.0
    assert torch.equal(encode_e2m1(values), codes)
    assert decode_e2m1(encode_e2m1(torch.tensor([6.5, 1e9, -7.0]))).tolist() == [6.0, 6.0, -6.0]


@PROPS
@given(st.lists(st.floats(min_value=-7.0, max_value=7.0, width=32), min_size=1, max_size=64))
def test_e2m1_encoding_is_nearest_even(xs):
    x = torch.tensor(xs, dtype=torch.float32)
    got = decode_e2m1(encode_e2m1(x))
    assert torch.equal(got, _ref_rne(x.clamp(-6, 6), E2M1_GRID))
    assert torch.equal(torch.signbit(got), torch.signbit(x))


@PROPS
@given(st.integers(1, 3), st.integers(1, 40), st.data())
def test_fp4_pack_unpack_round_trip(rows, pairs, data):
    codes = torch.tensor(data.draw(st.lists(st.integers(0, 15), min_size=rows * pairs * 2, max_size=rows * pairs * 2)))
    codes = codes.to(torch.uint8).view(rows, 2 * pairs)
    packed = pack_fp4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (rows, pairs)
    assert torch.equal(unpack_fp4(packed), codes)
    # element 2j in the LOW nibble (SPEC §3)
    assert torch.equal(_bytes(packed), codes[:, 0::2] | (codes[:, 1::2] << 4))
    raw = torch.tensor(data.draw(st.lists(st.integers(-128, 127), min_size=pairs, max_size=pairs)), dtype=torch.int8)
    assert torch.equal(pack_fp4(unpack_fp4(raw)), raw)


def test_pack_fp4_validation():
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_fp4(torch.tensor([1, 16]))
    with pytest.raises(TypeError, match="float32"):
        pack_fp4(torch.zeros(2))


# ---------------------------------------------------------------------------------------------------------------------
# FP8 / FP4 quantization properties
# ---------------------------------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 70), st.integers(1, 70))
blocks = st.sampled_from([(16, 16), (32, 8), (1, 32), (128, 128)])
magnitudes = st.sampled_from([1e-6, 1e-3, 0.02, 1.0, 300.0, 1e6])


def _weight(shape: tuple[int, int], seed: int, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * magnitude
    w[torch.rand(shape, generator=g) < 0.05] = 0.0  # some exact zeros (and -0.0 below)
    w[torch.rand(shape, generator=g) < 0.02] = -0.0
    return w.to(torch.bfloat16).float()


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    s = e8m0_to_float(scale).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return s[: shape[0], : shape[1]]


def _block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-block max |x|; edge blocks use only their own elements (plain loops: an independent reference)."""
    if x.shape[0] % block[0] == 0 and x.shape[1] % block[1] == 0:
        return x.abs().unflatten(0, (-1, block[0])).unflatten(-1, (-1, block[1])).amax(dim=(1, 3))
    out = torch.zeros(math.ceil(x.shape[0] / block[0]), math.ceil(x.shape[1] / block[1]))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].abs().max()
    return out


@PROPS
@given(shapes, blocks, magnitudes, st.integers(0, 2**31 - 1))
def test_fp8_quantization_matches_reference_and_error_bound(shape, block, magnitude, seed):
    w = _weight(shape, seed, magnitude)
    q, scale = quantize_fp8_blocks(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float8_e8m0fnu
    assert scale.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    # scale: exact ceil power of two of the block's own amax (edge blocks included), amax floored at 1e-4
    amax = _block_amax(w, block).clamp_min(1e-4)
    expected = torch.tensor([[_ref_ue8m0(a, 448.0) for a in row] for row in amax.tolist()])
    assert torch.equal(e8m0_to_float(scale), expected)
    s = _expand(scale, shape, block)
    y = w / s
    assert float(y.abs().max()) <= 448.0  # ceil scale => never saturates
    assert torch.equal(q.float(), _ref_rne(y, E4M3_GRID))  # RNE, sign of zero kept
    deq = dequantize_fp8_blocks(q, scale, torch.float32, block)
    assert torch.equal(deq, q.float() * s)
    # half an e4m3 ulp: 2^-4 relative in the normal range, 2^-10 * s in the subnormal range
    bound = torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10)
    assert bool(((deq - w).abs() <= bound).all())


@PROPS
@given(shapes, blocks, magnitudes, st.integers(0, 2**31 - 1))
def test_fp8_quantization_idempotent_on_quantized_values(shape, block, magnitude, seed):
    q, scale = quantize_fp8_blocks(_weight(shape, seed, magnitude), block)
    deq = dequantize_fp8_blocks(q, scale, torch.bfloat16, block)  # exact in bf16
    assert torch.equal(deq.float(), dequantize_fp8_blocks(q, scale, torch.float32, block))
    q_same, s_same = quantize_fp8_blocks(deq, block, scale=scale)
    assert torch.equal(_bytes(q_same), _bytes(q)) and torch.equal(_bytes(s_same), _bytes(scale))
    q2, s2 = quantize_fp8_blocks(deq, block)
    assert torch.equal(dequantize_fp8_blocks(q2, s2, torch.float32, block), deq.float())
    # bytes identical unless the block max is exactly 224 * s: then s/2 (same values), unless the amax floor forbids it
    block_max = _block_amax(q.float(), block)
    old = e8m0_to_float(scale)
    recomputed = _ref_requantized_scale(block_max, old, 1e-4, 448.0)
    assert torch.equal(e8m0_to_float(s2), recomputed)
    half = e8m0_to_float(s2) != old
    assert bool((block_max[half] == 224.0).all()) and torch.equal(e8m0_to_float(s2)[half], old[half] / 2)
    same = ~half.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]
    assert torch.equal(_bytes(q2)[same], _bytes(q)[same])


fp4_shapes = st.tuples(st.integers(1, 40), st.integers(1, 50).map(lambda n: 2 * n))


@PROPS
@given(fp4_shapes, st.sampled_from([32, 16, 8]), magnitudes, st.integers(0, 2**31 - 1))
def test_fp4_quantization_matches_reference_and_is_idempotent(shape, block, magnitude, seed):
    w = _weight(shape, seed, magnitude)
    packed, scale = quantize_fp4_e2m1(w, block)
    assert packed.dtype == torch.int8 and packed.shape == (shape[0], shape[1] // 2)
    assert scale.shape == (shape[0], math.ceil(shape[1] / block))
    amax = _block_amax(w, (1, block)).clamp_min(6.0 * 2.0**-126)
    expected = torch.tensor([[_ref_ue8m0(a, 6.0) for a in row] for row in amax.tolist()])
    assert torch.equal(e8m0_to_float(scale), expected)
    s = _expand(scale, shape, (1, block))
    values = decode_e2m1(unpack_fp4(packed))
    assert float((w / s).abs().max()) <= 6.0
    assert torch.equal(values, _ref_rne(w / s, E2M1_GRID))
    deq = dequantize_fp4(packed, scale, torch.bfloat16, block)
    assert torch.equal(deq.float(), values * s)  # exact in bf16
    # value error <= half the e2m1 step at that magnitude (0.25 below 2, 0.5 below 4, 1 up to 6), times s
    y = (w / s).abs()
    half_step = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0)) * s
    assert bool(((deq.float() - w).abs() <= half_step).all())
    # idempotence: given scale -> same bytes; recomputed scale -> same values, s/2 only where max |value| is 3 * s
    p_same, s_same = quantize_fp4_e2m1(deq, block, scale=scale)
    assert torch.equal(p_same, packed) and torch.equal(_bytes(s_same), _bytes(scale))
    p2, s2 = quantize_fp4_e2m1(deq, block)
    assert torch.equal(dequantize_fp4(p2, s2, torch.float32, block), deq.float())
    block_max, old = _block_amax(values, (1, block)), e8m0_to_float(scale)
    recomputed = _ref_requantized_scale(block_max, old, 6.0 * 2.0**-126, 6.0)
    assert torch.equal(e8m0_to_float(s2), recomputed)
    half = e8m0_to_float(s2) != old
    assert bool((block_max[half] == 3.0).all()) and torch.equal(e8m0_to_float(s2)[half], old[half] / 2)


def test_quantize_validation_names_the_tensor():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"'layers.0.attn.wq_a.weight'.*non-finite"):
        quantize_fp8_blocks(torch.tensor([[1.0, float("nan")]]), name="layers.0.attn.wq_a.weight")
    with pytest.raises(TypeError, match="int32"):
        quantize_fp8_blocks(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp4_e2m1(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="even number of columns to pack e2m1 pairs, got 7"):
        quantize_fp4_e2m1(torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"scale has shape \(1, 1\), expected \(1, 2\)"):
        quantize_fp8_blocks(w, (4, 4), scale=float_to_e8m0(torch.ones(1, 1)))
    q, s = quantize_fp8_blocks(w, (4, 4))
    with pytest.raises(ValueError, match=r"'x.weight': scale has shape \(1, 2\), expected \(1, 1\)"):
        dequantize_fp8_blocks(q, s, torch.float32, (4, 8), name="x.weight")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize_fp8_blocks(q.float(), s, torch.float32, (4, 4))
    with pytest.raises(TypeError, match="scale has dtype torch.int8"):
        dequantize_wo_a(q, s.view(torch.int8))


def test_fp8_saturates_with_given_scale():
    q, _ = quantize_fp8_blocks(torch.tensor([[1000.0, -1000.0, 240.0]]), (1, 3), scale=float_to_e8m0(torch.ones(1, 1)))
    assert q.float().tolist() == [[448.0, -448.0, 240.0]]


# ---------------------------------------------------------------------------------------------------------------------
# FP4 -> FP8 re-encode (convert.py --expert-dtype fp8)
# ---------------------------------------------------------------------------------------------------------------------


def _random_fp4(out: int, inp: int, spread: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    exps = 120 + torch.randint(0, spread + 1, (out, inp // 32), generator=g, dtype=torch.uint8)
    return pack_fp4(codes), exps.view(torch.float8_e8m0fnu)


def _check_fp4_to_fp8(packed: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, s8: torch.Tensor) -> None:
    out, inp = packed.shape[0], packed.shape[1] * 2
    assert q.dtype == torch.float8_e4m3fn and q.shape == (out, inp)
    assert s8.dtype == torch.float8_e8m0fnu and s8.shape == (out // 128, inp // 128)
    # new scale = max of the block's fp4 scales / 2^6
    fp4_scales = e8m0_to_float(scale).view(out // 128, 128, inp // 128, 4)
    assert torch.equal(e8m0_to_float(s8), fp4_scales.amax(dim=(1, 3)) / 64)
    # lossless; -0 codes become +0 like the official FP4_TABLE
    assert torch.equal(dequantize_fp8_blocks(q, s8, torch.float32), dequantize_fp4(packed, scale, torch.float32))
    assert not bool((_bytes(q) == 0x80).any())
    assert float(q.float().abs().max()) <= 384.0


@PROPS
@given(st.integers(1, 2), st.integers(1, 2), st.integers(0, 6), st.integers(0, 2**31 - 1))
def test_fp4_to_fp8_lossless_within_spread(ob, ib, spread, seed):
    packed, scale = _random_fp4(128 * ob, 128 * ib, spread, seed)
    _check_fp4_to_fp8(packed, scale, *fp4_to_fp8(packed, scale))


def test_fp4_to_fp8_constraints():
    packed, scale = _random_fp4(128, 128, 7, 0)
    scale = _bytes(scale).clone()
    scale[0, 0], scale[5, 1] = 120, 127  # spread exactly 2^7 in block (0, 0)
    scale = scale.view(torch.float8_e8m0fnu)
    with pytest.raises(ValueError, match=r"'layers.1.ffn.experts.3.w1.weight'.*block \(0, 0\) span 2\^7.*2\^6"):
        fp4_to_fp8(packed, scale, name="layers.1.ffn.experts.3.w1.weight")
    # wider spreads stay exact in e4m3 (subnormals) up to 2^14, and are refused beyond
    _check_fp4_to_fp8(packed, scale, *fp4_to_fp8(packed, scale, max_spread_log2=14))
    codes = unpack_fp4(packed)
    codes[0, :32] = 1  # 0.5 everywhere in the low-scale group
    scale = _bytes(scale).clone()
    scale[0, 0] = 127 - 15
    with pytest.raises(ValueError, match="not exact in e4m3"):
        fp4_to_fp8(pack_fp4(codes), scale.view(torch.float8_e8m0fnu), max_spread_log2=20)
    with pytest.raises(ValueError, match=r"'e.weight': FP4 -> FP8 needs .*multiples of 128, got out=64, in=128"):
        fp4_to_fp8(packed[:64], scale.view(torch.float8_e8m0fnu)[:64], name="e.weight")


# ---------------------------------------------------------------------------------------------------------------------
# Golden fixtures (released format)
# ---------------------------------------------------------------------------------------------------------------------

# fixture -> shards to read (None = all). tiny-ratio16 shares shards 1 and 3 with tiny-fp8-fp4.
RELEASED = {"tiny-fp8-fp4": None, "tiny-ratio16": ("model-00002-of-00003.safetensors",), "tiny-wide": None}


@dataclass(frozen=True)
class Pair:
    fixture: str
    name: str  # "<linear>.weight"
    weight: torch.Tensor
    scale: torch.Tensor


def _shards(checkpoint: Path, only: tuple[str, ...] | None) -> list[Path]:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    return [checkpoint / f for f in files if only is None or f in only]


def _load_released() -> list[Pair]:
    pairs: list[Pair] = []
    for fixture, only in RELEASED.items():
        for shard in _shards(require_fixture(f"{fixture}/checkpoint"), only):
            with safe_open(shard, framework="pt") as f:
                keys = set(f.keys())
                for key in sorted(keys):
                    dtype = f.get_slice(key).get_dtype()
                    if dtype not in ("F8_E4M3", "I8"):
                        continue
                    scale_key = key.removesuffix(".weight") + ".scale"
                    assert key.endswith(".weight") and scale_key in keys, f"{shard.name}: {key} has no {scale_key}"
                    pairs.append(Pair(fixture, key, f.get_tensor(key), f.get_tensor(scale_key)))
    return pairs


@pytest.fixture(scope="module")
def released(fixtures_dir: Path) -> list[Pair]:
    pairs = _load_released()
    assert pairs
    return pairs


def _fp8(pairs: list[Pair]) -> list[Pair]:
    return [p for p in pairs if p.weight.dtype == torch.float8_e4m3fn]


def _fp4(pairs: list[Pair]) -> list[Pair]:
    return [p for p in pairs if p.weight.dtype == torch.int8]


def test_fixture_inventory(released: list[Pair], fixtures_dir: Path):
    meta = json.loads((fixtures_dir / "tiny-fp8-fp4" / "meta.json").read_text())["checkpoint_tensors"]
    expected = {k for k, (dtype, _, _) in meta.items() if dtype in ("float8_e4m3fn", "int8")}
    assert {p.name for p in released if p.fixture == "tiny-fp8-fp4"} == expected
    for p in released:
        out, cols = p.weight.shape
        assert p.scale.dtype == torch.float8_e8m0fnu, p.name
        if p.weight.dtype == torch.float8_e4m3fn:
            assert p.scale.shape == (math.ceil(out / 128), math.ceil(cols / 128)), p.name
        else:
            assert ".ffn.experts." in p.name and p.scale.shape == (out, cols * 2 // 32), p.name
    print(f"\nreleased-format tensors: {len(_fp8(released))} FP8, {len(_fp4(released))} FP4")


def test_fixture_fp8_round_trip_bit_exact(released: list[Pair]):
    pairs = _fp8(released)
    exact_canonical = ambiguous_blocks = total_blocks = 0
    for p in pairs:
        deq = dequantize_fp8_blocks(p.weight, p.scale, torch.bfloat16, name=p.name)
        assert torch.equal(deq, dequantize_fp8_blocks(p.weight, p.scale, torch.float32).bfloat16()), p.name
        q, s = quantize_fp8_blocks(deq, scale=p.scale, name=p.name)
        assert torch.equal(_bytes(q), _bytes(p.weight)) and torch.equal(_bytes(s), _bytes(p.scale)), p.name
        q2, s2 = quantize_fp8_blocks(deq, name=p.name)
        assert torch.equal(dequantize_fp8_blocks(q2, s2, torch.float32), deq.float()), p.name
        half = _block_amax(p.weight.float(), (128, 128)) == 224.0
        old = e8m0_to_float(p.scale)
        assert torch.equal(e8m0_to_float(s2), torch.where(half, old / 2, old)), p.name
        same = ~half.repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
        assert torch.equal(_bytes(q2)[same], _bytes(p.weight)[same]), p.name
        exact_canonical += int(not bool(half.any()))
        ambiguous_blocks += int(half.sum())
        total_blocks += half.numel()
    print(
        f"\nFP8: {len(pairs)}/{len(pairs)} bit-exact with the stored scale; {exact_canonical}/{len(pairs)} with "
        f"recomputed scales ({ambiguous_blocks}/{total_blocks} blocks with max |q| = 224 re-encode at s/2)"
    )


def test_fixture_fp4_round_trip_bit_exact(released: list[Pair]):
    pairs = _fp4(released)
    exact_canonical = ambiguous_blocks = total_blocks = 0
    for p in pairs:
        deq = dequantize_fp4(p.weight, p.scale, torch.bfloat16, name=p.name)
        packed, s = quantize_fp4_e2m1(deq, scale=p.scale, name=p.name)
        assert torch.equal(packed, p.weight) and torch.equal(_bytes(s), _bytes(p.scale)), p.name
        p2, s2 = quantize_fp4_e2m1(deq, name=p.name)
        assert torch.equal(dequantize_fp4(p2, s2, torch.float32), deq.float()), p.name
        half = _block_amax(decode_e2m1(unpack_fp4(p.weight)), (1, 32)) == 3.0
        old = e8m0_to_float(p.scale)
        assert torch.equal(e8m0_to_float(s2), torch.where(half, old / 2, old)), p.name
        same = ~half.repeat_interleave(32, 1)
        assert torch.equal(unpack_fp4(p2)[same], unpack_fp4(p.weight)[same]), p.name
        exact_canonical += int(not bool(half.any()))
        ambiguous_blocks += int(half.sum())
        total_blocks += half.numel()
    print(
        f"\nFP4: {len(pairs)}/{len(pairs)} bit-exact with the stored scale; {exact_canonical}/{len(pairs)} with "
        f"recomputed scales ({ambiguous_blocks}/{total_blocks} blocks with max |value| = 3 re-encode at s/2)"
    )


def test_fixture_fp4_to_fp8_lossless(released: list[Pair]):
    pairs = _fp4(released)
    converted = refused = 0
    for p in pairs:
        out, cols = p.weight.shape[0], p.weight.shape[1] * 2
        fits = out % 128 == 0 and cols % 128 == 0
        if fits:
            exps = _bytes(p.scale).int().view(out // 128, 128, cols // 128, 4)
            fits = int((exps.amax((1, 3)) - exps.amin((1, 3))).max()) <= 6
        if not fits:
            with pytest.raises(ValueError, match=p.name):
                fp4_to_fp8(p.weight, p.scale, name=p.name)
            refused += 1
            continue
        _check_fp4_to_fp8(p.weight, p.scale, *fp4_to_fp8(p.weight, p.scale, name=p.name))
        converted += 1
    print(f"\nFP4 -> FP8: {converted}/{len(pairs)} expert tensors re-encoded losslessly, {refused} refused")


def test_fixture_dequantize_wo_a_as_convert_py(released: list[Pair]):
    pairs = [p for p in _fp8(released) if p.name.endswith("attn.wo_a.weight")]
    assert pairs
    for p in pairs:
        ours = dequantize_wo_a(p.weight, p.scale, name=p.name)
        # convert.py: view as [out/128, 128, in/128, 128] blocks, times scale[:, None, :, None] in fp32, bf16
        blocked = p.weight.unflatten(0, (-1, 128)).unflatten(-1, (-1, 128)).float()
        ref = (blocked * e8m0_to_float(p.scale)[:, None, :, None]).flatten(2, 3).flatten(0, 1).bfloat16()
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref), p.name


def test_fixture_bf16_masters_quantize_to_released(released: list[Pair], fixtures_dir: Path):
    """Quantizing the tiny-bf16 masters reproduces the fp8/fp4 checkpoint up to double rounding at bf16 ties."""
    checkpoint = require_fixture("tiny-bf16/checkpoint")
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    pairs = [p for p in released if p.fixture == "tiny-fp8-fp4"]
    fig = dict.fromkeys(["fp8_exact", "fp4_exact", "el", "el_diff", "blocks", "block_diff"], 0)
    for p in pairs:
        with safe_open(checkpoint / weight_map[p.name], framework="pt") as f:
            master = f.get_tensor(p.name)
        assert master.dtype == torch.bfloat16 and master.shape[0] == p.weight.shape[0], p.name
        y_master = master.float()
        if p.weight.dtype == torch.float8_e4m3fn:
            q, s = quantize_fp8_blocks(master, name=p.name)
            # every block scale agrees: no bf16 amax sits on a power-of-two boundary here
            assert torch.equal(_bytes(s), _bytes(p.scale)), p.name
            scale_ok = torch.ones(p.weight.shape, dtype=torch.bool)
            ours, theirs = q.float(), p.weight.float()
            y = y_master / _expand(p.scale, tuple(p.weight.shape), (128, 128))
            mids = E4M3_MIDPOINTS
            fig["fp8_exact"] += int(torch.equal(_bytes(q), _bytes(p.weight)))
        else:
            packed, s = quantize_fp4_e2m1(master, name=p.name)
            # a block scale may differ only where the bf16 amax * fp32(1/6) is exactly a power of two: the unrounded
            # master amax was just above it, so the released scale is the next power of two
            a = _block_amax(y_master, (1, 32)) * torch.tensor(1 / 6, dtype=torch.float32)
            exact_pow2 = (a.view(torch.int32) & 0x7FFFFF) == 0
            block_ok = _bytes(s) == _bytes(p.scale)
            assert bool(exact_pow2[~block_ok].all()), p.name
            assert torch.equal(e8m0_to_float(p.scale)[~block_ok], 2 * e8m0_to_float(s)[~block_ok]), p.name
            fig["blocks"] += block_ok.numel()
            fig["block_diff"] += int((~block_ok).sum())
            scale_ok = block_ok.repeat_interleave(32, 1)
            ours, theirs = decode_e2m1(unpack_fp4(packed)), decode_e2m1(unpack_fp4(p.weight))
            y = y_master / _expand(p.scale, tuple(theirs.shape), (1, 32))
            mids = E2M1_MIDPOINTS
            fig["fp4_exact"] += int(torch.equal(packed, p.weight) and torch.equal(_bytes(s), _bytes(p.scale)))
        diff = ((ours != theirs) | (torch.signbit(ours) != torch.signbit(theirs))) & scale_ok
        # every differing element is an exact tie of the bf16 master, and the release took the other neighbour
        assert bool(torch.isin(y[diff].abs(), mids).all()), p.name
        assert torch.equal((theirs[diff] - y[diff]).abs(), (ours[diff] - y[diff]).abs()), p.name
        assert torch.equal(torch.signbit(theirs), torch.signbit(y_master)), p.name  # sign of zero codes included
        fig["el"] += int(scale_ok.sum())
        fig["el_diff"] += int(diff.sum())
    n8, n4 = len(_fp8(pairs)), len(_fp4(pairs))
    print(
        f"\nbf16 masters -> released: {fig['fp8_exact']}/{n8} FP8 and {fig['fp4_exact']}/{n4} FP4 tensors bit-exact; "
        f"{fig['el_diff']}/{fig['el']} elements differ, all at exact bf16 ties (double rounding); "
        f"{fig['block_diff']}/{fig['blocks']} FP4 scales differ, all where the bf16 amax / 6 is a power of two"
    )
