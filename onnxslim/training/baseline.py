"""The dense baseline of a run: the dense model trained on for the mask training's epochs without masks.

:class:`BaselineJob` holds everything the training needs and pickles (model spec, dense weights, phases,
data, options, checkpoint path), so :mod:`onnxslim.pipeline` can run it in this process
(:func:`train_baseline`) or in a side process beside the mask training (:func:`train_baseline_timed`,
which imports only the training side: torch, not the ONNX one).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from onnxslim.data import ArrayDataset
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions, TrainResult


@dataclasses.dataclass(frozen=True)
class BaselineJob:
    """What training the dense baseline needs (picklable, for :class:`SideProcess`)."""

    spec: Any  # ModelSpec
    dense_state: dict[str, torch.Tensor]
    phases: list[PhaseConfig]
    train: ArrayDataset
    test: ArrayDataset | None
    options: TrainOptions
    checkpoint: Path
    extra: dict[str, Any]
    resume: bool


def train_baseline(job: BaselineJob) -> tuple[torch.nn.Module, TrainResult]:
    """The dense model of ``job`` trained on through its phases without masks (checkpoint ``baseline.pt``)."""
    model = job.spec.build()
    model.load_state_dict(job.dense_state)
    result = Trainer(model, job.train, test_data=job.test, options=job.options, checkpoint=job.checkpoint,
                     extra=job.extra).fit(job.phases, resume=job.resume)
    return model, result


def train_baseline_timed(job: BaselineJob) -> tuple[dict[str, torch.Tensor], TrainResult, float]:
    """For a side process (:class:`~onnxslim.training.side.SideProcess`): the baseline's weights, its
    TrainResult and the wall seconds it took; no progress bars."""
    started = time.perf_counter()
    model, result = train_baseline(dataclasses.replace(job, options=dataclasses.replace(job.options, progress=False)))
    return model.state_dict(), result, time.perf_counter() - started


__all__ = ["BaselineJob", "train_baseline", "train_baseline_timed"]
