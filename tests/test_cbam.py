"""CBAM blocks (Woo et al., ECCV 2018, "CBAM: Convolutional Block Attention Module", fig. 2) exported from
PyTorch with both exporters slim exactly: the spatial attention's ``torch.max(x, dim=1)`` reads every
channel, but its input ``Relu(...) * sigmoid(...)`` is provably >= 0, so the masked (zero) channels go.

Channel attention: a shared MLP (1x1 convs C -> C/r -> C) on the average- and max-pooled map, summed,
sigmoid, ``x * g[N,C,1,1]``. Spatial attention: mean and max over channels, concatenated, a 7x7 conv to
one channel, sigmoid, ``x * g[N,1,H,W]``. Masks follow BN, before the ReLU (as mask training puts them).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from graphs import assert_equivalent
from test_torch_exports import ConvBN, Mask
from torch import nn

from onnxslim.graph.slim import slim

ZEROS = {16: [0, 3, 4, 9, 15], 24: [1, 2, 7, 8, 13, 20, 23]}  # masked channels per width


class ChannelAttention(nn.Module):
    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, c // reduction, 1, bias=False), nn.ReLU(),
                                 nn.Conv2d(c // reduction, c, 1, bias=False))

    def forward(self, x):
        pooled = self.mlp(nn.functional.adaptive_avg_pool2d(x, 1)) + self.mlp(nn.functional.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(pooled)


class SpatialAttention(nn.Module):
    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x):
        mean = torch.mean(x, dim=1, keepdim=True)
        top, _ = torch.max(x, dim=1, keepdim=True)
        return torch.sigmoid(self.conv(torch.cat([mean, top], 1)))


class CBAMNet(nn.Module):
    """Two masked ConvBN-ReLU stages (16 and 24 channels), each followed by a CBAM block."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([ConvBN(3, 16, mask=Mask(16, ZEROS[16])), ConvBN(16, 24, 3, 2, mask=Mask(24, ZEROS[24]))])
        self.channel = nn.ModuleList([ChannelAttention(16), ChannelAttention(24)])
        self.spatial = nn.ModuleList([SpatialAttention(), SpatialAttention()])
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        for stage, channel, spatial in zip(self.stages, self.channel, self.spatial):
            x = stage(x)
            x = x * channel(x)
            x = x * spatial(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def export(model: nn.Module, dynamo: bool) -> onnx.ModelProto:
    model.eval()
    example = (torch.randn(1, 3, 16, 16),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, example, dynamo=True, verbose=False, input_names=["x"]).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, example, buffer, dynamo=False, opset_version=17, input_names=["x"])
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_cbam_blocks_delete_every_masked_channel(dynamo):
    torch.manual_seed(0)
    exported = export(CBAMNet(), dynamo)
    assert "ReduceMax" in [n.op_type for n in exported.graph.node]  # torch.max over channels
    slimmed, report = slim(exported)
    for seed in (1, 2):
        feeds = {"x": np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)}
        assert_equivalent(exported, slimmed, feeds=feeds)
    zeros = len(ZEROS[16]) + len(ZEROS[24])
    assert report.masked_channels == report.deleted_masked_channels == zeros, report.format_table()
    assert not report.remaining_masks
    widths = {int(t.dims[0]) for t in slimmed.graph.initializer if len(t.dims) == 4 and t.dims[1] == 3}
    assert widths == {16 - len(ZEROS[16])}  # the stem conv lost its masked filters
