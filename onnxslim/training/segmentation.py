"""The ``segmentation`` task: per-pixel cross-entropy and mean IoU, pluggable in the trainer.

* outputs: logits (N, K, H, W); targets: class indices (N, H, W) int64.
* loss: ``mean over labelled pixels of -log softmax(logits)[label]`` (``F.cross_entropy``); pixels
  labelled :data:`IGNORE_INDEX` (255, the VOC "void" convention) do not count.
* metric: the K x K confusion matrix (rows = label, columns = arg-max prediction) accumulated over
  batches; ``compute()`` returns mIoU computed by :func:`onnxslim.validate.accuracy.segmentation_scores`
  (the same formula ``onnxslim check`` uses on ONNX models: classes absent from both labels and
  predictions are skipped, labels outside [0, K) ignored). :meth:`SegmentationMetric.scores` gives mIoU,
  mean Dice and pixel accuracy.

Importing this module registers the task with :func:`onnxslim.training.tasks.register_task`, after
which :func:`~onnxslim.training.tasks.task_for_dataset` picks it for datasets with (N, H, W) labels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from onnxslim.errors import OnnxSlimError
from onnxslim.training.tasks import register_task
from onnxslim.validate.accuracy import segmentation_scores

IGNORE_INDEX = 255


def _check_shapes(outputs: torch.Tensor, targets: torch.Tensor) -> None:
    if outputs.dim() != 4 or targets.dim() != 3 or outputs.shape[0] != targets.shape[0] \
            or outputs.shape[2:] != targets.shape[1:]:
        raise OnnxSlimError(f"segmentation expects (N, K, H, W) outputs and (N, H, W) labels, got "
                            f"{tuple(outputs.shape)} and {tuple(targets.shape)}")


def confusion_counts(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """K x K int64 confusion matrix (rows = label, columns = arg-max class) of one batch, on the CPU."""
    _check_shapes(outputs, targets)
    classes = outputs.shape[1]
    predictions = outputs.detach().argmax(1).reshape(-1)
    labels = targets.detach().reshape(-1).to(torch.int64)
    valid = (labels >= 0) & (labels < classes)
    index = labels[valid] * classes + predictions[valid]
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes).cpu()


class SegmentationMetric:
    """Accumulated confusion matrix; ``compute()`` is the mIoU (fraction in [0, 1], larger is better)."""

    def __init__(self) -> None:
        self.confusion: torch.Tensor | None = None

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        batch = confusion_counts(outputs, targets)
        if self.confusion is None:
            self.confusion = batch
        elif self.confusion.shape != batch.shape:
            raise OnnxSlimError("the number of classes changed between batches")
        else:
            self.confusion += batch

    def scores(self) -> tuple[float, float, float]:
        """(mIoU, mean Dice, pixel accuracy); zeros before any update."""
        if self.confusion is None:
            return 0.0, 0.0, 0.0
        return segmentation_scores(self.confusion.numpy().astype(np.int64))

    def compute(self) -> float:
        return self.scores()[0]


class SegmentationTask:
    name = "segmentation"
    metric_name = "miou"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(outputs, targets)
        return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)

    def new_metric(self) -> SegmentationMetric:
        return SegmentationMetric()


register_task("segmentation", SegmentationTask)
