"""Shape arithmetic of TorchScript (legacy) exports: ``torch.chunk`` bounds and ``x.view(x.size(0), ...)``
targets computed from ``Gather(Shape(x), k)`` with a scalar index, with a static and a dynamic batch.

A ShuffleNetV2 unit (chunk, branch, concat, channel shuffle by view/transpose/view) and a classifier head
``view(x.size(0), -1)``: exported with both exporters, every masked channel is deleted, the slimmed model
equals the masked one in onnxruntime (at batch 1 and, for dynamic exports, batch 3), and the MACs are
counted for every layer (the legacy export used to hide them behind the computed Reshape targets).

Padding modules: the legacy exporter computes ``Pad``'s pads from a ``ConstantOfShape`` (a small fill that
normalisation folds), so a masked channel passes the Pad as it does in a dynamo export.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from graphs import assert_equivalent
from test_torch_exports import Mask
from torch import nn

from onnxslim.graph.slim import slim
from onnxslim.graph.stats import model_stats


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit (Ma et al. ECCV 2018, fig. 3c): half the channels pass, half go through
    1x1 -> depthwise 3x3 -> 1x1; concat; shuffle in 2 groups. Masks on the branch's inner channels."""

    def __init__(self, c: int, zeros: list[int]):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), Mask(half, zeros),
                                    nn.ReLU(), nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
                                    nn.BatchNorm2d(half), Mask(half, zeros), nn.Conv2d(half, half, 1, bias=False),
                                    nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)


class ShuffleNetish(nn.Module):
    def __init__(self, c: int = 16, units: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.units = nn.Sequential(*[ShuffleUnit(c, [1, 4, 6][: 1 + k % 3]) for k in range(units)])
        self.conv = nn.Sequential(nn.Conv2d(c, 12, 1, bias=False), nn.BatchNorm2d(12), Mask(12, [0, 3, 5, 8]),
                                  nn.ReLU())
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        y = nn.functional.adaptive_avg_pool2d(self.conv(self.units(self.stem(x))), 4)
        return self.fc(y.view(y.size(0), -1))


def export(model: nn.Module, dynamo: bool, dynamic_batch: bool) -> onnx.ModelProto:
    model.eval()
    example = (torch.randn(1, 3, 8, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
            return torch.onnx.export(model, example, dynamo=True, verbose=False, input_names=["x"],
                                     dynamic_shapes=shapes).model_proto
        buffer = io.BytesIO()
        axes = {"x": {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(model, example, buffer, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_shuffle_units_and_view_head_slim_exactly(dynamo, dynamic_batch):
    torch.manual_seed(0)
    model = ShuffleNetish()
    exported = export(model, dynamo, dynamic_batch)
    slimmed, report = slim(exported, input_shapes={"x": [1, 3, 8, 8]} if dynamic_batch else None)
    for batch in (1, 3) if dynamic_batch else (1,):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)}
        assert_equivalent(exported, slimmed, feeds=feeds)
    # three units with 1, 2 and 3 zero channels, each masked twice (1x1 and depthwise share the mask), the head 4
    assert report.masked_channels == report.deleted_masked_channels == 16, report.format_table()
    assert not report.remaining_masks
    # every layer's MACs are known: the count equals a torch-side count of the same network
    assert report.macs_before == _torch_macs(model)
    assert model_stats(slimmed, {"x": [1, 3, 8, 8]}).macs == report.macs_after < report.macs_before


def _torch_macs(model: nn.Module) -> int:
    """Multiply-accumulates of every Conv2d and Linear at a 1x3x8x8 input, counted by forward hooks."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * kernel
        else:
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 8, 8))
    for hook in hooks:
        hook.remove()
    return total


class PaddedConvs(nn.Module):
    """Conv -> mask -> padding module -> Conv, for each of torch's padding modules."""

    def __init__(self):
        super().__init__()
        self.pads = nn.ModuleList([nn.ZeroPad2d((1, 2, 0, 1)), nn.ReflectionPad2d(1), nn.ReplicationPad2d(1),
                                   nn.ConstantPad2d(1, 0.0)])
        self.convs = nn.ModuleList(nn.Conv2d(3 if k == 0 else 8, 8, 3) for k in range(4))
        self.masks = nn.ModuleList(Mask(8, zeros) for zeros in ([1], [0, 4], [2, 5, 7], [3]))
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        for conv, mask, pad in zip(self.convs, self.masks, self.pads):
            x = pad(torch.relu(mask(conv(x))))
        return self.head(x)


def test_legacy_padding_modules_pass_masked_channels():
    torch.manual_seed(0)
    exported = export(PaddedConvs(), dynamo=False, dynamic_batch=False)
    assert any(n.op_type == "ConstantOfShape" for n in exported.graph.node)  # the legacy spelling of pads
    slimmed, report = slim(exported)
    assert_equivalent(exported, slimmed)
    assert report.masked_channels == report.deleted_masked_channels == 7, report.format_table()
    assert [n.op_type for n in slimmed.graph.node].count("Pad") == 4


def test_partial_mac_counts_are_not_printed_as_totals():
    """A Conv on a map of unknown size has no MAC count: the report says "at least" / "unknown" instead of
    printing the sum of the other layers as the model's MACs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"]), helper.make_node("GlobalAveragePool", ["y"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w2"], ["z"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = slim(model)
    assert not report.macs_complete and report.macs_before == 20  # the Gemm only
    assert "MACs: at least 20 -> at least 20" in report.format_table()
    _, full = slim(model, input_shapes={"x": [1, 3, 8, 8]})
    assert full.macs_complete and full.macs_before == 4 * 3 * 64 + 20
    assert "MACs: 788 -> 788" in full.format_table()


class SamePadded(nn.Module):
    """TF-style "same" padding computed from the input size (timm's ``pad_same`` of the tf_* EfficientNets
    ported from TensorFlow): two stride-2 convs in a row, so the second pad's amounts follow from the first
    pad's once that one is a constant."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, 2), nn.Conv2d(8, 8, 3, 2), nn.Conv2d(8, 6, 3, 2)])
        self.masks = nn.ModuleList(Mask(8, zeros) for zeros in ([1, 6], [0, 3, 4]))

    @staticmethod
    def pad_same(x: torch.Tensor, k: int = 3, s: int = 2) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        pad_h = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pad_w = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])

    def forward(self, x):
        for conv, mask in zip(self.convs[:2], self.masks):
            x = torch.relu(mask(conv(self.pad_same(x))))
        return self.convs[2](self.pad_same(x))


def test_same_padding_computed_from_shapes_folds_layer_after_layer():
    """Each layer's pad amounts become constants once the layer before is folded (fold the arithmetic
    between the rounds of static dims): the 5 masked channels go (2 before: the second Pad's amounts stayed
    computed, a barrier)."""
    torch.manual_seed(0)
    exported = export(SamePadded(), dynamo=False, dynamic_batch=False)
    slimmed, report = slim(exported)
    assert_equivalent(exported, slimmed)
    assert report.masked_channels == report.deleted_masked_channels == 5, report.format_table()


class GlobalContext(nn.Module):
    """GCNet's context block (Cao et al. 2019) on a map of any size: ``view(b, c, h * w)`` of the features,
    a softmax attention over positions, ``view(b, c, 1, 1)`` of the context, a transform added back; a
    classifier head reads ``view(b, c, -1).mean(-1)``. Masks on the features and the transform's output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Mask(8, [1, 4, 6]), nn.ReLU())
        self.att = nn.Conv2d(8, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1), Mask(8, [1, 4, 6]))
        self.head = nn.Sequential(nn.Conv2d(8, 6, 3), Mask(6, [0, 5]), nn.ReLU())
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        weights = self.att(y).view(b, 1, h * w).softmax(-1)
        context = torch.matmul(y.view(b, c, h * w), weights.transpose(1, 2)).view(b, c, 1, 1)
        z = self.head(y + self.transform(context))
        return self.fc(z.view(b, z.shape[1], -1).mean(-1))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_views_that_keep_batch_and_channels_of_a_dynamic_map_pass_channels(dynamo):
    """``view(b, c, h * w)`` / ``view(b, c, -1)`` with H and W dynamic: the target keeps (N, C) whatever the
    rest is at run time (the -1 and ``h * w`` are not known before; dynamo writes C as a constant in a
    computed Concat). Were a barrier: 0 of 8 masked channels deleted."""
    torch.manual_seed(0)
    model = GlobalContext().eval()
    example = (torch.randn(1, 3, 16, 16),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("h", min=4, max=512),
                    3: torch.export.Dim("w", min=4, max=512)}
            exported = torch.onnx.export(model, example, dynamo=True, verbose=False, input_names=["x"],
                                         dynamic_shapes={"x": dims}).model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, example, buffer, dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
            exported = onnx.load_from_string(buffer.getvalue())
    slimmed, report = slim(exported)
    for batch, height, width in ((1, 16, 16), (2, 12, 20)):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 3, height, width)).astype(np.float32)}
        assert_equivalent(exported, slimmed, feeds=feeds)
    assert report.masked_channels == report.deleted_masked_channels == 8, report.format_table()
    assert [(layer.channels_before, layer.channels_after) for layer in report.layers
            if layer.channels_after < layer.channels_before] == \
        [(8, 5), (8, 5), (6, 4)]
