"""What is learned and how it is scored: the loss and the metric of a task, pluggable in the trainer.

* ``classification`` — cross-entropy on (N, classes) logits; metric top-1 accuracy (fraction correct).
* ``segmentation`` — per-pixel cross-entropy on (N, K, H, W) logits; metric mIoU (:mod:`onnxslim.training.segmentation`).

A task is any object with ``name``, ``metric_name``, ``loss(outputs, targets) -> Tensor`` and
``new_metric() -> Metric`` (``update(outputs, targets)``, ``compute() -> float``, larger is better).
:func:`register_task` adds one (segmentation with per-pixel cross-entropy and mIoU plugs in here);
:func:`task_for_dataset` picks the default for an :class:`~onnxslim.data.ArrayDataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from onnxslim.errors import OnnxSlimError


class Metric(Protocol):
    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None: ...

    def compute(self) -> float: ...


class Task(Protocol):
    name: str
    metric_name: str

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def new_metric(self) -> Metric: ...


class Top1:
    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.correct += int((outputs.argmax(1) == targets).sum())
        self.total += int(targets.numel())

    def compute(self) -> float:
        return self.correct / self.total if self.total else 0.0


class ClassificationTask:
    name = "classification"
    metric_name = "top1"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() != 2:
            raise OnnxSlimError(f"classification expects (N, classes) outputs, got {tuple(outputs.shape)}")
        return F.cross_entropy(outputs, targets)

    def new_metric(self) -> Top1:
        return Top1()


_TASKS: dict[str, Callable[[], Task]] = {"classification": ClassificationTask}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    _TASKS[name] = factory


def _register_builtin_tasks() -> None:
    # imported here, not at the top: the segmentation module registers itself through register_task
    from onnxslim.training import segmentation  # noqa: F401


def get_task(name: str) -> Task:
    if name not in _TASKS:
        _register_builtin_tasks()
    try:
        return _TASKS[name]()
    except KeyError:
        raise OnnxSlimError(f"unknown task {name!r}; available: {', '.join(_TASKS)}") from None


def task_for_dataset(dataset) -> Task:
    """``segmentation`` for per-pixel (N, H, W) labels, else ``classification``."""
    if getattr(dataset, "is_segmentation", False):
        return get_task("segmentation")
    return get_task("classification")
