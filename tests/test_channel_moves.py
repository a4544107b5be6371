"""Channel shuffle (a channel permutation: one Gather), DepthToSpace and SpaceToDepth (index maps) are not
barriers (issue #11 kind 5)."""

from __future__ import annotations

import pytest
import torch
from builders_groups import (
    channel_shuffle,
    conv_outputs,
    depth_to_space,
    export_both,
    slim_exact,
    space_to_depth,
)
from graphs import GraphBuilder
from torch import nn


def test_channel_shuffle_deletes_each_zero_channel():
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    # g = 2 groups of 4: channels 0 and 4 (position 0 of both groups) and channel 2 alone are zero. The
    # Reshape / Transpose / Reshape permutes channels: it becomes one Gather, and each zero channel goes
    # (a lone Reshape's index map would couple channel 2 with channel 6 and keep it)
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[0, 4, 2])])
    y = channel_shuffle(g, y, 8, 2, 8)
    y = g.op("Relu", [g.mask(g.conv(y, 8, 6), 6, zeros=[5])])
    g.output(g.conv(y, 6, 4))
    slimmed, report = slim_exact(g.model())
    assert conv_outputs(slimmed) == [5, 5, 4]
    assert (report.masked_channels, report.deleted_masked_channels) == (4, 4)
    assert [n.op_type for n in slimmed.graph.node if n.op_type in ("Gather", "Transpose")] == ["Gather"]


@pytest.mark.parametrize("mode,zeros", [("DCR", [1, 5, 9, 13, 0]), ("CRD", [4, 5, 6, 7, 0])])
def test_depth_to_space_deletes_whole_blocks_of_r2_channels(mode, zeros):
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 4, 4])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 16), 16, zeros=zeros)])  # output channel 1 is all zero
    g.output(g.conv(depth_to_space(g, y, 2, mode), 4, 4))
    slimmed, report = slim_exact(g.model())
    assert conv_outputs(slimmed) == [12, 4]
    assert (report.masked_channels, report.deleted_masked_channels) == (5, 4)


def test_space_to_depth_gives_each_channel_r2_outputs():
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 4), 4, zeros=[1])])
    y = space_to_depth(g, y, 2)  # 16 channels; 1, 5, 9, 13 are zero
    g.output(g.conv(y, 16, 4))
    slimmed, report = slim_exact(g.model())
    assert conv_outputs(slimmed) == [3, 4]
    assert report.deleted_masked_channels == 1


class ShuffleAndPixelShuffle(nn.Module):
    """ShuffleNet's channel shuffle (view / transpose / view), then PixelShuffle and PixelUnshuffle."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c4 = nn.Conv2d(16, 4, 1)
        # m1: position 1 of each of the 4 shuffle groups (1, 5, 9, 13) and a lone channel 0 (the shuffle
        # permutes channels: every one goes)
        # m2: PixelShuffle output channel 2 (CRD: 8..11) and a lone channel 0
        for name, zeros in (("m1", [1, 5, 9, 13, 0]), ("m2", [8, 9, 10, 11, 0])):
            mask = torch.rand(1, 16, 1, 1) + 0.5
            mask[0, zeros] = 0
            self.register_buffer(name, mask)

    def forward(self, x):
        y = torch.relu(self.c1(x) * self.m1)
        n, c, h, w = y.shape
        y = y.view(n, 4, c // 4, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        y = torch.relu(self.c2(y) * self.m2)
        y = torch.relu(self.c3(nn.functional.pixel_shuffle(y, 2)))
        return self.c4(nn.functional.pixel_unshuffle(y, 2))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_torch_shuffles_export(exporter):
    torch.manual_seed(0)
    model = export_both(ShuffleAndPixelShuffle(), (torch.randn(1, 3, 8, 8),))[exporter]
    slimmed, report = slim_exact(model)
    assert conv_outputs(slimmed) == [11, 12, 4, 4]
    assert (report.masked_channels, report.deleted_masked_channels) == (10, 9)
