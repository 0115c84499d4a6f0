"""How a batch is split over the data-parallel workers of one run (``--workers-per-run``; the loaders of
``bench.data`` take a ``shard=(rank, world)``).

``batch_size`` is the global batch: every worker walks the same batches in the same order as one process and
takes its contiguous rows of each (``torch.tensor_split``'s split: the first ``size % world`` workers one row
more), so the workers' rows together, in rank order, are one process's batch. Not here: the loaders themselves
(``bench.loaders``), the process group and DDP (``bench.distributed``).
"""
from __future__ import annotations

from typing import Iterator

import torch

from bench.errors import BenchError


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of worker ``rank`` in a batch of ``size`` rows (``torch.tensor_split``'s split)."""
    q, r = divmod(size, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def check_shard(num_samples: int, batch_size: int, world: int, train: bool) -> None:
    """A training batch splits over ``world`` workers: ``batch_size`` divisible, no worker left without rows."""
    if world > 1 and train and batch_size % world:
        raise BenchError(f"batch_size {batch_size} is not divisible by {world} workers (it is the global batch: "
                         f"each worker takes batch_size / workers)")  # fmt: skip
    if world > 1 and train and 0 < num_samples % batch_size < world:
        raise BenchError(f"the last batch of an epoch holds {num_samples % batch_size} sample(s), fewer than the "
                         f"{world} workers: choose another batch_size")  # fmt: skip


class ShardedBatches(torch.utils.data.Sampler):
    """Worker ``rank``'s contiguous rows of every batch of ``batches`` (a ``BatchSampler``)."""

    def __init__(self, batches: torch.utils.data.BatchSampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[slice(*shard_bounds(len(batch), self.rank, self.world))]
