"""The shape-independent kernels behind ``batch_invariant=True`` (modeling/numerics.py), checked on this machine's
CPU kernels: an element's or a row's result must not depend on the size or offset of the call it is part of."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from transformers_deepseek.modeling.numerics import linear, pointwise, row_bucket, rsqrt, topk_indices

FUNCTIONS = {
    "exp": torch.exp,
    "sigmoid": torch.sigmoid,
    "rsqrt": torch.rsqrt,
    "silu": F.silu,
    "sqrtsoftplus": lambda s: F.softplus(s).sqrt(),
    "polar": lambda a: torch.polar(torch.ones_like(a), a),
}
SIZE = 100_000  # above the 32768-element grain, so the reference call is split over threads as well


@pytest.fixture(scope="module")
def reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(SIZE, generator=gen) * 8 + 0.01  # positive: rsqrt defined everywhere
    return {(n, dt): pointwise(fn, x.to(dt)) for n, fn in FUNCTIONS.items() for dt in (torch.float32, torch.bfloat16)
            if not (n == "polar" and dt == torch.bfloat16)}  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(FUNCTIONS)),
    bf16=st.booleans(),
    start=st.integers(0, SIZE - 1),
    length=st.integers(1, 70_000),
)
def test_pointwise_result_of_an_element_does_not_depend_on_the_call(reference, name, bf16, start, length):
    dtype = torch.bfloat16 if bf16 and name != "polar" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(SIZE, generator=gen) * 8 + 0.01).to(dtype)
    stop = min(SIZE, start + length)
    got = pointwise(FUNCTIONS[name], x[start:stop].view(1, -1))
    assert torch.equal(got.view(-1), reference[name, dtype][start:stop])


@settings(max_examples=60, deadline=None)
@given(bf16=st.booleans(), start=st.integers(0, SIZE - 1), length=st.integers(1, 300), tiny=st.booleans())
def test_rsqrt_result_of_an_element_does_not_depend_on_the_call(reference, bf16, start, length, tiny):
    """numerics.rsqrt: fp32 unpadded (SIMD and scalar code give the same bits), bf16 through pointwise(); short
    calls (scalar code only) against the reference's long call (SIMD), over the norms' range and beyond it."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(SIZE, generator=gen) * 8 + 0.01
    if tiny:  # mean squares of small activations, down to the subnormal range
        x = x * 2.0**-130
    x = x.to(dtype)
    full = torch.rsqrt(x) if dtype == torch.float32 else reference["rsqrt", dtype]
    if tiny and dtype == torch.bfloat16:
        full = rsqrt(x)
    stop = min(SIZE, start + length)
    assert torch.equal(rsqrt(x[start:stop].view(1, -1)).view(-1), full[start:stop])


def test_plain_elementwise_kernels_do_depend_on_the_call():
    """Why pointwise() exists: the same values through torch.sigmoid directly round differently by offset."""
    x = torch.rand(4096, generator=torch.Generator().manual_seed(1)) * 8 - 4
    full = torch.sigmoid(x)
    differs = any(
        not torch.equal(torch.sigmoid(x[i : i + n]), full[i : i + n]) for i in range(0, 64, 3) for n in (5, 7)
    )
    assert differs


@pytest.mark.parametrize("k_dim", [64, 256, 1024])
@pytest.mark.parametrize("n_dim", [8, 24, 256, 1000])
def test_fp32_linear_rows_do_not_depend_on_the_row_count(k_dim, n_dim):
    gen = torch.Generator().manual_seed(k_dim + n_dim)
    w, x = torch.randn(n_dim, k_dim, generator=gen), torch.randn(300, k_dim, generator=gen)
    full = linear(x, w)
    for m in [*range(1, 40), 63, 64, 65, 127, 128, 129, 200]:
        for start in (0, 7, 300 - m):
            assert torch.equal(linear(x[start : start + m], w), full[start : start + m]), (m, start)
    assert torch.equal(linear(x[:3].view(1, 3, k_dim), w), full[:3].view(1, 3, n_dim))


def test_topk_prefers_the_lower_index_on_ties_whatever_the_row_length():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.5]], dtype=torch.bfloat16)
    assert topk_indices(scores, 4).tolist() == [[1, 3, 2, 4]]
    padded = torch.cat([scores, torch.full((1, 90), float("-inf"), dtype=torch.bfloat16)], dim=-1)
    assert topk_indices(padded, 4).tolist() == [[1, 3, 2, 4]]
    mixed = torch.tensor([[-0.5, -2.0, float("-inf"), -0.5, 4.0]])
    assert topk_indices(mixed, 5).tolist() == [[4, 0, 3, 1, 2]]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_topk_selects_what_torch_selects_up_to_ties(n, k, seed, bf16):
    k = min(k, n)
    dtype = torch.bfloat16 if bf16 else torch.float32
    scores = torch.randn(3, n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    ours = topk_indices(scores, k)
    values = scores.gather(-1, ours)
    assert torch.equal(values, scores.topk(k, dim=-1).values)  # the same multiset of top values, in order
    assert torch.equal(ours, topk_indices(torch.cat([scores, scores.new_full((3, 17), float("-inf"))], -1), k))


def test_topk_int32_keys_of_bf16_rows_equal_the_int64_keys():
    """Rows of at most 2^16 bf16 scores take one int32 per key; one more column takes the int64 keys. Many ties,
    signed zeros, infinities: both give the same indices."""
    g = torch.Generator().manual_seed(0)
    scores = (torch.randint(-6, 7, (2, 1 << 16), generator=g) / 4).to(torch.bfloat16)
    scores[0, ::97] = -0.0
    scores[1, ::89] = float("-inf")
    scores[1, 5::1001] = float("inf")
    padded = torch.cat([scores, scores.new_full((2, 1), float("-inf"))], dim=-1)
    for k in (1, 512, 4096):
        assert torch.equal(topk_indices(scores, k), topk_indices(padded, k)), k


@pytest.mark.parametrize("layer", [0, 1], ids=["hash-routed", "score-routed"])
def test_moe_of_one_token_equals_its_row_of_a_batch(layer):
    """The MoE's one-token path (slices, a decode step) against its index-list path (a batch): top-6 of 16 experts,
    and a hash row that lists experts twice."""
    from transformers_deepseek import DeepseekV4Config
    from transformers_deepseek.modeling.modeling_deepseek_v4 import DeepseekV4MoE

    torch.manual_seed(0)
    config = DeepseekV4Config(
        vocab_size=64, hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=6,
        num_hash_layers=1, num_hidden_layers=2, compress_ratios=[0, 0, 0],
    )  # fmt: skip
    moe = DeepseekV4MoE(config, layer).to(torch.bfloat16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    tokens = 32
    ids = torch.randint(0, 64, (1, tokens))
    if layer == 0:
        moe.gate.tid2eid.copy_(torch.randint(0, 16, (64, 6)))
        moe.gate.tid2eid[5] = torch.tensor([3, 3, 7, 1, 7, 0])
        ids[0, 4] = 5
    x = torch.randn(1, tokens, 64).bfloat16()
    with torch.no_grad():
        batch = moe(x, ids)
        for t in range(tokens):
            assert torch.equal(moe(x[:, t : t + 1], ids[:, t : t + 1]), batch[:, t : t + 1]), t


def test_row_bucket_keeps_few_gemm_shapes_at_little_extra_work():
    buckets = [row_bucket(m) for m in range(1, 8193)]
    assert all(m <= b <= m * 1.125 for m, b in enumerate(buckets, 1))
    assert buckets == sorted(buckets) and all(row_bucket(b) == b for b in buckets)
    assert buckets[:16] == list(range(1, 17))  # small counts run as they are
    assert len(set(buckets[:4096])) <= 80  # vs 4096 shapes, each a JIT-compiled oneDNN GEMM in bf16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_runs_experts_at_bucketed_row_counts_with_the_rows_unchanged(dtype, monkeypatch):
    """A prefill's experts see row counts of numerics.row_bucket only, and padding changes no row's bits."""
    from transformers_deepseek import DeepseekV4Config
    from transformers_deepseek.modeling import modeling_deepseek_v4
    from transformers_deepseek.modeling.modeling_deepseek_v4 import DeepseekV4MoE

    torch.manual_seed(0)
    config = DeepseekV4Config(
        vocab_size=64, hidden_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        num_hash_layers=0, num_hidden_layers=1, compress_ratios=[0, 0],
    )  # fmt: skip
    moe = DeepseekV4MoE(config, 0).to(dtype)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rows_seen: list[int] = []
    for expert in moe.experts:
        expert.w1.register_forward_pre_hook(lambda _, args: rows_seen.append(args[0].shape[0]))
    x = torch.randn(1, 300, 64).to(dtype)
    with torch.no_grad():
        bucketed = [moe(x[:, :n], None) for n in (40, 77, 150, 300)]
        assert rows_seen and all(row_bucket(m) == m for m in rows_seen)
        routed = [moe.gate(x[0, :n], None)[1] for n in (40, 77, 150, 300)]
        counts = [c for ids in routed for c in torch.bincount(ids.flatten()).tolist()]
        assert any(row_bucket(c) != c for c in counts)  # some expert's rows were padded
        monkeypatch.setattr(modeling_deepseek_v4, "row_bucket", lambda m: m)
        plain = [moe(x[:, :n], None) for n in (40, 77, 150, 300)]
    for a, b in zip(bucketed, plain, strict=True):
        assert torch.equal(a, b)


def test_sinkhorn_of_few_tokens_equals_its_rows_of_a_long_call():
    """A few tokens (a decode step) take numpy's Sinkhorn loop, many take torch's: bit for bit the same matrices."""
    from transformers_deepseek.modeling.modeling_deepseek_v4 import _SINKHORN_NUMPY_TOKENS, sinkhorn_split

    gen = torch.Generator().manual_seed(0)
    hc, tokens = 4, 400
    mixes = torch.randn(1, tokens, (2 + hc) * hc, generator=gen) * torch.rand(1, tokens, 1, generator=gen) * 8
    scale, base = torch.rand(3, generator=gen) * 2, torch.randn((2 + hc) * hc, generator=gen)
    long = sinkhorn_split(mixes, scale, base, hc, 20, 1e-6)
    assert tokens > _SINKHORN_NUMPY_TOKENS
    for t0, n in [(0, 1), (17, 1), (399, 1), (40, 3), (100, _SINKHORN_NUMPY_TOKENS)]:
        short = sinkhorn_split(mixes[:, t0 : t0 + n], scale, base, hc, 20, 1e-6)
        for a, b in zip(short, long, strict=True):
            assert torch.equal(a, b[:, t0 : t0 + n]), (t0, n)
