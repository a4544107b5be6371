"""Weights shared by several uses (an FPN head applied to every level) stay shared (issue #11 kind 8):
the uses are coupled, folds that would split a shared weight are not made, and the output is never
larger than the input in params or bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders_groups import export_both, shared_head_levels, slim_exact
from graphs import GraphBuilder
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
