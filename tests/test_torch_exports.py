"""Models exported from PyTorch (dynamo and legacy exporters) slim exactly.

The networks are small stand-ins written here (masks placed by hand after each BN, shared across
residual additions) so that the engine is tested independently of the training side.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from graphs import assert_equivalent
from torch import nn

from onnxslim.graph.slim import slim


class Mask(nn.Module):
    def __init__(self, channels: int, zeros: list[int]):
        super().__init__()
        values = torch.rand(channels) * 0.5 + 0.75
        values[zeros] = 0
        self.weight = nn.Parameter(values)

    def forward(self, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.weight.view(*shape)


def random_zeros(channels: int, generator: np.random.Generator, fraction: float = 0.4) -> list[int]:
    count = int(channels * fraction)
    return sorted(generator.choice(channels, count, replace=False).tolist())


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, mask=None, act=nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if mask is not None:
            layers.append(mask)
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, shared_mask, rng):
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride, mask=Mask(cout, random_zeros(cout, rng)))
        self.conv2 = ConvBN(cout, cout, 3, 1, mask=shared_mask, act=None)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = ConvBN(cin, cout, 1, stride, mask=shared_mask, act=None)

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.conv2(self.conv1(x)) + identity)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (3 stages x 3 basic blocks), width 8/16/32; one shared mask per stage."""

    def __init__(self, rng, width=8):
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        stage_masks = [Mask(w, random_zeros(w, rng, 0.25)) for w in widths]
        self.stem = ConvBN(3, widths[0], mask=stage_masks[0])
        blocks, cin = [], widths[0]
        for stage, w in enumerate(widths):
            for index in range(3):
                blocks.append(BasicBlock(cin, w, 2 if (index == 0 and stage > 0) else 1, stage_masks[stage], rng))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c, expand, rng):
        super().__init__()
        hidden = c * expand
        self.expand = ConvBN(c, hidden, 1, mask=Mask(hidden, random_zeros(hidden, rng)), act=nn.ReLU6)
        self.depthwise = ConvBN(hidden, hidden, 3, groups=hidden, act=nn.ReLU6)
        self.project = ConvBN(hidden, c, 1, act=None)

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class MobileNetV2ish(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.stem = ConvBN(3, 8, 3, 2)
        self.blocks = nn.Sequential(InvertedResidual(8, 4, rng), InvertedResidual(8, 6, rng))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DenseBlock(nn.Module):
    def __init__(self, rng, c=6, growth=4, layers=3):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(layers):
            cin = c + i * growth
            self.layers.append(nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 2 * growth, 1, bias=False),
                                             nn.BatchNorm2d(2 * growth), Mask(2 * growth, random_zeros(2 * growth, rng)),
                                             nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)))
        self.stem = ConvBN(3, c, mask=Mask(c, random_zeros(c, rng)))
        self.fc = nn.Linear(c + layers * growth, 4)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.fc(torch.cat(features, 1).mean((2, 3)))


class Inception(nn.Module):
    def __init__(self, rng):
        super().__init__()

        def masked(cin, cout, k):
            return ConvBN(cin, cout, k, mask=Mask(cout, random_zeros(cout, rng)))

        self.stem = masked(3, 8, 3)
        self.b1 = masked(8, 4, 1)
        self.b2 = nn.Sequential(masked(8, 6, 1), masked(6, 8, 3))
        self.b3 = nn.Sequential(masked(8, 2, 1), masked(2, 4, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), masked(8, 4, 1))
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class SEHardSwish(nn.Module):
    def __init__(self, rng, c=12):
        super().__init__()
        self.conv = ConvBN(3, c, mask=Mask(c, random_zeros(c, rng)), act=nn.Hardswish)
        self.squeeze = nn.Conv2d(c, 4, 1)
        self.excite = nn.Conv2d(4, c, 1)
        self.out = ConvBN(c, 6, act=nn.Hardswish)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        y = self.conv(x)
        s = nn.functional.hardsigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        y = self.out(y * s)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 4), 1))


class UNet(nn.Module):
    def __init__(self, rng, c=8):
        super().__init__()

        def masked(cin, cout):
            return ConvBN(cin, cout, mask=Mask(cout, random_zeros(cout, rng)))

        self.enc1, self.enc2 = masked(3, c), masked(c, 2 * c)
        self.bottom = masked(2 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, 2)
        self.dec2 = masked(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, 2)
        self.dec1 = masked(2 * c, c)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        b = self.bottom(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class LayoutOps(nn.Module):
    """torch.chunk (legacy: Slice with bounds computed from Shape), interpolate by scale and by size,
    channel slicing, cat with a slice, LayerNorm over W and GroupNorm (a barrier)."""

    def __init__(self, rng):
        super().__init__()
        self.c1, self.m1 = nn.Conv2d(3, 8, 3, padding=1), Mask(8, [1, 2, 5])
        self.c2, self.m2 = nn.Conv2d(8, 8, 3, padding=1), Mask(8, [0, 7])
        self.c3, self.ln, self.gn, self.fc = nn.Conv2d(6, 6, 1), nn.LayerNorm(16), nn.GroupNorm(2, 6), nn.Linear(6, 3)

    def forward(self, x):
        a, b = torch.chunk(torch.relu(self.m1(self.c1(x))), 2, dim=1)
        y = nn.functional.interpolate(torch.cat([b, a], 1), scale_factor=2, mode="nearest")
        y = torch.relu(self.m2(self.c2(y)))[:, 2:7]
        y = nn.functional.interpolate(y, size=(16, 16), mode="bilinear", align_corners=False)
        y = self.gn(self.ln(self.c3(torch.cat([y, y[:, :1]], 1))))
        return self.fc(y.mean((2, 3)))


MODELS = {
    "resnet20": (ResNet20, 32),
    "mobilenetv2": (MobileNetV2ish, 16),
    "densenet": (DenseBlock, 8),
    "inception": (Inception, 8),
    "se_hardswish": (SEHardSwish, 16),
    "unet": (UNet, 16),
    "layout_ops": (LayoutOps, 8),
}


def export(model: nn.Module, size: int, dynamo: bool) -> onnx.ModelProto:
    model.eval()
    example = (torch.randn(1, 3, size, size),)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, example, dynamo=True, verbose=False)
            return program.model_proto
        torch.onnx.export(model, example, buffer, dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_model_slims_exactly(name, dynamo):
    torch.manual_seed(0)
    factory, size = MODELS[name]
    model = factory(np.random.default_rng(0))
    onnx_model = export(model, size, dynamo)
    slimmed, report = slim(onnx_model)
    assert_equivalent(onnx_model, slimmed, feeds={onnx_model.graph.input[0].name: np.random.default_rng(1).standard_normal(
        (1, 3, size, size)).astype(np.float32)})
    assert report.masked_channels > 0
    assert report.deleted_masked_channels == report.masked_channels, report.format_table()
    assert report.params_after < report.params_before
    assert not report.remaining_masks


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy-functions"])
def test_modules_exported_as_functions_are_inlined_and_slimmed(dynamo):
    # the legacy exporter's export_modules_as_functions writes each ConvBN as a model-local function
    # (one call node): before inlining, every call was a barrier and nothing was deleted
    torch.manual_seed(0)
    model = ResNet20(np.random.default_rng(0)).eval()
    example = (torch.randn(1, 3, 32, 32),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            onnx_model = torch.onnx.export(model, example, dynamo=True, verbose=False).model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, example, buffer, dynamo=False, opset_version=17,
                              export_modules_as_functions={ConvBN})
            onnx_model = onnx.load_from_string(buffer.getvalue())
            assert onnx_model.functions and any(n.op_type == "ConvBN" for n in onnx_model.graph.node)
    slimmed, report = slim(onnx_model)
    assert_equivalent(onnx_model, slimmed, feeds={onnx_model.graph.input[0].name: example[0].numpy()})
    assert report.masked_channels > 0 and report.deleted_masked_channels == report.masked_channels
    assert not slimmed.functions


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d (BiT, NFNet): each filter standardised at run time by a batch norm over the weight."""

    def forward(self, x):
        w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                                     momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class StdConvNet(nn.Module):
    """Large enough (256 x 512 x 3 x 3 = 1.2 M weight elements) that the standardisation's intermediate
    results exceed the constant folder's growth limit: they fold only as weights."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 512, 3, padding=1)
        self.mask1 = Mask(512, list(range(0, 512, 5)))
        self.std = StdConv2d(512, 256, 3, padding=1)
        self.mask2 = Mask(256, list(range(0, 256, 4)))
        self.head = nn.Conv2d(256, 10, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mask2(self.std(torch.relu(self.mask1(self.stem(x)))))))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_weight_standardized_conv_folds_and_slims(dynamo):
    torch.manual_seed(0)
    model = StdConvNet().eval()
    onnx_model = export(model, 6, dynamo)
    assert "ReduceMean" in [n.op_type for n in onnx_model.graph.node]  # the weight is computed in the graph
    slimmed, report = slim(onnx_model, round_to=1)
    feeds = {onnx_model.graph.input[0].name: np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    assert_equivalent(onnx_model, slimmed, feeds=feeds, tolerance=1e-4)
    assert report.deleted_masked_channels == report.masked_channels == 103 + 64, report.format_table()
    assert "ReduceMean" not in [n.op_type for n in slimmed.graph.node]
