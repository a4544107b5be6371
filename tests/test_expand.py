"""Expand: SE blocks written ``x * y.expand_as(x)`` (the classic senet.pytorch spelling) and hand-built
Expand graphs. Before the Expand rule every masked channel before such a block was held by a barrier.

Both exporters, static and dynamic batch: the legacy export spells ``expand_as`` as ``Expand(y, Shape(x))``
(a shape that follows at run time), dynamo as a constant or ``Concat(batch, C, H, W)``; ``view(-1, C)``
makes onnx's shape inference lose the batch symbol, which :mod:`onnxslim.graph.shapes` restores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graphs import GraphBuilder, assert_equivalent
from onnx import numpy_helper
from test_legacy_shape_arithmetic import export
from test_torch_exports import Mask
from torch import nn

from onnxslim.graph.slim import slim


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // reduction), nn.ReLU(), nn.Linear(c // reduction, c), nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), Mask(16, [1, 3, 5, 7, 9]),
                                  nn.ReLU())
        self.se = SqueezeExcite(16)
        self.head = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.se(self.conv(x)))


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_squeeze_excite_with_expand_as_slims_exactly(dynamo, dynamic_batch):
    torch.manual_seed(0)
    exported = export(SENet(), dynamo, dynamic_batch)
    slimmed, report = slim(exported, round_to=1)
    for batch in (1, 3) if dynamic_batch else (1,):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)}
        assert_equivalent(exported, slimmed, feeds=feeds)
    assert (report.masked_channels, report.deleted_masked_channels) == (5, 5), report.format_table()
    convs = [n for n in slimmed.graph.node if n.op_type == "Conv"]
    weights = {t.name: list(t.dims) for t in slimmed.graph.initializer}
    assert weights[convs[0].input[1]][0] == 11 and weights[convs[-1].input[1]][1] == 11


def _expand_graph(shape: list[int], gate_channels: int) -> GraphBuilder:
    """conv(8) -> mask [2, 5] -> relu -> times Expand(gate, shape) -> conv(4); the gate is a per-channel
    sigmoid of a pooled 1x1 conv (``gate_channels`` wide)."""
    g = GraphBuilder(opset=17)
    x = g.input([1, 3, 6, 6])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[2, 5])])
    gate = g.op("Sigmoid", [g.conv(g.op("GlobalAveragePool", [y]), 8, gate_channels, k=1, pad=0)])
    expanded = g.op("Expand", [gate, g.const(np.array(shape, np.int64))])
    g.output(g.conv(g.op("Mul", [y, expanded]), 8, 4), shape=[1, 4, 6, 6])
    return g


def test_a_constant_expand_shape_is_rewritten_to_the_kept_count():
    model = _expand_graph([1, 8, 6, 6], 8).model()
    slimmed, report = slim(model, round_to=1)
    assert_equivalent(model, slimmed)
    assert report.deleted_masked_channels == 2
    expand = next(n for n in slimmed.graph.node if n.op_type == "Expand")
    shape = next(t for t in slimmed.graph.initializer if t.name == expand.input[1])
    assert numpy_helper.to_array(shape).tolist() == [1, 6, 6, 6]


def test_expanding_one_channel_to_many_keeps_it_and_rewrites_the_count():
    """A one-channel gate expanded to 8 channels: the gate's channel is kept (every output channel reads
    it); the masked channels go from the product and the Expand's shape says 6."""
    model = _expand_graph([1, 8, 6, 6], 1).model()
    slimmed, report = slim(model, round_to=1)
    assert_equivalent(model, slimmed)
    assert report.deleted_masked_channels == 2
    expand = next(n for n in slimmed.graph.node if n.op_type == "Expand")
    shape = next(t for t in slimmed.graph.initializer if t.name == expand.input[1])
    assert numpy_helper.to_array(shape).tolist() == [1, 6, 6, 6]


class Normalized(nn.Module):
    """``F.normalize(x, dim=1)`` between convs: both exporters divide by ``norm.clamp_min(eps)`` expanded
    to x's channels (legacy: ``Expand(norm, Shape(x))``, dynamo: a constant shape)."""

    def __init__(self):
        super().__init__()
        self.conv, self.mask = nn.Conv2d(3, 8, 3, padding=1), Mask(8, [1, 4, 6])
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.head(nn.functional.normalize(torch.relu(self.mask(self.conv(x))), dim=1))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_normalize_expands_the_norm_and_deletes_zero_channels(dynamo):
    torch.manual_seed(0)
    exported = export(Normalized(), dynamo, dynamic_batch=False)
    assert any(n.op_type == "Expand" for n in exported.graph.node)
    slimmed, report = slim(exported)
    assert_equivalent(exported, slimmed)
    assert (report.masked_channels, report.deleted_masked_channels) == (3, 3), report.format_table()
