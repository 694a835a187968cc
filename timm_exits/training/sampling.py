"""Seeds and sampling that do not depend on the number of processes or on where a run was resumed: `seed_for`
derives a seed from (seed, epoch, sample, ...), and `ShardSampler` orders each epoch from (seed, e) and gives rank
``r`` of ``W`` every ``W``-th index, so ``W`` processes with batch ``B / W`` see the batches one process with batch
``B`` sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = [
    "seed_for",
    "ShardSampler",
]


def seed_for(*parts: int) -> int:
    """A 31-bit seed mixed from integers (e.g. seed, epoch, sample index); the same on every platform."""
    h = 0x345678
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFF)) * 0x100000001B3 % (1 << 61)
        h ^= h >> 29
    return h % (1 << 31)


# -------------------------------------------------------------------------------------- sampling
class ShardSampler(Sampler[int]):
    """Epoch order from (seed, epoch), sharded over ranks so that W ranks see one process's batches.

    Training (``batch_size`` given): the order is truncated to whole global batches of
    ``batch_size * num_replicas`` and rank ``r`` takes positions ``r, r + W, ...``; ``start_batch``
    skips batches already done in this epoch (resume). Evaluation (``batch_size`` None): rank ``r``
    takes every ``W``-th sample, no padding, so every sample is counted once.

    Args:
        length: Size of the data set.
        num_replicas: World size W.
        rank: This process's rank.
        shuffle: Shuffle each epoch.
        seed: Seed of the order.
        batch_size: Per-rank batch size (training), or None (evaluation).
    """

    def __init__(
        self,
        length: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        self.length = int(length)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and the first batch to yield."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches per epoch (training)."""
        if self.batch_size is None:
            raise ValueError("batches_per_epoch is defined for training samplers (batch_size given) only.")
        return self.length // (self.batch_size * self.num_replicas)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator()
        g.manual_seed(seed_for(self.seed, self.epoch, 0x5EED))
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.batch_size is None:
            return iter(order[self.rank :: self.num_replicas])
        usable = self.batches_per_epoch * self.batch_size * self.num_replicas
        mine = order[self.rank : usable : self.num_replicas]
        return iter(mine[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        if self.batch_size is None:
            return len(range(self.rank, self.length, self.num_replicas))
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
