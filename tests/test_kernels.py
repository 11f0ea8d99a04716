"""The optional numba kernels (modeling/kernels.py) give the bits of the PyTorch path they replace."""

from __future__ import annotations

import pytest
import torch

from helpers import in_ci
from transformers_deepseek.modeling import kernels
from transformers_deepseek.modeling.cache_deepseek_v4 import _E2M1_SCALED, pack_index_keys, unpack_index_keys


@pytest.fixture(name="numba_kernels")
def numba_kernels_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
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
