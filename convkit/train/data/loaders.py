"""Loaders with fastai's semantics for this chapter: pixels ÷255, an optional per-channel
``Normalize`` whose statistics come from one training batch, the training loader shuffled
with its incomplete last batch dropped, the validation loader in order. Batches come from
tensor indexing (no per-item Python work)."""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch

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

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of this epoch (the Learner calls it before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        if self.drop_last:
            return n // self.batch_size
        return (n + self.batch_size - 1) // self.batch_size

    def order(self) -> torch.Tensor:
        """The indices of this epoch, in the order they are served: [N] int64."""
        if not self.shuffle:
            return torch.arange(len(self.x))
        generator = torch.Generator()
        # A distinct stream per (seed, epoch); the multiplier keeps seeds and epochs apart.
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.x), generator=generator)

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
