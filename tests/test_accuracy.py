"""Accuracy: top-1 against an independent numpy computation, mIoU/Dice on hand-made arrays."""

import numpy as np
import pytest
from _validate_models import fitted_linear_weights, linear_classifier, segmenter
from onnx import numpy_helper

from onnxslim.data import ArrayDataset, mnist_split
from onnxslim.errors import OnnxSlimError
from onnxslim.validate.accuracy import confusion_matrix, evaluate, mean_iou, segmentation_scores


@pytest.fixture(scope="module")
def mnist_linear():
    train, test = mnist_split()
    weight, bias = fitted_linear_weights(train.images[:2000], train.labels[:2000])
    return weight, bias, test.subset(500)


def numpy_top1(weight, bias, dataset):
    logits = dataset.images.reshape(len(dataset), -1) @ weight + bias
    return float(np.mean(np.argmax(logits, axis=1) == dataset.labels))


def test_top1_matches_numpy(mnist_linear):
    weight, bias, test = mnist_linear
    expected = numpy_top1(weight, bias, test)
    result = evaluate(linear_classifier(weight, bias), test, batch_size=64, progress=False)
    assert result.metric == "top1" and result.samples == len(test)
    assert result.value == pytest.approx(expected, abs=1e-9)
    assert result.top1 == result.value and result.miou is None and result.dice is None
    assert expected > 0.5  # the least-squares classifier really classifies, so agreement is meaningful


def test_fixed_batch_model_pads_last_batch(mnist_linear, tmp_path):
    weight, bias, test = mnist_linear
    subset = test.subset(10)  # 10 samples in batches of exactly 4: the last batch is padded
    path = tmp_path / "fixed.onnx"
    path.write_bytes(linear_classifier(weight, bias, input_shape=(4, 1, 28, 28)).SerializeToString())
    result = evaluate(path, subset, progress=False)
    assert result.samples == 10
    assert result.value == pytest.approx(numpy_top1(weight, bias, subset), abs=1e-9)


def test_miou_and_dice_by_hand():
    # 1 image, 2x3 pixels, 3 classes; class 2 appears in neither labels nor predictions -> skipped
    labels = np.array([[[0, 0, 1], [1, 1, 0]]])
    predictions = np.array([[[0, 1, 1], [1, 0, 0]]])
    confusion = confusion_matrix(predictions, labels, 3)
    # class 0: TP 2 (pixels (0,0),(1,2)), FN 1 (label 0 predicted 1), FP 1 -> IoU 2/4, Dice 4/6
    # class 1: TP 2, FN 1, FP 1 -> IoU 2/4, Dice 4/6
    miou, dice, pixel_accuracy = segmentation_scores(confusion)
    assert miou == pytest.approx(0.5)
    assert dice == pytest.approx(4 / 6)
    assert pixel_accuracy == pytest.approx(4 / 6)


def test_void_labels_are_ignored():
    labels = np.array([[[0, 255], [1, 1]]])
    predictions = np.array([[[0, 1], [1, 1]]])
    confusion = confusion_matrix(predictions, labels, 2)
    assert confusion.sum() == 3  # the 255 pixel is not counted
    assert segmentation_scores(confusion)[0] == pytest.approx(1.0)


def test_segmentation_evaluate_matches_naive_loop(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.standard_normal((6, 1, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 3, (6, 5, 7))
    model = segmenter(classes=4)  # class 3 may be predicted but never labelled
    dataset = ArrayDataset(images, labels, 4, "toy-seg")
    result = evaluate(model, dataset, batch_size=4, progress=False)

    w = numpy_helper.to_array(model.graph.initializer[0]).reshape(-1)
    b = numpy_helper.to_array(model.graph.initializer[1])
    predicted = np.argmax(images[:, 0][:, None] * w[None, :, None, None] + b[None, :, None, None], axis=1)
    ious, dices = [], []
    for c in range(4):
        tp = np.sum((predicted == c) & (labels == c))
        fp = np.sum((predicted == c) & (labels != c))
        fn = np.sum((predicted != c) & (labels == c))
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
            dices.append(2 * tp / (2 * tp + fp + fn))
    assert result.metric == "miou" and result.top1 is None
    assert result.value == pytest.approx(np.mean(ious))
    assert result.dice == pytest.approx(np.mean(dices))
    logits = images[:, 0][:, None] * w[None, :, None, None] + b[None, :, None, None]
    assert mean_iou(logits, labels) == pytest.approx(np.mean(ious))


def test_dataset_shape_mismatch_is_a_clear_error(mnist_linear):
    weight, bias, test = mnist_linear
    wrong = ArrayDataset(np.zeros((4, 1, 32, 32), np.float32), np.zeros(4, np.int64), 10, "wrong")
    with pytest.raises(OnnxSlimError, match="expects"):
        evaluate(linear_classifier(weight, bias), wrong, progress=False)


def test_missing_model_file(tmp_path, mnist_linear):
    with pytest.raises(OnnxSlimError, match="model not found"):
        evaluate(tmp_path / "nope.onnx", mnist_linear[2], progress=False)
