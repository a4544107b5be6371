"""Accuracy of an ONNX model over a labelled dataset, computed with onnxruntime.

The model's first output is taken as logits.

* Classification (labels of shape (N,)): logits (N, K) — or (N, K, 1, 1) — and top-1 accuracy
  ``mean(argmax_k logits[n, k] == label[n])``.
* Segmentation (labels of shape (N, H, W)): logits (N, K, H, W); the predicted class of a pixel is the
  arg-max over K. From the K x K confusion matrix C (rows = label, columns = prediction), per class c:
  ``IoU_c = C[c,c] / (sum_j C[c,j] + sum_i C[i,c] - C[c,c])`` and
  ``Dice_c = 2 C[c,c] / (sum_j C[c,j] + sum_i C[i,c])``.
  mIoU and mean Dice average over the classes present in the labels *or* the predictions (the
  background class 0 included); a class absent from both has no defined IoU and is skipped. Pixels
  whose label lies outside [0, K) — e.g. 255 "void" in VOC — are ignored. ``pixel_accuracy`` is
  ``trace(C) / sum(C)``.

A model whose leading input dimension is fixed (say 1) is fed batches of exactly that size; the last
batch is zero-padded and the padding's outputs dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from onnxslim.data import ArrayDataset, load_dataset
from onnxslim.errors import OnnxSlimError
from onnxslim.validate.runtime import (
    ModelSource,
    SessionOptions,
    create_session,
    input_specs,
    model_name,
    numpy_dtype,
)


@dataclasses.dataclass(frozen=True)
class AccuracyResult:
    """``metric`` is ``top1`` or ``miou``; ``value`` is that metric in [0, 1]; others None when not applicable."""

    metric: str
    value: float
    top1: float | None
    miou: float | None
    dice: float | None
    samples: int
    pixel_accuracy: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the label."""
    predictions = class_predictions(logits, labels)
    return float(np.mean(predictions == labels)) if len(labels) else 0.0


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts, rows = label, columns = prediction; labels outside [0, K) are ignored."""
    labels = labels.reshape(-1).astype(np.int64)
    predictions = predictions.reshape(-1).astype(np.int64)
    valid = (labels >= 0) & (labels < num_classes)
    index = labels[valid] * num_classes + predictions[valid]
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray) -> tuple[float, float, float]:
    """(mIoU, mean Dice, pixel accuracy) from a confusion matrix; see the module docstring."""
    confusion = confusion.astype(np.float64)
    true_positive = np.diag(confusion)
    label_count = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    union = label_count + predicted_count - true_positive
    present = union > 0  # classes absent from both labels and predictions are skipped
    if not present.any():
        return 0.0, 0.0, 0.0
    iou = true_positive[present] / union[present]
    dice = 2 * true_positive[present] / (label_count[present] + predicted_count[present])
    pixel_accuracy = float(true_positive.sum() / confusion.sum())
    return float(iou.mean()), float(dice.mean()), pixel_accuracy


def mean_iou(logits: np.ndarray, labels: np.ndarray) -> float:
    """mIoU of logits (N, K, H, W) against labels (N, H, W)."""
    num_classes = logits.shape[1]
    return segmentation_scores(confusion_matrix(class_predictions(logits, labels), labels, num_classes))[0]


def class_predictions(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Arg-max class per sample (labels (N,)) or per pixel (labels (N, H, W)), checking the shapes."""
    if labels.ndim == 1:
        if logits.ndim > 2 and all(d == 1 for d in logits.shape[2:]):
            logits = logits.reshape(logits.shape[0], -1)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise OnnxSlimError(f"classification needs logits of shape (N, K) for {labels.shape[0]} labels, "
                                f"the model gives {logits.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise OnnxSlimError(f"labels run from {labels.min()} to {labels.max()}, but the model gives "
                                f"{logits.shape[1]} classes: labels must be class indices 0..{logits.shape[1] - 1}")
        return np.argmax(logits, axis=1)
    if labels.ndim == 3:
        if logits.ndim != 4 or logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
            raise OnnxSlimError(f"segmentation needs logits of shape (N, K, H, W) matching labels {labels.shape}, "
                                f"the model gives {logits.shape}")
        return np.argmax(logits, axis=1)
    raise OnnxSlimError(f"labels must be (N,) for classification or (N, H, W) for segmentation, got {labels.shape}")


class AccuracyMeter:
    """Accumulates top-1 or the segmentation confusion matrix batch by batch."""

    def __init__(self, segmentation: bool):
        self.segmentation = segmentation
        self.correct = 0
        self.samples = 0
        self.confusion: np.ndarray | None = None

    def update(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Add one batch; returns the predictions (for agreement statistics)."""
        predictions = class_predictions(logits, labels)
        self.samples += len(labels)
        if not self.segmentation:
            self.correct += int(np.sum(predictions == labels))
            return predictions
        num_classes = logits.shape[1]
        batch = confusion_matrix(predictions, labels, num_classes)
        if self.confusion is None:
            self.confusion = batch
        else:
            if self.confusion.shape != batch.shape:
                raise OnnxSlimError("the number of classes changed between batches")
            self.confusion += batch
        return predictions

    def result(self) -> AccuracyResult:
        if not self.segmentation:
            top1 = self.correct / self.samples if self.samples else 0.0
            return AccuracyResult("top1", top1, top1=top1, miou=None, dice=None, samples=self.samples)
        confusion = self.confusion if self.confusion is not None else np.zeros((1, 1), np.int64)
        miou, dice, pixel_accuracy = segmentation_scores(confusion)
        return AccuracyResult("miou", miou, top1=None, miou=miou, dice=dice, samples=self.samples,
                              pixel_accuracy=pixel_accuracy)


def dataset_input(session, dataset: ArrayDataset, label: str):
    """The single image input of ``session`` and its fixed batch size (None when dynamic), checked against the data."""
    specs = input_specs(session)
    if len(specs) != 1:
        raise OnnxSlimError(f"{label}: evaluation on a dataset needs a model with one input, "
                            f"this one has {len(specs)}: {', '.join(s.name for s in specs)}")
    spec = specs[0]
    sample_shape = tuple(dataset.images.shape[1:])
    declared = spec.shape[1:]
    if len(declared) != len(sample_shape) or any(
            isinstance(d, int) and d > 0 and d != s for d, s in zip(declared, sample_shape)):
        raise OnnxSlimError(f"{label}: input {spec.name!r} expects {list(spec.shape)} but dataset "
                            f"{dataset.name} has samples of shape {list(sample_shape)}")
    fixed_batch = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    return spec, fixed_batch


def run_batches(session, dataset: ArrayDataset, batch_size: int, label: str) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """Yield ``(outputs, labels)`` per batch; handles models with a fixed batch dimension."""
    if batch_size < 1:
        raise OnnxSlimError(f"batch size must be >= 1, got {batch_size}")
    spec, fixed_batch = dataset_input(session, dataset, label)
    dtype = numpy_dtype(spec)
    step = fixed_batch or batch_size
    for images, labels in dataset.batches(step):
        count = len(images)
        if fixed_batch and count < fixed_batch:
            pad = np.zeros((fixed_batch - count, *images.shape[1:]), images.dtype)
            images = np.concatenate([images, pad])
        outputs = session.run(None, {spec.name: np.ascontiguousarray(images, dtype=dtype)})
        yield [np.asarray(o)[:count] for o in outputs], labels


def _as_dataset(dataset: ArrayDataset | str) -> ArrayDataset:
    return load_dataset(dataset) if isinstance(dataset, str) else dataset


def evaluate(model_or_path: ModelSource, dataset: ArrayDataset | str, batch_size: int = 256,
             progress: bool = True, threads: int = 1) -> AccuracyResult:
    """Top-1 (classifier) or mIoU/Dice (segmentation, when ``dataset.labels.ndim == 3``) of a model.

    ``dataset`` is an :class:`ArrayDataset` or a spec string for :func:`onnxslim.data.load_dataset`.
    """
    from tqdm import tqdm

    dataset = _as_dataset(dataset)
    label = model_name(model_or_path)
    session = create_session(model_or_path, SessionOptions(threads=threads))
    meter = AccuracyMeter(segmentation=dataset.is_segmentation)
    with tqdm(total=len(dataset), desc=f"accuracy {label}", unit="img", disable=not progress, leave=False) as bar:
        for outputs, labels in run_batches(session, dataset, batch_size, label):
            meter.update(outputs[0], labels)
            bar.update(len(labels))
    return meter.result()
