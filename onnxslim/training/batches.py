"""Training data for the trainer and the controller: any source of (inputs, targets) batches, and the
order in which an epoch visits it, sharded over data-parallel ranks.

Sources (:func:`as_source`):

* an :class:`~onnxslim.data.ArrayDataset` — batches by numpy fancy indexing (fast, in memory);
* ``(images, labels)`` arrays, numpy or torch — wrapped by :meth:`ArrayDataset.from_arrays`;
* any map-style ``torch.utils.data.Dataset`` whose items are ``(input, target)`` — batches are collated
  with ``torch.utils.data.default_collate``.

Order (:func:`epoch_indices`): epoch ``e`` of phase ``p`` is the permutation
``numpy.random.default_rng([seed, p, e]).permutation(N)``; with ``W`` ranks it is padded by repeating
its first indices to a multiple of ``W`` and rank ``r`` takes positions ``r, r + W, r + 2W, ...`` —
``torch.utils.data.DistributedSampler``'s padding and interleaving, applied to the trainer's
permutation. Each rank then cuts its share into batches of ``B / W`` (``B`` the global batch size), so
global batch ``k`` is the same set of samples for any ``W`` (the padded copies aside) and a one-process
run sees exactly the batches it always did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from onnxslim.data import ArrayDataset
from onnxslim.errors import OnnxSlimError


class BatchSource(Protocol):
    name: str
    is_segmentation: bool

    def __len__(self) -> int: ...

    def fetch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


class ArraySource:
    """Batches of an :class:`ArrayDataset` as CPU tensors."""

    def __init__(self, data: ArrayDataset):
        self.data = data
        self.name = data.name
        self.is_segmentation = data.is_segmentation

    def __len__(self) -> int:
        return len(self.data)

    def fetch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.ascontiguousarray(self.data.images[indices])),
                torch.from_numpy(np.ascontiguousarray(self.data.labels[indices])))


class TorchDatasetSource:
    """Batches of a map-style ``torch.utils.data.Dataset`` of ``(input, target)`` items."""

    def __init__(self, dataset: Any, name: str | None = None):
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        if len(dataset) == 0:
            raise OnnxSlimError(f"{self.name}: the dataset is empty")
        item = dataset[0]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise OnnxSlimError(f"{self.name}: items must be (input, target) pairs, got {type(item).__name__}")
        self.is_segmentation = torch.as_tensor(item[1]).dim() == 2  # per-pixel (H, W) targets

    def __len__(self) -> int:
        return len(self.dataset)

    def fetch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = torch.utils.data.default_collate([self.dataset[int(i)] for i in indices])
        return inputs.float(), targets.long()


def as_source(data: Any) -> BatchSource:
    """A :class:`BatchSource` for an ArrayDataset, ``(images, labels)`` arrays, a torch Dataset or a source."""
    if isinstance(data, (ArraySource, TorchDatasetSource)):
        return data
    if isinstance(data, ArrayDataset):
        return ArraySource(data)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ArraySource(ArrayDataset.from_arrays(*data))
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return TorchDatasetSource(data)
    raise OnnxSlimError(f"training data must be an ArrayDataset, (images, labels) arrays or a torch Dataset, "
                        f"got {type(data).__name__}")


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``B / W``; raises OnnxSlimError when the global batch does not split evenly over the ranks."""
    if batch_size % world_size:
        raise OnnxSlimError(f"the global batch size {batch_size} does not split over {world_size} processes; "
                            f"use a multiple of {world_size}")
    return batch_size // world_size


def steps_per_epoch(length: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: ``ceil(ceil(N / W) / (B / W))`` (``ceil(N / B)`` for one process)."""
    return math.ceil(math.ceil(length / world_size) / per_rank_batch(batch_size, world_size))


def epoch_indices(length: int, seed: int, phase: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's sample indices for the epoch, in order (module docstring)."""
    order = np.random.default_rng([seed, phase, epoch]).permutation(length)
    total = math.ceil(length / world_size) * world_size
    if total > length:
        order = np.concatenate([order, np.resize(order, total - length)])
    return order[rank::world_size]


def rank_batches(indices: np.ndarray, batch: int) -> Sequence[np.ndarray]:
    return [indices[start:start + batch] for start in range(0, len(indices), batch)]


def iterate(source: BatchSource, batch_size: int):
    """Every sample once, in order, in batches (evaluation)."""
    for start in range(0, len(source), batch_size):
        yield source.fetch(np.arange(start, min(start + batch_size, len(source))))


__all__ = ["ArraySource", "BatchSource", "TorchDatasetSource", "as_source", "epoch_indices", "iterate",
           "per_rank_batch", "rank_batches", "steps_per_epoch"]
