"""Token batches shared by the torchrun worker and the single-process reference of tests/test_distributed.py."""

from __future__ import annotations

import torch

ROWS_PER_RANK = 1
SEQ_LEN = 24  # past two ratio-4 compressed entries and the 16-token window


def global_batch(vocab_size: int, world: int) -> torch.Tensor:
    """``[world * ROWS_PER_RANK, SEQ_LEN]`` token ids, the same on every rank and in the reference."""
    gen = torch.Generator().manual_seed(8)
    return torch.randint(0, vocab_size, (world * ROWS_PER_RANK, SEQ_LEN), generator=gen)


def micro_batch(vocab_size: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s rows of :func:`global_batch`."""
    return global_batch(vocab_size, world)[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
