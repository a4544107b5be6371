"""NHWC graphs (tf2onnx / keras2onnx style) and transposes that move the channel axis (issue #11 kind 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders_groups import conv_outputs, export_both, nhwc_conv_net, slim_exact
from graphs import GraphBuilder
from torch import nn


def test_nhwc_input_masks_in_both_layouts_and_a_dense_after_a_transposed_flatten():
    g = GraphBuilder(opset=13)
    g.output(nhwc_conv_net(g, size=6, zeros1=[0, 3], zeros2=[1], zeros3=[1, 5], flatten="Flatten"))
    slimmed, report = slim_exact(g.model())
    assert conv_outputs(slimmed) == [5, 4]
    assert (report.masked_channels, report.deleted_masked_channels) == (5, 5)
    matmul = next(n for n in slimmed.graph.node if n.op_type == "MatMul")
    weight = next(t for t in slimmed.graph.initializer if t.name == matmul.input[1])
    assert list(weight.dims) == [6 * 6 * 4, 5]  # each deleted channel took its H*W features


def test_reshape_of_an_nhwc_map_to_a_dense():
    g = GraphBuilder(opset=13)
    g.output(nhwc_conv_net(g, size=4, zeros1=[2], zeros2=[0], zeros3=[0], flatten="Reshape"))
    slimmed, report = slim_exact(g.model())
    assert conv_outputs(slimmed) == [6, 5]
    assert (report.masked_channels, report.deleted_masked_channels) == (3, 3)


class KerasStyle(nn.Module):
    """An NHWC model as Keras writes it: permute to NCHW for the convs, back to NHWC, flatten, Dense."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.dense = nn.Linear(4 * 4 * 6, 5)
        for name, (size, zeros) in {"m1": (8, [0, 5]), "m2": (6, [2, 3])}.items():
            mask = torch.rand(size) + 0.5
            mask[zeros] = 0
            self.register_buffer(name, mask)

    def forward(self, x):  # x: N, H, W, C
        y = self.c1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = torch.relu(y * self.m1)  # an NHWC mask: [C] on the last axis
        y = self.c2(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = torch.relu(y * self.m2)
        return self.dense(y.reshape(y.shape[0], -1))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_keras_style_nhwc_export(exporter):
    torch.manual_seed(0)
    model = export_both(KerasStyle(), (torch.randn(1, 4, 4, 3),))[exporter]
    slimmed, report = slim_exact(model)
    assert conv_outputs(slimmed) == [6, 4]
    assert (report.masked_channels, report.deleted_masked_channels) == (4, 4)
    assert np.isfinite(report.macs_after)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (Liu et al. 2022): depthwise 7x7, permute to NHWC, LayerNorm over C, Linear C -> 4C,
    GELU, Linear 4C -> C, layer scale, permute back, residual. A mask on the stem's channels is held by
    the LayerNorm (it normalises over them); the mask on the 4C hidden channels is not."""

    def __init__(self):
        super().__init__()
        self.stem, self.m0 = nn.Conv2d(3, 8, 3, padding=1), MaskLast(8, [1, 6])
        self.dw, self.ln = nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.LayerNorm(8)
        self.fc1, self.m1, self.fc2 = nn.Linear(8, 32), MaskLast(32, [0, 3, 9, 17, 30]), nn.Linear(32, 8)
        self.gamma, self.head = nn.Parameter(torch.rand(8)), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = self.m0(x).permute(0, 3, 1, 2)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(self.m1(nn.functional.gelu(self.fc1(self.ln(y)))))
        return self.head(x + y.permute(0, 3, 1, 2))


class MaskLast(nn.Module):
    """A mask on the last axis (an NHWC or (N, L, C) tensor)."""

    def __init__(self, channels: int, zeros: list[int]):
        super().__init__()
        values = torch.rand(channels) * 0.5 + 0.75
        values[zeros] = 0
        self.register_buffer("values", values)

    def forward(self, x):
        return x * self.values


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_convnext_block_deletes_hidden_channels_after_layer_norm(exporter):
    torch.manual_seed(0)
    model = export_both(ConvNeXtBlock(), (torch.randn(1, 3, 6, 6),))[exporter]
    slimmed, report = slim_exact(model)
    assert (report.masked_channels, report.deleted_masked_channels) == (7, 5), report.format_table()
    assert {k.reason.split(":")[0].split()[1] for k in report.kept} == {"LayerNormalization"}
    inits = {t.name: list(t.dims) for t in slimmed.graph.initializer}
    assert [inits[n.input[1]] for n in slimmed.graph.node if n.op_type == "MatMul"] == [[8, 27], [27, 8]]


def _nhwc_conv(g: GraphBuilder, x: str, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> str:
    """tf2onnx's conv on an NHWC map: Transpose to NCHW, Conv, Transpose back."""
    y = g.conv(g.op("Transpose", [x], perm=[0, 3, 1, 2]), cin, cout, k=k, stride=stride, groups=groups)
    return g.op("Transpose", [y], perm=[0, 2, 3, 1])


def _nhwc_mask(g: GraphBuilder, x: str, c: int, zeros) -> str:
    return g.op("Mul", [x, g.const(g.mask_values(c, zeros))])


@pytest.mark.parametrize("squeeze", ["keepdims", "reshape"])
def test_tf2onnx_efficientnet_block_with_se_on_nhwc(squeeze):
    """EfficientNet's MBConv as tf2onnx writes it unoptimised: Transposes around every Conv, masks, swish
    and ReLU6 (Clip) in NHWC, SE by ReduceMean over axes [1, 2] (kept, or dropped and Reshaped to
    [-1, 1, 1, C] as Keras' Reshape) gating the depthwise output, a residual Add, a ReduceMean head and a
    Dense (MatMul + Add). All 18 masked channels go."""
    g = GraphBuilder(opset=13, seed=11)
    stem_zeros = [1, 4, 9]
    y = _nhwc_mask(g, _nhwc_conv(g, g.input([1, 16, 16, 3]), 3, 16, k=3, stride=2), 16, stem_zeros)
    y = g.op("Mul", [y, g.op("Sigmoid", [y])])
    clip = [g.const(np.float32(0)), g.const(np.float32(6))]
    h = g.op("Clip", [_nhwc_mask(g, _nhwc_conv(g, y, 16, 32), 32, [0, 3, 5, 20, 31]), *clip])
    h = g.op("Clip", [_nhwc_mask(g, _nhwc_conv(g, h, 32, 32, k=3, groups=32), 32, [0, 2, 3, 5, 7, 20, 31]), *clip])
    if squeeze == "keepdims":
        s = g.op("ReduceMean", [h], axes=[1, 2], keepdims=1)
    else:
        s = g.op("Reshape", [g.op("ReduceMean", [h], axes=[1, 2], keepdims=0), g.const(np.array([-1, 1, 1, 32], np.int64))])
    s = _nhwc_conv(g, s, 32, 8)
    s = g.op("Sigmoid", [_nhwc_conv(g, g.op("Mul", [s, g.op("Sigmoid", [s])]), 8, 32)])
    y = g.op("Add", [y, _nhwc_mask(g, _nhwc_conv(g, g.op("Mul", [h, s]), 32, 16), 16, stem_zeros)])
    y = g.op("MatMul", [g.op("ReduceMean", [y], axes=[1, 2], keepdims=0), g.const(g.weights(16, 10))])
    g.output(g.op("Add", [y, g.const(g.weights(10, scale=0.1))]))
    slimmed, report = slim_exact(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 18, report.format_table()
    assert conv_outputs(slimmed) == [13, 25, 25, 8, 25, 13]  # the depthwise couples its input and output
