"""Optional compiled CPU kernels (numba) for the table lookups of the cache decode.

A decode step reads every stored indexer key (SPEC §4 Indexer scores all complete entries), so its cost grows with
the context. In eager PyTorch the lookup needs an int32 index tensor as large as the keys; a numba loop computes
each index in a register and writes the decoded values once. Results are the same bits as the PyTorch path (the
same table, read at the same index); ``tests/test_kernels.py`` checks every (scale, byte) pair.

Installed with ``pip install transformers-deepseek[fast]``. Without numba, or for tensors not on the CPU, callers
use their PyTorch path (``lookup_e2m1_pairs`` returns ``None``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

DISABLE_ENV = "TDSEEK_NO_NUMBA"  # set to 1 to use the PyTorch path even when numba is installed


@functools.cache
def _compiled() -> Any | None:
    """The jitted kernels, or None when numba is missing or disabled (imported on first use: numba's import costs
    about half a second, which a plain ``import transformers_deepseek`` should not pay)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    try:
        import numba
        import numpy as np
    except ImportError:
        return None

    @numba.njit(cache=True, boundscheck=False)
    def e2m1_pairs(codes, scales, table, out):  # pragma: no cover - compiled
        # codes [B, N, 16 * G] uint8, scales [B, N, G] uint8, table [256 * 256] int32, out [B, N, 16 * G] int32
        for b in range(codes.shape[0]):
            for t in range(codes.shape[1]):
                for g in range(scales.shape[2]):
                    base = np.int32(scales[b, t, g]) << 8
                    for j in range(g * 16, g * 16 + 16):
                        out[b, t, j] = table[base | np.int32(codes[b, t, j])]

    return e2m1_pairs


def available() -> bool:
    """True when the compiled kernels are in use."""
    return _compiled() is not None


def lookup_e2m1_pairs(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """``table[(scales[..., j // 16] << 8) | codes[..., j]]`` for uint8 ``codes [B, N, 16G]`` and ``scales [B, N, G]``
    (any strides) and an int32 ``table [65536]``: int32 ``[B, N, 16G]``. None when the kernels are unavailable."""
    kernel = _compiled()
    if kernel is None or codes.device.type != "cpu" or codes.dim() != 3:
        return None
    out = torch.empty(codes.shape, dtype=torch.int32)
    kernel(codes.numpy(), scales.numpy(), table.numpy(), out.numpy())
    return out
