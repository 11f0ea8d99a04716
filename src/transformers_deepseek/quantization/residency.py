"""Keep the resident set of a loaded quantized model at the bytes its tensors hold (issue 4, ``bench/memory.py``).

transformers loads safetensors shards through private file mmaps. Tensors whose in-memory dtype equals the on-disk
one (the packed FP8 / FP4 weights and their scales: almost all of a released checkpoint) stay views of those mmaps;
the others are copied out of them (bf16 norms / compressor / head upcast to fp32, ``wo_a`` dequantized to bf16,
any option that re-encodes weights). The pages those copies were read from stay mapped - the mapping lives as long
as any tensor of the shard does - and so stay in the resident set beside their copies, and the conversion
temporaries stay in glibc's heap. Both are released here once loading is done:

- :func:`release_unreferenced_pages`: ``madvise(MADV_DONTNEED)`` on the pages of the checkpoint mappings that back no
  tensor of the model. Loading never writes into them, so such a page is clean: dropping it only removes it from the
  process (it would be re-read from the file if ever touched again), and no tensor of the model is affected;
- :func:`trim_heap`: ``malloc_trim(0)``, returning freed heap memory to the OS.

Both are best-effort and Linux/glibc-only; elsewhere they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from collections.abc import Iterable

import torch

MADV_DONTNEED = 4  # <sys/mman.h> on Linux (all architectures)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def file_mappings(paths: Iterable[str | os.PathLike]) -> list[tuple[int, int]]:
    """``[start, end)`` address ranges of this process's mappings of ``paths`` (from ``/proc/self/maps``)."""
    wanted = {os.path.realpath(p) for p in paths}
    out: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or os.path.realpath(fields[5].strip()) not in wanted:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end))
    except OSError:
        return []
    return out


def _storage_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """Merged ``[start, end)`` byte ranges of the (CPU) storages behind ``tensors``."""
    ranges = []
    for t in tensors:
        if t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        if storage.nbytes():
            ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def unreferenced_ranges(
    mappings: list[tuple[int, int]], used: list[tuple[int, int]], page: int = mmap.PAGESIZE
) -> list[tuple[int, int]]:
    """Page-aligned ``[start, end)`` ranges inside ``mappings`` that overlap no range of ``used`` (both sorted,
    ``used`` merged). A page partly used is kept."""
    out: list[tuple[int, int]] = []
    for m_start, m_end in sorted(mappings):
        cursor = m_start
        for u_start, u_end in used:
            if u_end <= m_start or u_start >= m_end:
                continue
            out.append((cursor, u_start))
            cursor = max(cursor, u_end)
        out.append((cursor, m_end))
    aligned = []
    for start, end in out:
        start = -(-start // page) * page  # round inward: pages shared with a used range are kept
        end = end // page * page
        if end > start:
            aligned.append((start, end))
    return aligned


def release_unreferenced_pages(tensors: Iterable[torch.Tensor], files: Iterable[str | os.PathLike]) -> int:
    """Drop from the resident set the pages of the mmapped ``files`` that back none of ``tensors`` (the model's
    parameters and buffers); returns the bytes advised. Only clean, unreferenced file pages are affected."""
    libc = _libc()
    mappings = file_mappings(files)
    if libc is None or not mappings:
        return 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    released = 0
    for start, end in unreferenced_ranges(mappings, _storage_ranges(tensors)):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
    return released


def trim_heap() -> bool:
    """Return the heap memory freed by load-time temporaries to the OS (glibc ``malloc_trim``)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
