"""MNIST segmentation data, the segmentation task (loss, mIoU) and the MobileNetV3-Small segmentation model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onnxslim.data import (
    MNIST_MEAN,
    MNIST_STD,
    compose_digit_canvases,
    load_dataset,
    mnist_digit_pools,
    mnist_segmentation,
    mnist_split,
    mnistseg_split_seed,
)
from onnxslim.errors import OnnxSlimError
from onnxslim.training.segmentation import IGNORE_INDEX, SegmentationMetric, SegmentationTask
from onnxslim.training.tasks import task_for_dataset
from onnxslim.validate.accuracy import mean_iou, segmentation_scores


@pytest.fixture(scope="module")
def pools():
    return mnist_digit_pools()


def test_dataset_is_deterministic_and_shaped():
    train, test = mnist_segmentation(train_images=12, test_images=6, seed=3)
    again_train, again_test = mnist_segmentation(train_images=12, test_images=6, seed=3)
    other, _ = mnist_segmentation(train_images=12, test_images=6, seed=4)
    assert np.array_equal(train.images, again_train.images) and np.array_equal(train.labels, again_train.labels)
    assert np.array_equal(test.labels, again_test.labels)
    assert not np.array_equal(train.labels, other.labels)
    assert train.images.shape == (12, 1, 64, 64) and train.images.dtype == np.float32
    assert train.labels.shape == (12, 64, 64) and train.labels.dtype == np.int64
    assert train.num_classes == 11 and train.is_segmentation and len(train.class_names) == 11
    # normalised: background pixels sit at (0 - mean) / std
    assert np.isclose(train.images.min(), -MNIST_MEAN / MNIST_STD, atol=1e-6)


def test_pools_are_the_mnist_split(pools):
    (train_digits, train_labels), (test_digits, test_labels) = pools
    train, test = mnist_split(28)
    assert len(train_digits) == len(train) and len(test_digits) == len(test)
    expected = (train_digits[:50].astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    assert np.allclose(expected, train.images[:50, 0], atol=1e-5)
    assert np.array_equal(test_labels, test.labels) and np.array_equal(train_labels, train.labels)


def test_labels_follow_the_source_ink(pools):
    (digits, digit_labels), _ = pools
    canvases, labels, placements = compose_digit_canvases(digits, digit_labels, 40, size=64, seed=1)
    threshold = 0.5 * 255
    # background is the majority, every image has 2-3 digits and at least one digit class
    assert (labels == 0).mean() > 0.8
    per_image = np.bincount([p.image for p in placements], minlength=40)
    assert per_image.min() >= 2 and per_image.max() <= 3
    assert set(np.unique(labels)) <= set(range(11)) and len(np.unique(labels)) > 5
    # a pixel is a digit pixel exactly where the canvas ink reaches the threshold
    assert np.array_equal(labels > 0, canvases >= threshold)
    for image in range(40):
        mine = [p for p in placements if p.image == image]
        assert len({label for label in np.unique(labels[image]) if label > 0}) >= 1
        best = np.zeros((64, 64), np.int64)  # the largest ink of any placement, and whose digit it is
        owner = np.zeros((64, 64), np.int64)
        for placement in mine:
            patch = np.zeros((64, 64), np.int64)
            patch[placement.y:placement.y + 28, placement.x:placement.x + 28] = digits[placement.pool_index]
            assert digit_labels[placement.pool_index] == placement.digit
            take = (patch >= threshold) & (patch > best)
            owner[take] = placement.digit + 1
            best = np.maximum(best, patch)
        assert np.array_equal(best, canvases[image])
        assert np.array_equal(np.where(canvases[image] >= threshold, owner, 0), labels[image])


def test_train_and_test_canvases_use_their_own_digits(pools):
    (train_digits, train_labels), (test_digits, test_labels) = pools
    train, test = mnist_segmentation(train_images=4, test_images=3, seed=0)
    # each split is the composition of its own pool (disjoint digits), with the normalised canvas as image
    for data, digits, labels, split in ((train, train_digits, train_labels, "train"),
                                        (test, test_digits, test_labels, "test")):
        canvases, expected, _ = compose_digit_canvases(digits, labels, len(data), seed=mnistseg_split_seed(0, split))
        assert np.array_equal(data.labels, expected)
        assert np.allclose(data.images[:, 0], (canvases / 255.0 - MNIST_MEAN) / MNIST_STD, atol=1e-5)
        assert data.name.startswith(f"mnistseg-{split}")


def test_load_dataset_resolves_mnistseg_specs():
    data = load_dataset("mnistseg:32", "train")
    assert data.images.shape[1:] == (1, 32, 32) and data.labels.shape[1:] == (32, 32) and data.num_classes == 11
    assert load_dataset("mnist", "test").labels.ndim == 1  # the original specs still work
    with pytest.raises(OnnxSlimError):
        load_dataset("mnistseg:abc")
    with pytest.raises(OnnxSlimError):
        load_dataset("mnistseg:16")
    with pytest.raises(OnnxSlimError):
        load_dataset("mnistseg:32", "val")


def test_bad_composition_parameters_are_errors(pools):
    (digits, digit_labels), _ = pools
    with pytest.raises(OnnxSlimError):
        compose_digit_canvases(digits, digit_labels, 2, digits_per_image=(3, 2))
    with pytest.raises(OnnxSlimError):
        compose_digit_canvases(digits, digit_labels, 2, ink_threshold=0.0)


# ----------------------------------------------------------------------------------------------------
# the task


def test_loss_is_mean_pixel_cross_entropy_ignoring_void():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.5]]]])  # (1, 3, 1, 2)
    labels = torch.tensor([[[0, 2]]])
    log_probs = torch.log_softmax(logits, 1)
    expected = -(log_probs[0, 0, 0, 0] + log_probs[0, 2, 0, 1]) / 2
    task = SegmentationTask()
    assert torch.isclose(task.loss(logits, labels), expected)
    ignored = torch.tensor([[[0, IGNORE_INDEX]]])
    assert torch.isclose(task.loss(logits, ignored), -log_probs[0, 0, 0, 0])
    with pytest.raises(OnnxSlimError):
        task.loss(logits[:, :, 0], labels)


def test_metric_on_hand_made_predictions():
    # 2 classes, 4 pixels: labels 0 0 1 1, predictions 0 1 1 1 -> IoU0 = 1/2, IoU1 = 2/3
    labels = torch.tensor([[[0, 0, 1, 1]]])
    predicted = torch.tensor([0, 1, 1, 1])
    logits = F.one_hot(predicted, 2).T.reshape(1, 2, 1, 4).float()
    metric = SegmentationMetric()
    metric.update(logits, labels)
    miou, dice, pixel_accuracy = metric.scores()
    assert miou == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert dice == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert pixel_accuracy == pytest.approx(3 / 4)
    assert metric.compute() == miou
    assert SegmentationMetric().compute() == 0.0


def test_metric_agrees_with_onnx_validation_miou():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 7, 9, generator=generator)
    labels = torch.randint(0, 5, (6, 7, 9), generator=generator)
    labels[0, 0, :3] = 3  # some structure, and a class that the predictions may miss
    metric = SegmentationMetric()
    for start in range(0, 6, 4):  # accumulated over batches
        metric.update(logits[start:start + 4], labels[start:start + 4])
    expected = mean_iou(logits.numpy(), labels.numpy())
    assert metric.compute() == pytest.approx(expected, abs=1e-12)
    # an absent class is skipped the same way
    labels[labels == 4] = 0
    logits[:, 4] = -100.0
    metric = SegmentationMetric()
    metric.update(logits, labels)
    assert metric.compute() == pytest.approx(mean_iou(logits.numpy(), labels.numpy()), abs=1e-12)
    assert metric.scores()[1] == pytest.approx(segmentation_scores(metric.confusion.numpy())[1])


def test_task_for_dataset_picks_segmentation():
    data, _ = mnist_segmentation(size=32, train_images=2, test_images=1)
    task = task_for_dataset(data)
    assert task.name == "segmentation" and task.metric_name == "miou"
    assert task_for_dataset(mnist_split(28)[1]).name == "classification"


# ----------------------------------------------------------------------------------------------------
# the model


def test_mobilenet_v3_small_seg_shapes_and_registry():
    from onnxslim.zoo import get_model, input_shape
    from onnxslim.zoo.segmentation import mobilenet_v3_small_seg

    model = mobilenet_v3_small_seg(num_classes=11, width=0.25).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 11, 64, 64)
    built = get_model("mobilenet_v3_small_seg", {"width": 0.25, "input_size": 32})
    with torch.no_grad():
        assert built.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 11, 32, 32)
    assert input_shape("mobilenet_v3_small_seg", {"input_size": 32}) == (1, 32, 32)
    with pytest.raises(OnnxSlimError):
        mobilenet_v3_small_seg(input_size=48)
