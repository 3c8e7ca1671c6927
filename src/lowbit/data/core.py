"""In-memory datasets and the batch iterator every loader returns.

A dataset is two tensors (inputs, targets) held whole in memory. Iterating over batches draws one
permutation per epoch from a ``torch.Generator`` and slices it: no per-sample Python, no workers,
and the generator's state is all a checkpoint needs to replay the exact same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ArrayDataset", "BatchTransform", "DataSplits"]

#: A batched train-time transform (augmentation): ``f(x, generator) -> x``.
BatchTransform = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


@dataclass
class ArrayDataset:
    """Inputs ``x`` (N, ...) and targets ``y`` (N,) or (N, T) as tensors."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} samples but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> ArrayDataset:
        """Both tensors on ``device`` (a no-op when already there)."""
        return ArrayDataset(self.x.to(device), self.y.to(device))

    def subset(self, start: int, stop: int | None = None) -> ArrayDataset:
        """Samples ``start:stop`` (views, no copy)."""
        return ArrayDataset(self.x[start:stop], self.y[start:stop])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        transform: BatchTransform | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches.

        With ``shuffle`` one permutation is drawn from ``generator``; ``transform`` (augmentation) is
        applied to each whole batch with the same generator. With ``world_size > 1`` every rank draws
        the same permutation and keeps its contiguous ``batch_size / world_size`` share of each
        global batch (the last global batch is cut to a multiple of ``world_size`` so every rank
        does the same number of equal steps), which makes DDP's gradient average equal the
        single-process gradient of the global batch.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size > 1 and batch_size % world_size:
            raise ValueError(
                f"batch size {batch_size} is not divisible by the {world_size} processes"
            )
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator, device="cpu")
            if order.device != self.x.device:
                order = order.to(self.x.device)
        else:
            order = None
        for b in range(self.num_batches(batch_size, drop_last)):
            lo, hi = b * batch_size, min((b + 1) * batch_size, n)
            if world_size > 1:
                hi = lo + (hi - lo) // world_size * world_size
                if hi == lo:
                    break
            if order is None:
                x, y = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if transform is not None:
                x = transform(x, generator)
            if world_size > 1:
                share = (hi - lo) // world_size
                x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x, y


@dataclass
class DataSplits:
    """A dataset's train / valid / test splits after preprocessing, plus what a model needs to know.

    ``task`` is ``"classification"`` (``y`` is (N,) class ids) or ``"sequence"`` (character
    language modelling: ``x`` and ``y`` are (N, T) ids, ``y`` shifted by one). ``valid`` is None
    for split schemes without a validation set. ``augment`` is the train-time batch transform.
    """

    name: str
    train: ArrayDataset
    valid: ArrayDataset | None
    test: ArrayDataset
    num_classes: int
    task: str = "classification"
    augment: BatchTransform | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. (1, 28, 28) or (T,) for character sequences.

        Datasets streamed from disk (:class:`lowbit.data.imagenet.FolderDataset`) give it as
        ``sample_shape``."""
        shape = getattr(self.train, "sample_shape", None)
        if shape is not None:
            return tuple(shape)
        return tuple(self.train.x.shape[1:])

    def splits(self) -> dict[str, ArrayDataset]:
        """The splits that exist, by name."""
        out = {"train": self.train, "test": self.test}
        if self.valid is not None:
            out["valid"] = self.valid
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits().items())
        return f"DataSplits({self.name!r}, {sizes}, input_shape={self.input_shape}, classes={self.num_classes})"
