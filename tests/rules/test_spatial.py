"""Spatial rules: pooling lets a positive mask scale through to the conv before it, unless indices are read."""

from __future__ import annotations

import pytest
from graphs import GraphBuilder, assert_equivalent

from onnxslim.graph.slim import slim


@pytest.mark.parametrize("pool", ["MaxPool", "AveragePool", "GlobalAveragePool"])
def test_a_positive_mask_scale_after_pooling_folds_into_the_conv(pool):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    attrs = {} if pool.startswith("Global") else {"kernel_shape": [2, 2], "strides": [2, 2]}
    y = g.op(pool, [g.op("Relu", [g.conv(x, 3, 4)])], **attrs)
    g.output(g.op("Relu", [g.mask(y, 4, zeros=[])]))  # a graph output holds every channel: no zero scale
    model = g.model()
    slimmed, report = slim(model)
    assert report.folded_masks == 1 and "Mul" not in [n.op_type for n in slimmed.graph.node]
    assert_equivalent(model, slimmed)


def test_maxpool_whose_indices_are_read_is_a_barrier_and_keeps_the_scale():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    pooled, indices = g.op("MaxPool", [g.conv(x, 3, 4)], outputs=2, kernel_shape=[2, 2], strides=[2, 2])
    g.output(g.op("Relu", [g.mask(pooled, 4, zeros=[])]), g.op("Cast", [indices], to=1))
    model = g.model()
    slimmed, report = slim(model)
    assert report.folded_masks == 0
    assert_equivalent(model, slimmed)
