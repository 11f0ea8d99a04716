"""The optional numba kernels (modeling/kernels.py) give the bits of the PyTorch path they replace."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator

import pytest
import torch

from helpers import in_ci
from transformers_deepseek.modeling import kernels
from transformers_deepseek.modeling.cache_deepseek_v4 import (
    _E2M1_SCALED,
    pack_index_keys,
    pack_kv,
    unpack_index_keys,
    unpack_kv,
)
from transformers_deepseek.modeling.numerics import fp8_simulate


@pytest.fixture(name="numba_kernels")
def numba_kernels_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Kernels on (fails under CI, which installs the test extra with numba; skips elsewhere without numba)."""
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    kernels._compiled.cache_clear()
    if not kernels.available():
        if in_ci():
            pytest.fail("numba is part of the test extra; CI must exercise the compiled kernels")
        pytest.skip("numba is not installed")
    yield
    kernels._compiled.cache_clear()


def _torch_path(monkeypatch: pytest.MonkeyPatch, fn, *args):
    with monkeypatch.context() as m:
        m.setenv(kernels.DISABLE_ENV, "1")
        kernels._compiled.cache_clear()
        assert not kernels.available()
        out = fn(*args)
    kernels._compiled.cache_clear()
    return out


def test_e2m1_lookup_matches_the_torch_path_for_every_scale_and_byte(numba_kernels, monkeypatch):
    # row t holds scale code t // 16 and bytes (16 t .. 16 t + 15) % 256: all 256 x 256 (scale, byte) pairs
    rows = torch.arange(4096)
    store = {
        "q": ((rows.view(-1, 1) * 16 + torch.arange(16)) % 256).to(torch.uint8).view(1, 4096, 16),
        "s": (rows // 16).to(torch.uint8).view(1, 4096, 1),
    }
    fast = unpack_index_keys(store)
    slow = _torch_path(monkeypatch, unpack_index_keys, store)
    assert fast.dtype == slow.dtype == torch.bfloat16
    assert torch.equal(fast.view(torch.int16), slow.view(torch.int16))  # bits, so NaN codes compare too
    assert kernels.lookup_e2m1_pairs(store["q"], store["s"], _E2M1_SCALED) is not None


def test_e2m1_lookup_of_a_strided_slice_of_a_batch(numba_kernels, monkeypatch):
    """A decode step reads ``store[:, a:b]`` slices; with several rows they are not contiguous."""
    keys = torch.randn(3, 700, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    store = {k: v[:, 123:611] for k, v in pack_index_keys(keys).items()}
    assert not store["q"].is_contiguous()
    fast = unpack_index_keys(store)
    assert torch.equal(fast, _torch_path(monkeypatch, unpack_index_keys, store))
    assert torch.equal(fast[1], unpack_index_keys({k: v[1:2].contiguous() for k, v in store.items()})[0])


@pytest.fixture(name="two_threads")
def two_threads_fixture(numba_kernels) -> Iterator[None]:
    """torch (hence the kernels) on two threads, with numba's threading layer able to use them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    layer = kernels._threading_layer()
    if layer not in ("omp", "tbb"):
        torch.set_num_threads(before)
        if in_ci():
            pytest.fail(f"numba's threading layer is {layer!r} on CI; the parallel kernels need omp or tbb")
        pytest.skip(f"numba's threading layer is {layer!r}: the kernels stay on one thread")
    yield
    torch.set_num_threads(before)


def _large_key_slices() -> dict[str, torch.Tensor]:
    """Two rows of 3000 keys, sliced as a decode step reads them (not contiguous): 2 x 2500 x 128 decoded values,
    above kernels.PARALLEL_MIN_VALUES."""
    keys = torch.randn(2, 3000, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    store = {k: v[:, 300:2800] for k, v in pack_index_keys(keys).items()}
    assert 2 * store["q"].numel() >= kernels.PARALLEL_MIN_VALUES and not store["q"].is_contiguous()
    return store


def test_e2m1_lookup_on_two_threads_gives_the_one_thread_bits(two_threads, monkeypatch):
    store = _large_key_slices()
    launched = []
    compiled = kernels._compiled()
    for name in ("e2m1_pairs", "e2m1_pairs_parallel"):
        monkeypatch.setitem(compiled, name, lambda *a, _f=compiled[name], _n=name: (launched.append(_n), _f(*a)))
    parallel = unpack_index_keys(store)
    with monkeypatch.context() as m:
        m.setattr(kernels, "PARALLEL_MIN_VALUES", 1 << 40)
        serial = unpack_index_keys(store)
    assert launched == ["e2m1_pairs_parallel", "e2m1_pairs"]
    assert torch.equal(parallel.view(torch.int16), serial.view(torch.int16))
    assert torch.equal(parallel, _torch_path(monkeypatch, unpack_index_keys, store))


def test_kernel_threads_follow_torch_and_the_size(two_threads):
    big = kernels.PARALLEL_MIN_VALUES
    assert kernels.parallel_threads(big) == 2
    assert kernels.parallel_threads(big - 1) == 1  # a launch would cost more than it saves
    torch.set_num_threads(1)  # the user's choice binds the kernels too
    assert kernels.parallel_threads(big) == 1


def _decode_in_child(store: dict[str, torch.Tensor], expected: bytes) -> None:
    # compared as bytes: a torch op that would use torch's own OpenMP pool hangs in a forked child
    got = unpack_index_keys(store).view(torch.int16).numpy().tobytes()
    os._exit(0 if got == expected else 3)


def test_a_forked_child_decodes_on_one_thread(two_threads):
    """GNU OpenMP's thread pool does not survive fork: a child of a process that launched a parallel kernel must not
    launch one (numba aborts the child), and still decodes the same values."""
    store = _large_key_slices()
    expected = unpack_index_keys(store).view(torch.int16).numpy().tobytes()  # the parent launches a parallel kernel
    assert kernels.parallel_threads(2 * store["q"].numel()) == 2
    child = multiprocessing.get_context("fork").Process(target=_decode_in_child, args=(store, expected))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0


def _every_e4m3_code_and_scale() -> dict[str, torch.Tensor]:
    # pair p = (scale code p // 256, e4m3 code p % 256) for p < 65536, 64 pairs per block (one scale each), 7 blocks
    # per row (448 nope dims), the last row padded with code 0 at scale code 0
    pairs = torch.arange(147 * 448) % (1 << 16)
    pairs[1 << 16 :] = 0
    return {
        "q": (pairs % 256).to(torch.uint8).view(1, 147, 448),
        "s": (pairs[::64] // 256).to(torch.uint8).view(1, 147, 7),
        "rope": torch.randn(1, 147, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    }


def test_e4m3_decode_matches_the_torch_path_for_every_scale_and_code(numba_kernels, monkeypatch):
    """bf16 output (rounded to nearest even, NaN as ATen's vectorized conversion) and fp32 output (into a strided
    view of a larger buffer, as the attention's key buffer is written), bit for bit."""
    store = _every_e4m3_code_and_scale()
    scale_of_value = store["s"].repeat_interleave(64, dim=-1).to(torch.int32)
    assert torch.unique(store["q"].to(torch.int32) + scale_of_value * 256).numel() == 256 * 256  # the claim above

    def both(s):
        buffer = torch.full((1, 147, 600), 7.0)
        return unpack_kv(s), unpack_kv(s, out=buffer[..., 50:562]), buffer

    (fast16, fast32, fast_buffer), (slow16, slow32, slow_buffer) = both(store), _torch_path(monkeypatch, both, store)
    assert torch.equal(fast16.view(torch.int16), slow16.view(torch.int16))
    assert torch.equal(fast32.view(torch.int32), slow32.view(torch.int32))
    assert torch.equal(fast_buffer.view(torch.int32), slow_buffer.view(torch.int32))  # nothing outside the view


def test_e4m3_decode_of_gathered_and_strided_stores(numba_kernels, monkeypatch):
    """4-d gathered entries ``[B, S, k, D]`` and a row slice of a batch (not contiguous)."""
    kv = torch.randn(2, 40, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    kv = torch.cat([fp8_simulate(kv[..., :448], 64), kv[..., 448:]], dim=-1)  # nope dims on the e4m3 grid
    store = pack_kv(kv, 64)
    sliced = {k: v[:, 3:31] for k, v in store.items()}
    gathered = {k: v[:, torch.tensor([[0, 5, 5], [39, 1, 2]])] for k, v in store.items()}
    for s in (sliced, gathered):
        fast = unpack_kv(s)
        assert torch.equal(fast, _torch_path(monkeypatch, unpack_kv, s))
    assert torch.equal(unpack_kv(store), kv)


@pytest.mark.parametrize("tokens", [1, 3, 16, 400])
def test_sinkhorn_kernel_matches_the_torch_and_numpy_loops(numba_kernels, monkeypatch, tokens):
    """The compiled Sinkhorn normalisation gives the matrices of the eager loops (numpy for a few tokens, torch for
    many) bit for bit, over logits from near-uniform to dominated by one entry (sums that round)."""
    from transformers_deepseek.modeling.modeling_deepseek_v4 import sinkhorn_split

    gen = torch.Generator().manual_seed(tokens)
    hc = 4
    spread = torch.logspace(-3, 1.5, tokens).view(1, tokens, 1)
    mixes = torch.randn(1, tokens, (2 + hc) * hc, generator=gen) * spread
    scale, base = torch.rand(3, generator=gen) * 2, torch.randn((2 + hc) * hc, generator=gen)
    fast = sinkhorn_split(mixes, scale, base, hc, 20, 1e-6)
    slow = _torch_path(monkeypatch, sinkhorn_split, mixes, scale, base, hc, 20, 1e-6)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    comb = fast[2].double()
    assert torch.allclose(comb.sum(-2), torch.ones(1, tokens, hc, dtype=torch.float64), atol=1e-5)  # normalised


@pytest.mark.parametrize(("bsz", "seqlen", "width", "dim"), [(2, 1, 640, 512), (1, 7, 192, 64)])
def test_softmax_block_kernel_gives_the_torch_loop_bits(numba_kernels, monkeypatch, bsz, seqlen, width, dim):
    """The attention's block recurrence in one compiled call equals the PyTorch loop bit for bit: logits whose scale
    grows from block to block (every rescale factor below one, products that round), empty slots masked."""
    from transformers_deepseek.modeling.modeling_deepseek_v4 import _blockwise_softmax_pv

    gen = torch.Generator().manual_seed(width)
    heads = 4
    growth = torch.linspace(0.5, 8.0, width).view(1, 1, 1, width)
    logits = torch.randn(bsz, seqlen, heads, width, generator=gen) * growth
    logits = logits.masked_fill(torch.rand(bsz, seqlen, 1, width, generator=gen) < 0.2, float("-inf"))
    values = torch.randn(bsz, seqlen, width, dim, generator=gen).bfloat16().float()
    nb = width // 64
    running = logits.view(bsz, seqlen, heads, nb, 64).transpose(2, 3).amax(-1).cummax(2).values
    pv = torch.randn(bsz, seqlen, nb, heads, dim, generator=gen)
    alpha = torch.exp(running[:, :, :-1] - running[:, :, 1:])
    assert (alpha < 1).any()
    assert kernels.softmax_blocks(pv, torch.rand(bsz, seqlen, nb, heads, generator=gen), alpha) is not None
    fast = _blockwise_softmax_pv(logits, values, torch.exp)
    slow = _torch_path(monkeypatch, _blockwise_softmax_pv, logits, values, torch.exp)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(("bsz", "seqlen", "entries", "key_slice"), [(1, 1, 4096, 8192), (2, 5, 3000, 1024)])
def test_fused_indexer_keys_select_what_the_torch_scores_select(
    numba_kernels, monkeypatch, bsz, seqlen, entries, key_slice
):
    """The indexer's top-k from the fused score-to-key kernel equals the torch path's (relu, weight, bf16 sum over
    heads, mask, keys): decode (one query), a chunk of queries that cannot see every entry, key slices with
    offsets. Scores are made to tie (coarse queries and keys) so that the order and index bits both matter."""
    from transformers_deepseek import DeepseekV4Config
    from transformers_deepseek.modeling import modeling_deepseek_v4
    from transformers_deepseek.modeling.modeling_deepseek_v4 import DeepseekV4Indexer

    monkeypatch.setattr(modeling_deepseek_v4, "_INDEX_KEY_SLICE", key_slice)
    gen = torch.Generator().manual_seed(entries)
    config = DeepseekV4Config(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_hash_layers=0, compress_ratios=[0, 4, 0],
        index_n_heads=8, index_head_dim=32, index_topk=512, q_lora_rank=32, qk_rope_head_dim=16, head_dim=80,
    )  # fmt: skip
    indexer = DeepseekV4Indexer(config, 4).to(torch.bfloat16)
    torch.nn.init.normal_(indexer.weights_proj.weight, std=1.0, generator=gen)
    x = torch.randn(bsz, seqlen, 64, generator=gen).bfloat16()
    q = torch.randint(-2, 3, (bsz, seqlen, 8, 32), generator=gen).bfloat16() * 0.5
    keys = torch.randint(-3, 4, (bsz, entries, 32), generator=gen).bfloat16() * 0.25
    # decode: the query sees every entry; a chunk: the first query sees 100 entries (fewer than k), the last all
    first = 399 if seqlen > 1 else 4 * entries - 1
    positions = torch.linspace(first, 4 * entries - 1, seqlen).long().expand(bsz, seqlen)
    with torch.no_grad():
        fast = indexer.select(x, q, lambda a, b: keys[:, a:b], positions, entries)
        slow = _torch_path(monkeypatch, indexer.select, x, q, lambda a, b: keys[:, a:b], positions, entries)
    assert fast.shape == (bsz, seqlen, 512)
    assert torch.equal(fast, slow)
    assert bool((fast == -1).any()) == (seqlen > 1)  # the chunk's first queries pick every entry they see, then -1
