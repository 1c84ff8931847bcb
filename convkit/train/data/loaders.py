"""Loaders with fastai's semantics for this chapter: pixels ÷255, an optional per-channel
``Normalize`` whose statistics come from one training batch, the training loader shuffled
with its incomplete last batch dropped, the validation loader in order. Batches come from
tensor indexing (no per-item Python work)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterator, Optional

import torch
from torch.utils.data import DistributedSampler

from convkit.train.data.datasets import Dataset

__all__ = ["TensorLoader", "DataLoaders", "batch_stats", "make_dataloaders"]


class TensorLoader:
    """Batches of (images, labels) from uint8 tensors, as fastai's DataLoader yields them.

    x [N, H, W] (or [N, C, H, W]) uint8, y [N] int64 -> batches of
    xb [bs, C, H, W] float32 (÷255, then (x - mean) / std when ``stats`` is given) and
    yb [bs] int64. With ``shuffle`` the order is a permutation drawn from ``seed`` and the
    epoch (``set_epoch``), so any epoch can be replayed exactly, e.g. after a resume.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 64,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if x.dim() == 3:
            x = x.unsqueeze(1)
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.stats = stats
        # This process's share when sharded (shard()): rank of world_size.
        self.rank = 0
        self.world_size = 1

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of this epoch (the Learner calls it before each epoch)."""
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> "TensorLoader":
        """Process ``rank``'s share of this loader among ``world_size`` (a new loader).

        A shuffled or drop_last loader (training) serves batches of batch_size / world_size
        (which must divide) from DistributedSampler over this loader's own permutation of the
        epoch: the processes' i-th batches together are this loader's i-th batch. Otherwise
        (validation) each process takes items rank, rank + world_size, ... in order, every item
        exactly once, in batches of batch_size."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
        if self.world_size != 1:
            raise ValueError("this loader is already a shard")
        training = self.shuffle or self.drop_last
        if training and self.batch_size % world_size != 0:
            raise ValueError(
                f"the training batch size {self.batch_size} is not divisible by the "
                f"{world_size} processes: use a batch size that is a multiple of {world_size}"
            )
        shard = copy.copy(self)
        shard.rank, shard.world_size = rank, world_size
        if training:
            shard.batch_size = self.batch_size // world_size
        return shard

    def _items(self) -> int:
        """How many items this process serves in an epoch."""
        n = len(self.x)
        if self.world_size == 1:
            return n
        if self.shuffle or self.drop_last:
            return n // self.world_size  # DistributedSampler(drop_last=True)
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self._items()
        if self.drop_last:
            return n // self.batch_size
        return (n + self.batch_size - 1) // self.batch_size

    def _stream_seed(self) -> int:
        # The epoch's stream is seeded with this + epoch: a distinct stream per (seed, epoch),
        # the multiplier keeping seeds and epochs apart.
        return self.seed * 1_000_003

    def order(self) -> torch.Tensor:
        """The indices of this epoch, in the order they are served: [N] int64."""
        n = len(self.x)
        if self.world_size > 1:
            if not (self.shuffle or self.drop_last):
                return torch.arange(self.rank, n, self.world_size)
            # DistributedSampler draws randperm(n) from seed + epoch: with our stream's seed it
            # is this loader's own permutation, dealt out rank by rank.
            sampler = DistributedSampler(range(n), num_replicas=self.world_size, rank=self.rank,
                                         shuffle=self.shuffle, seed=self._stream_seed(),
                                         drop_last=True)
            sampler.set_epoch(self.epoch)
            return torch.tensor(list(sampler), dtype=torch.int64)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator()
        generator.manual_seed(self._stream_seed() + self.epoch)
        return torch.randperm(n, generator=generator)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, H, W] -> the float32 batch the model sees."""
        xb = x.float().div_(255.0)
        if self.stats is not None:
            mean, std = self.stats
            xb = (xb - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return xb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        for i in range(len(self)):
            index = order[i * self.batch_size: (i + 1) * self.batch_size]
            yield self.decode(self.x[index]), self.y[index]

    def one_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch of the current epoch: xb [bs, C, H, W], yb [bs]."""
        return next(iter(self))


@dataclasses.dataclass
class DataLoaders:
    """The training and validation loaders of one data set."""

    train: TensorLoader
    valid: TensorLoader
    classes: list[str]
    name: str = ""

    @property
    def c(self) -> int:
        """The number of classes."""
        return len(self.classes)


def batch_stats(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a batch [bs, C, H, W] -> ([C], [C]), as fastai's
    ``Normalize`` computes them (torch's default, unbiased std)."""
    return xb.mean(dim=(0, 2, 3)), xb.std(dim=(0, 2, 3))


def make_dataloaders(
    data: Dataset, batch_size: int = 64, normalize: bool = False, seed: int = 0
) -> DataLoaders:
    """fastai's loaders for ``data``: train shuffled with drop_last, valid in order, the
    same batch size. ``normalize``: per-channel mean/std of ONE training batch (fastai's
    ``Normalize()`` without statistics), applied to every batch of both loaders."""
    train = TensorLoader(data.train_x, data.train_y, batch_size, shuffle=True, drop_last=True, seed=seed)
    valid = TensorLoader(data.valid_x, data.valid_y, batch_size, shuffle=False, drop_last=False)
    if normalize:
        if len(train) == 0:
            raise ValueError(
                f"normalize needs one full training batch: {len(data.train_x)} training items "
                f"is fewer than the batch size {batch_size}"
            )
        # fastai draws this batch from a fresh iteration of the training loader; ours is
        # the first batch of a shuffle no epoch uses (epoch -1).
        train.set_epoch(-1)
        xb, _ = train.one_batch()
        train.set_epoch(0)
        stats = batch_stats(xb)
        train.stats = stats
        valid.stats = stats
    return DataLoaders(train, valid, list(data.classes), data.name)
