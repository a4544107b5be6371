"""Spatial rules: pooling lets a positive mask scale through to the conv before it, unless indices are read."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, assert_equivalent, conv_channels, head, slim_checked

from onnxslim.graph.model import get_attr
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


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("LpPool", {"kernel_shape": [2, 2]}),
    ("GlobalAveragePool", {}), ("GlobalMaxPool", {}),
])
def test_pooling_passes_channels(op, attrs):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op(op, [g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[0, 3])])], **attrs)
    head(g, y, 6)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4]


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_with_scales_and_with_sizes(mode):
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[1])])
    a = g.op("Resize", [y, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode=mode)
    b = g.op("Resize", [y, "", "", g.const(np.array([1, 6, 12, 12], np.int64))], mode=mode)
    g.output(g.conv(a, 6, 4), g.conv(b, 6, 4))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [5, 4, 4]


@pytest.mark.parametrize("axes", [[2, 3], [-2, -1], [1, 2, 3]])
def test_resize_with_axes_opset18(axes):
    """Resize-18 lists the resized axes: the channel axis is absent, or listed with scale 1 / its size."""
    g = GraphBuilder(opset=18)
    y = g.op("Relu", [g.mask(g.conv(g.input([1, 3, 8, 8]), 3, 6), 6, zeros=[1, 4])])
    scales = [2.0] * 2 if len(axes) == 2 else [1.0, 2.0, 2.0]
    sizes = [12] * 2 if len(axes) == 2 else [6, 12, 12]
    a = g.op("Resize", [y, "", g.const(np.array(scales, np.float32))], axes=axes, mode="linear")
    b = g.op("Resize", [y, "", "", g.const(np.array(sizes, np.int64))], axes=axes, mode="nearest")
    g.output(g.conv(a, 6, 4), g.conv(b, 6, 4))
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 2, report.format_table()
    assert conv_channels(slimmed) == [4, 4, 4]


def test_upsample_opset9_and_pad():
    g = GraphBuilder(opset=9)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[1, 2])])
    y = g.op("Upsample", [y, g.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    y = g.op("Pad", [y], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant", value=0.0)
    g.output(g.conv(y, 6, 4, pad=0))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4]


def test_pad_opset13_with_nonzero_fill_keeps_zero_channels_before_a_padded_conv_only_when_unequal():
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[1])])
    y = g.op("Pad", [y, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), g.const(np.float32(1.0))])
    g.output(g.conv(y, 6, 4, pad=0))
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 4]
    assert report.kept


def test_cumsum_along_a_spatial_axis_keeps_zero_channels_zero():
    """``torch.cumsum(y, 2)`` sums within each channel: 3 masked channels, 0 -> 3 deleted (before: CumSum
    had no rule); along the channel axis it is a barrier (0 deleted)."""
    for axis, deleted in ((2, 3), (1, 0)):
        g = GraphBuilder()
        y = g.mask(g.conv(g.input([1, 3, 6, 6]), 3, 8), 8, zeros=[1, 4, 6])
        head(g, g.op("CumSum", [y, g.const(np.array(axis, np.int64))]), 8)
        _, report = slim_checked(g.model())
        assert report.deleted_masked_channels == deleted, report.format_table()


@pytest.mark.parametrize(("extrapolation", "roi_channel", "deleted"), [
    (0.0, (0, 1), [4]),    # the zero channel stays zero, the constant 0.5 gets 0 outside the crop
    (0.5, (0, 1), [1]),    # the constant 0.5 stays 0.5 (absorbed), the zero channel gets 0.5 outside
    (0.0, (0, 0.5), []),   # a crop of the channel axis mixes channels: a barrier
])
def test_resize_tf_crop_and_resize_writes_the_extrapolation_value_outside_the_crop(extrapolation, roi_channel, deleted):
    """DeepLab / TF detection crops: Resize-19 in ``tf_crop_and_resize`` mode writes
    ``extrapolation_value`` where the roi reaches past the input, so a channel that is the constant v stays
    v only when v equals it (0 deleted -> 2 wrongly deleted before, an inexact model); the channel axis'
    roi entries must be (0, 1)."""
    g = GraphBuilder(opset=13)
    y = g.mask(g.conv(g.input([1, 3, 6, 6]), 3, 6), 6, zeros=[1, 4])
    y = g.op("Add", [y, g.const(np.array([0, 0.5, 0, 0, 0, 0], np.float32).reshape(1, 6, 1, 1))])
    roi = np.array([0, roi_channel[0], -0.5, -0.5, 1, roi_channel[1], 1.5, 1.5], np.float32)
    y = g.op("Resize", [y, g.const(roi), g.const(np.array([1, 1, 2, 2], np.float32))], mode="linear",
             coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=extrapolation)
    g.output(g.conv(y, 6, 4, pad=0))
    _, report = slim_checked(g.model())
    assert report.masked_channels == 2
    assert report.deleted_masked_channels == len(deleted), report.format_table()
    assert sorted({c for kept in report.kept for c in kept.channels}) == sorted({1, 4} - set(deleted))


def _blaze_block(opset: int, fill: float = 0.0, mode: str = "constant"):
    """BlazeFace's BlazeBlock (MediaPipe, as exported by torch): ``relu(pw(dw(y)) + F.pad(y, (0, 0, 0, 0,
    0, 2)))``, the skip padded from 4 to 6 channels. Masks: channel 1 of ``y`` and of the branch, and
    branch channel 4 (which meets a pad channel). Pads: attribute (opset 10), input (13), input with
    ``axes`` (18)."""
    g = GraphBuilder(opset=opset)
    y = g.mask(g.op("Relu", [g.conv(g.input([1, 3, 8, 8]), 3, 4)]), 4, zeros=[1])
    branch = g.mask(g.conv(g.conv(y, 4, 4, groups=4), 4, 6, k=1, pad=0), 6, zeros=[1, 4])
    if opset < 11:
        skip = g.op("Pad", [y], pads=[0, 0, 0, 0, 0, 2, 0, 0], mode=mode, value=fill)
    elif opset < 18:
        skip = g.op("Pad", [y, g.const(np.array([0, 0, 0, 0, 0, 2, 0, 0], np.int64)), g.const(np.float32(fill))],
                    mode=mode)
    else:
        skip = g.op("Pad", [y, g.const(np.array([0, 2], np.int64)), g.const(np.float32(fill)),
                            g.const(np.array([1], np.int64))], mode=mode)
    head(g, g.op("Relu", [g.op("Add", [branch, skip])]), 6)
    return g.model()


@pytest.mark.parametrize("opset", [10, 13, 18])
def test_pad_of_the_channel_axis_adds_constant_channels_that_can_go(opset):
    """A zero pad of the channel axis adds zero channels (a Concat of zeros): the masked branch channel 4
    meets one and goes with it (the pads shrink to 1); channel 1 goes everywhere. 3 masked channels, 3
    deleted (before: 'pads the channel axis', a barrier holding all 3)."""
    slimmed, report = slim_checked(_blaze_block(opset))
    assert report.masked_channels == report.deleted_masked_channels == 3, report.format_table()
    assert conv_channels(slimmed) == [3, 3, 4, 4]
    pad = next(n for n in slimmed.graph.node if n.op_type == "Pad")
    pads = get_attr(pad, "pads") if opset < 11 else \
        onnx.numpy_helper.to_array(next(t for t in slimmed.graph.initializer if t.name == pad.input[1]))
    assert list(pads)[-3 if opset < 18 else -1] == 1


@pytest.mark.parametrize(("fill", "mode", "deleted"), [(1.0, "constant", 2), (0.0, "edge", 0)])
def test_pad_of_the_channel_axis_with_a_fill_or_copies(fill, mode, deleted):
    """A pad channel holding 1 makes the sum there the constant 1, which the padded head conv cannot
    absorb: that channel stays (2 of 3 deleted). Edge mode copies the last channel: a barrier (0)."""
    _, report = slim_checked(_blaze_block(13, fill, mode))
    assert report.deleted_masked_channels == deleted, report.format_table()


@pytest.mark.parametrize("op,kernel,stride,ceil,kept", [
    ("MaxPool", 1, 2, 0, [3, 4]),      # channels 0, 2, 4, 6 of 8 read; 2 is masked: the rest of the 8 go
    ("AveragePool", 1, 3, 0, [2, 4]),  # 0, 3, 6 read, 3 masked
    ("MaxPool", 1, 7, 1, [2, 4]),      # ceil_mode, no window past the last channel: 0 and 7 read
    ("MaxPool", 3, 1, 0, [8, 4]),      # a window of 3 channels mixes them: a barrier
])
def test_pooling_with_the_channel_axis_among_pooled_axes(op, kernel, stride, ceil, kept):
    """TorchScript 1.x spelled LPRNet's ``MaxPool3d((1, 3, 3), (2, 1, 2))`` on a 4-D map as Transpose to
    channels last, ``MaxPool(kernel (1, 1), strides (1, 2))``, Transpose back: a window of one channel
    with stride s reads channels 0, s, 2s, ... each alone, so the others are dead and the read ones pass.
    Before: a barrier ("channel axis is not axis 1") held all 8."""
    g = GraphBuilder()
    x = g.input([1, 3, 6, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[2, 3])])
    pooled = g.op(op, [g.op("Transpose", [y], perm=[0, 2, 3, 1])], kernel_shape=[1, kernel], strides=[1, stride],
                  ceil_mode=ceil)
    back = g.op("Transpose", [pooled], perm=[0, 3, 1, 2])
    head(g, back, (8 - kernel) // stride + 1)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == kept
