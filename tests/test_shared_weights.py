"""Weights shared by several uses (an FPN head applied to every level) stay shared (issue #11 kind 8):
the uses are coupled, folds that would split a shared weight are not made, and the output is never
larger than the input in params or bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders_groups import export_both, shared_head_levels, slim_exact
from graphs import GraphBuilder, assert_equivalent
from torch import nn


def _dims(model) -> list[list[int]]:
    return sorted(list(t.dims) for t in model.graph.initializer)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        mask = torch.rand(1, 8, 1, 1) + 0.5
        mask[0, [1, 6]] = 0
        self.register_buffer("m", mask)
        self.bn.running_mean.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x)) * self.m))


class FPN(nn.Module):
    """Two levels (8x8 and 4x4) and one head applied to both (RetinaNet / FCOS style)."""

    def __init__(self):
        super().__init__()
        self.stem, self.down, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1), Head()

    def forward(self, x):
        p3 = torch.relu(self.stem(x))
        return self.head(p3), self.head(torch.relu(self.down(p3)))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_shared_fpn_head_stays_shared(exporter):
    torch.manual_seed(0)
    model = export_both(FPN(), (torch.randn(1, 3, 8, 8),))[exporter]
    slimmed, report = slim_exact(model)
    assert report.size_after <= report.size_before and report.params_after < report.params_before
    assert (report.masked_channels, report.deleted_masked_channels) == (4, 4)
    dims = _dims(slimmed)
    assert dims.count([6, 8, 3, 3]) == 1 and dims.count([4, 6, 1, 1]) == 1  # one head, sliced once


def test_a_shared_head_built_by_hand_with_a_shared_bn_and_mask():
    g = GraphBuilder()
    outputs = shared_head_levels(g, levels=3, zeros=[0, 5])
    g.output(*outputs)
    model = g.model()
    slimmed, report = slim_exact(model)
    assert report.deleted_masked_channels == 6 and report.params_after < report.params_before
    assert _dims(slimmed).count([6, 8, 3, 3]) == 1


def test_different_scales_after_a_shared_conv_are_not_folded_into_copies():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    shared = g.const(g.weights(6, 3, 3, 3))
    outputs = []
    for level in range(2):
        y = g.op("Conv", [x, shared], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        y = g.mask(y, 6, values=np.linspace(0.5, 1.5, 6).astype(np.float32) * (level + 1))
        outputs.append(g.conv(g.op("Relu", [y]), 6, 4))
    g.output(*outputs)
    model = g.model()
    slimmed, report = slim_exact(model)
    assert report.params_after <= report.params_before and report.size_after <= report.size_before
    assert _dims(slimmed).count([6, 3, 3, 3]) == 1


def _bias_through_reshape_copies(constant_node: bool = False):
    """conv -> Add(Reshape(b)) -> relu -> conv -> Add(Reshape(b)) -> relu -> conv -> mask (2 of 8) -> relu ->
    conv: one stored bias ``b`` (8), read through two Reshape nodes (normalisation folds them into two
    initializers); ``constant_node``: ``b`` is a Constant node, as old exporters wrote weights."""
    from onnx import helper, numpy_helper

    g = GraphBuilder(seed=1)
    x = g.input([1, 3, 8, 8])
    if constant_node:
        g.nodes.append(helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(
            np.linspace(-1, 1, 8).astype(np.float32), "b")))
        b = "b"
    else:
        b = g.const(np.linspace(-1, 1, 8).astype(np.float32))
    shape = g.const(np.array([1, 8, 1, 1], np.int64))
    y = g.op("Relu", [g.op("Add", [g.conv(x, 3, 8, bias=False), g.op("Reshape", [b, shape])])])
    z = g.op("Relu", [g.op("Add", [g.conv(y, 8, 8, bias=False), g.op("Reshape", [b, shape])])])
    g.output(g.conv(g.op("Relu", [g.mask(g.conv(z, 8, 8), 8, zeros=[2, 5])]), 8, 4))
    return g.model()


@pytest.mark.parametrize("constant_node", [False, True])
def test_params_before_count_a_constant_once_however_many_copies_read_it(constant_node):
    """``params before`` is what the input stores (the bias once, also from a Constant node), and the two
    equal Reshape copies normalisation folds are stored once in the result (before: 16 bias params, and the
    copies counted in ``params before``)."""
    from onnxslim.graph.prune import prune
    from onnxslim.graph.slim import slim
    from onnxslim.graph.stats import count_params

    model = _bias_through_reshape_copies(constant_node)
    stored = 8 * 3 * 9 + 8 * 8 * 9 + (8 * 8 * 9 + 8) + 8 + 4 * 8 * 9 + 4 + 8  # convs, mask, head, bias b
    assert count_params(model) == stored
    slimmed, report = slim(model)
    assert_equivalent(model, slimmed)
    assert report.params_before == stored
    assert sum(list(t.dims) == [1, 8, 1, 1] for t in slimmed.graph.initializer) == 1  # one copy of b, unsliced
    assert report.params_after == count_params(slimmed) == stored - 8 - 2 * (8 * 9 + 1) - 2 * 4 * 9  # mask, 2 channels
    unmasked = _bias_through_reshape_copies(constant_node)
    _, pruned, _ = prune(unmasked, ratio=0.25, round_to=1)
    assert pruned.params_before == count_params(unmasked) == stored  # not the masked reference's, not the copies
