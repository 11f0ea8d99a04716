"""Memory footprint of quantized models (issue 4): full-size V4-Flash / V4-Pro on the meta device vs the released
checkpoint size, the meta build vs a real load, and the resident set after loading (no pages kept twice).

Figures are printed with ``pytest -s``; ``bench/memory.py`` prints the same footprint beside the measured RSS.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import require_fixture
from transformers_deepseek import DeepseekV4Config
from transformers_deepseek.parity import checkpoint_dir
from transformers_deepseek.quantization.footprint import (
    meta_footprint,
    quantized_model_on_meta,
    released_config,
    tensor_bytes,
)
from transformers_deepseek.quantization.residency import file_mappings, unreferenced_ranges

MAX_RATIO = 1.15  # issue 4: bytes in memory <= 1.15x the released checkpoint


@pytest.fixture(scope="module")
def fixture_ckpt() -> Iterator[Path]:
    with checkpoint_dir(require_fixture("tiny-fp8-fp4")) as ckpt:
        yield ckpt


def _describe(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...], str]]:
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: (t.dtype, tuple(t.shape), type(model.get_submodule(k.rpartition(".")[0])).__name__)
            for k, t in named.items()}  # fmt: skip


def test_meta_build_is_what_loading_gives(fixture_ckpt):
    """The meta-device model has exactly the modules, tensors, dtypes and shapes of a real quantized load."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(fixture_ckpt)
    meta = quantized_model_on_meta(DeepseekV4Config.from_pretrained(fixture_ckpt))
    assert all(t.is_meta for t in meta.parameters())
    assert _describe(meta) == _describe(loaded)
    assert tensor_bytes(meta) == tensor_bytes(loaded)


@pytest.mark.parametrize(
    ("name", "checkpoint_gb", "native_gib"),
    [("V4-Flash", 159.6, 529.6), ("V4-Pro", 864.7, 2929.9)],
)
def test_full_size_models_fit_in_checkpoint_size(name, checkpoint_gb, native_gib):
    fp = meta_footprint(released_config(name))
    ratio = fp["ours"] / fp["checkpoint"]
    print(
        f"\n{name}: ours {fp['ours'] / 2**30:.2f} GiB, released checkpoint {fp['checkpoint'] / 2**30:.2f} GiB "
        f"({fp['checkpoint'] / 1e9:.1f} GB), ratio {ratio:.4f}x; native bf16 {fp['native_bf16'] / 2**30:.1f} GiB"
    )
    assert fp["checkpoint"] / 1e9 == pytest.approx(checkpoint_gb, abs=0.1)  # the public sizes of the releases
    assert fp["native_bf16"] / 2**30 == pytest.approx(native_gib, abs=0.1)
    assert ratio <= MAX_RATIO


def test_released_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="V4-Max"):
        released_config("V4-Max")


def test_meta_build_needs_a_quantized_config():
    with pytest.raises(ValueError, match="quantization_config"):
        quantized_model_on_meta(DeepseekV4Config())


# ---------------------------------------------------------------------------------------------------------------------
# Resident set after loading
# ---------------------------------------------------------------------------------------------------------------------
def test_unreferenced_ranges_keep_every_page_a_tensor_touches():
    p = 4096
    mappings = [(10 * p, 20 * p), (40 * p, 42 * p)]
    used = [(10 * p + 5, 12 * p + 1), (15 * p, 16 * p), (30 * p, 41 * p + 7)]
    # [12p+1, 15p) -> pages 13, 14; [16p, 20p) -> 16..19; the second mapping: only [41p+7, 42p) -> none whole.
    assert unreferenced_ranges(mappings, used, p) == [(13 * p, 15 * p), (16 * p, 20 * p)]
    assert unreferenced_ranges(mappings, [], p) == mappings
    assert unreferenced_ranges([(0, p)], [(0, 1)], p) == []


def _mapped_pages(mappings: list[tuple[int, int]]) -> set[int]:
    """Page numbers of ``mappings`` present in this process's page table (/proc/self/pagemap, bit 63)."""
    page, present = mmap.PAGESIZE, set()
    with open("/proc/self/pagemap", "rb") as f:
        for start, end in mappings:
            f.seek(start // page * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", f.read((end - start) // page * 8))):
                if entry >> 63:
                    present.add(start // page + i)
    return present


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux /proc")
def test_no_checkpoint_page_stays_resident_beside_its_copy(fixture_ckpt):
    """After loading, the shard mappings hold no page outside the tensors that still live in them: the pages read
    only to be converted (bf16 -> fp32, wo_a -> bf16) were released.

    Measured right after the load, page by page: reading a tensor afterwards can make the kernel map page-cache
    neighbours of the faulting page (fault-around), whatever the loader did."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture_ckpt)
    files = sorted(fixture_ckpt.glob("*.safetensors"))
    maps = file_mappings(files)
    if not maps:
        pytest.skip("checkpoint not memory-mapped by this transformers")
    mapped = _mapped_pages(maps)
    tensors = [*model.parameters(), *model.buffers()]
    page = mmap.PAGESIZE
    used_pages: set[int] = set()  # pages of the shard mappings that a tensor of the model lives in (even partly)
    for t in tensors:
        start = t.untyped_storage().data_ptr()
        if any(s <= start < e for s, e in maps):
            used_pages.update(range(start // page, -(-(start + t.untyped_storage().nbytes()) // page)))
    converted = sum(t.numel() * t.element_size() for t in tensors if t.dtype == torch.float32)
    stray = mapped - used_pages
    print(
        f"\nshard pages mapped {len(mapped) * page} B; pages holding model tensors {len(used_pages) * page} B; "
        f"fp32 copies {converted} B"
    )
    assert converted > 4 * page  # the fixture has converted tensors whose source pages must be gone
    assert mapped, "the load read no shard page in place"  # the measurement sees the mappings
    assert not stray, f"{len(stray) * page} B of released pages still mapped"
