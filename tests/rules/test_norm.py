"""Normalisation rules: BN gains for the ``bn`` criterion, masks after BN, scale folding, barriers."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, assert_equivalent, conv_channels, head, ops, slim_checked

from onnxslim.graph.prune import channel_scores, prune
from onnxslim.graph.slim import analyse, slim


def _conv_bn_model():
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    y = g.op("Relu", [g.bn(g.conv(x, 3, 6), 6)])
    g.output(g.conv(y, 6, 2))
    return g.model()


def test_bn_criterion_ranks_by_the_gamma_of_the_following_batchnorm():
    model = _conv_bn_model()
    analysis = analyse(model)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    gamma = analysis.index.constant(bn.input[1])
    scores = channel_scores(analysis, "bn")
    assert np.allclose(scores[bn.input[0]], np.abs(gamma))
    assert np.allclose(scores[model.graph.node[-1].output[0]], channel_scores(analysis, "l1")[model.graph.node[-1].output[0]])
    assert analysis.rule_for(bn).masks_go_after


def test_after_bn_placement_puts_the_mask_after_batchnorm():
    model = _conv_bn_model()
    slimmed, report, masked = prune(model, ratio=0.5, placement="after_bn")
    mul = next(n for n in masked.graph.node if n.op_type == "Mul")
    bn = next(n for n in masked.graph.node if n.op_type == "BatchNormalization")
    assert mul.input[0] == bn.output[0]
    assert report.layers[0].channels_after == 3
    assert_equivalent(masked, slimmed)


@pytest.mark.parametrize("norm", ["BatchNormalization", "InstanceNormalization"])
def test_a_mask_scale_after_a_normalisation_folds_into_its_scale_and_shift(norm):
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    y = g.conv(x, 3, 4)
    if norm == "BatchNormalization":
        y = g.bn(y, 4)
    else:
        y = g.op(norm, [y, g.const(g.weights(4) + 1, "s"), g.const(g.weights(4), "b")])
    g.output(g.conv(g.mask(y, 4, zeros=[1]), 4, 2))
    model = g.model()
    slimmed, report = slim(model)
    assert report.folded_masks == 1 and "Mul" not in [n.op_type for n in slimmed.graph.node]
    assert report.layers[0].channels_after == 3
    assert_equivalent(model, slimmed)


@pytest.mark.parametrize("op", ["LRN"])
def test_barrier_normalisations_keep_masked_channels(op):
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    y = g.mask(g.conv(x, 3, 4), 4, zeros=[1])
    g.output(g.conv(g.op(op, [y], **({"size": 3} if op == "LRN" else {})), 4, 2))
    model = g.model()
    slimmed, report = slim(model)
    assert report.deleted_masked_channels == 0
    assert any(f"barrier {op}" in kept.reason for kept in report.kept)
    assert_equivalent(model, slimmed)


def test_batchnorm_shift_makes_a_dead_filter_non_zero_and_a_mask_after_bn_deletes_it():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.bn(g.conv(x, 3, 6, dead=[0, 1], bias=False), 6)  # dead filters, but BN shifts them
    head(g, y, 6)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 4]

    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.bn(g.conv(x, 3, 6), 6), 6, zeros=[0, 1])])
    head(g, y, 6)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4]
    assert "Mul" not in ops(slimmed) and report.folded_masks == 1


def test_instance_norm_passes_channels():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.mask(g.conv(x, 3, 6), 6, zeros=[0, 2])
    y = g.op("InstanceNormalization", [y, g.const(np.ones(6, np.float32)), g.const(np.zeros(6, np.float32))])
    head(g, g.op("Relu", [y]), 6)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4]


@pytest.mark.parametrize("axis, expected", [(1, 6), (-1, 6), (2, 6)])
def test_lp_normalization_deletes_zero_channels_along_any_axis(axis, expected):
    """SSD's L2Norm as Paddle2ONNX and Caffe converters write it: LpNormalization (p=2) over the channels
    then a learned per-channel scale. A zero channel adds nothing to the norm and stays zero."""
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.mask(g.op("Relu", [g.conv(x, 3, 10)]), 10, zeros=[0, 3, 4, 7])
    y = g.op("LpNormalization", [y], axis=axis, p=2)
    head(g, g.op("Mul", [y, g.const(g.rng.uniform(5, 20, (1, 10, 1, 1)).astype(np.float32), "l2scale")]), 10)
    slimmed, report = slim_checked(g.model(), round_to=1)
    assert report.layers[0].channels_after == expected


def test_lp_normalization_over_channels_keeps_a_live_channel_masked_after_it():
    """A mask after the norm cannot delete a live channel: it is in the norm of the other channels."""
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("LpNormalization", [g.op("Relu", [g.conv(x, 3, 6)])], axis=1, p=1)
    head(g, g.mask(y, 6, zeros=[2, 5]), 6)
    model = g.model()
    slimmed, report = slim_checked(model, round_to=1)
    assert conv_channels(slimmed) == conv_channels(model)  # nothing deleted before the norm
    assert "LpNormalization" in ops(slimmed)
