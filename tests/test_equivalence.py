"""Equivalence: Polygraphy-style tolerance semantics and model-to-model comparison."""

import numpy as np
import pytest
from _validate_models import conv_net, linear_classifier

from onnxslim.errors import OnnxSlimError
from onnxslim.validate.equivalence import DiffMeter, compare_models, differences, mismatch_mask


def test_element_fails_only_when_both_tolerances_are_exceeded():
    reference = np.array([100.0, 100.0, 1.0, 1.0, 0.0])
    candidate = np.array([100.5, 102.0, 1.5, 1.05, 0.2])
    # |a-b| = 0.5, 2.0, 0.5, 0.05, 0.2 ; rtol*|b| with rtol=0.01 = 1.0, 1.0, 0.01, 0.01, 0
    mask = mismatch_mask(candidate, reference, atol=0.1, rtol=0.01)
    assert mask.tolist() == [False, True, True, False, True]
    # atol alone is a plain absolute bound; rtol alone a plain relative bound
    assert mismatch_mask(candidate, reference, atol=0.3, rtol=0.0).tolist() == [True, True, True, False, False]
    assert mismatch_mask(candidate, reference, atol=0.0, rtol=0.1).tolist() == [False, False, True, False, True]


def test_nan_and_zero_handling():
    absolute, relative = differences(np.array([np.nan, np.nan, 1.0, 0.0, np.inf]),
                                     np.array([np.nan, 1.0, 0.0, 0.0, np.inf]))
    assert absolute.tolist() == [0.0, np.inf, 1.0, 0.0, 0.0]
    assert relative.tolist() == [0.0, np.inf, np.inf, 0.0, 0.0]


@pytest.mark.parametrize("stat", ["max", "mean", "median"])
def test_statistic_modes(stat):
    reference = np.ones(10)
    candidate = reference.copy()
    candidate[0] = 2.0  # one element off by 1.0: max abs 1.0, mean 0.1, median 0
    figures = {"max": 1.0, "mean": 0.1, "median": 0.0}[stat]
    loose = DiffMeter("y", "y", atol=figures + 1e-9, rtol=0.0, error_stat=stat)
    loose.update(candidate, reference)
    assert loose.result().passed
    if figures > 0:
        tight = DiffMeter("y", "y", atol=figures / 2, rtol=0.0, error_stat=stat)
        tight.update(candidate, reference)
        assert not tight.result().passed
    elementwise = DiffMeter("y", "y", atol=0.5, rtol=0.0, error_stat="elemwise")
    elementwise.update(candidate, reference)
    result = elementwise.result()
    assert not result.passed and result.mismatches == 1 and result.max_abs == 1.0


def test_meter_accumulates_over_batches():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((3, 4, 5))
    candidate = reference + rng.standard_normal((3, 4, 5)) * 1e-3
    meter = DiffMeter("y", "y", atol=1e-3, rtol=0.0, error_stat="median")
    for i in range(3):
        meter.update(candidate[i], reference[i])
    result = meter.result()
    diff = np.abs(candidate - reference)
    assert result.elements == diff.size
    assert result.max_abs == pytest.approx(diff.max())
    assert result.mean_abs == pytest.approx(diff.mean())
    assert result.median_abs == pytest.approx(np.median(diff), rel=1e-6)
    assert result.mismatches == int(np.sum(diff > 1e-3))


def test_identical_models_are_equivalent():
    model = conv_net(8)
    result = compare_models(model, conv_net(8), samples=3, progress=False)
    assert result.passed and result.max_abs == 0.0 and result.samples == 3


def test_masked_channel_changes_are_measured():
    mask = np.ones(8)
    mask[:3] = 0
    result = compare_models(conv_net(8), conv_net(8, mask=mask), atol=1e-6, samples=4, progress=False)
    assert not result.passed and result.outputs[0].mismatches > 0 and result.max_abs > 1e-6


def test_incompatible_models_are_rejected():
    weight = np.zeros((784, 10), np.float32)
    with pytest.raises(OnnxSlimError, match="incompatible"):
        compare_models(conv_net(8, size=32), linear_classifier(weight, np.zeros(10)), progress=False)
