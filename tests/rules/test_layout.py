"""Layout rules: the module's BARRIERS are barriers in the default rules; Flatten -> Gemm deletes feature blocks."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, assert_equivalent, conv_channels, head, ops, slim_checked
from onnx import helper, numpy_helper

from onnxslim.graph.rules import default_rules, module_rules
from onnxslim.graph.rules import layout as layout_rules
from onnxslim.graph.rules.base import BarrierRule
from onnxslim.graph.slim import slim


def test_barriers_of_the_module_are_barriers_in_the_default_rules():
    barriers = [rule for rule in module_rules(layout_rules) if isinstance(rule, BarrierRule)]
    for op in (op for rule in barriers for op in rule.op_types):
        assert isinstance(default_rules().rule_for(helper.make_node(op, ["x"], ["y"])), BarrierRule)


def test_a_mask_before_flatten_and_gemm_deletes_blocks_of_features():
    g = GraphBuilder()
    x = g.input([1, 3, 4, 4])
    y = g.mask(g.op("Relu", [g.conv(x, 3, 5)]), 5, zeros=[1, 3])
    g.output(g.gemm(g.op("Flatten", [y], axis=1), 5 * 16, 2))
    model = g.model()
    slimmed, report = slim(model)
    assert [(layer.channels_before, layer.channels_after) for layer in report.layers] == [(5, 3), (2, 2)]
    assert_equivalent(model, slimmed)


def test_concat_offsets():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    a = g.op("Relu", [g.mask(g.conv(x, 3, 4), 4, zeros=[1])])
    b = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[0, 5])])
    head(g, g.op("Concat", [a, b, x], axis=1), 13)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [3, 4, 4]


def test_concat_drops_a_branch_whose_channels_all_go():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    a = g.op("Relu", [g.mask(g.conv(x, 3, 4), 4, zeros=[0, 1, 2, 3])])
    b = g.op("Relu", [g.conv(x, 3, 6)])
    head(g, g.op("Concat", [a, b], axis=1), 10)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 4]
    assert "Concat" not in ops(slimmed)  # a Concat of the one remaining input is gone


@pytest.mark.parametrize(("token", "deleted"), [("constant", 1), ("computed", 0)])
def test_concat_of_a_class_token_along_the_token_axis(token, deleted):
    """ViT / DeiT: ``cat([cls_token.expand(B, -1, -1), tokens], 1)`` joins along the token axis, so output
    channel c is zero only when the token's entry c is zero too. Token channels 1 and 3 are masked, the
    class token is 0 at channel 3 only: 1 deletable (2 wrongly deleted before, an inexact model); a class
    token computed at run time (Expand to a computed batch) is a barrier (0 deleted)."""
    g = GraphBuilder()
    x = g.input([1 if token == "constant" else "N", 3, 4, 4])
    t = g.mask(g.conv(x, 3, 6, k=2, pad=0, stride=2), 6, zeros=[1, 3])
    t = g.op("Transpose", [g.op("Reshape", [t, g.const(np.array([0, 6, 4], np.int64))])], perm=[0, 2, 1])
    cls = g.const(np.array([0.5, 0.7, -0.2, 0, 0.3, 0.1], np.float32).reshape(1, 1, 6))
    if token == "computed":
        batch = g.op("Slice", [g.op("Shape", [x]), g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))])
        cls = g.op("Expand", [cls, g.op("Concat", [batch, g.const(np.array([1, 6], np.int64))], axis=0)])
    y = g.op("Concat", [cls, t], axis=1)
    g.output(g.op("MatMul", [y, g.const(g.weights(6, 3))]))
    _, report = slim_checked(g.model())
    assert report.masked_channels == 2
    assert report.deleted_masked_channels == deleted, report.format_table()


@pytest.mark.parametrize("opset,style", [(11, "attr"), (13, "input"), (18, "num_outputs")])
def test_split_on_the_channel_axis(opset, style):
    g = GraphBuilder(opset=opset)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[0, 1, 6])])
    if style == "attr":
        a, b = g.op("Split", [y], outputs=2, axis=1, split=[4, 4])
    elif style == "input":
        a, b = g.op("Split", [y, g.const(np.array([4, 4], np.int64))], outputs=2, axis=1)
    else:
        a, b = g.op("Split", [y], outputs=2, axis=1, num_outputs=2)
    g.output(g.conv(a, 4, 4), g.conv(b, 4, 4))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [5, 4, 4]


def test_slice_and_gather_on_the_channel_axis():
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 10), 10, zeros=[0, 3, 4, 8])])
    s = g.op("Slice", [y, g.const(np.array([2], np.int64)), g.const(np.array([7], np.int64)),
                       g.const(np.array([1], np.int64))])
    gathered = g.op("Gather", [y, g.const(np.array([9, 8, 0, 1], np.int64))], axis=1)
    g.output(g.conv(s, 5, 4), g.conv(gathered, 4, 4))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [5, 4, 4]  # the zeros go, and channel 7, which nothing reads
    slice_node = next(n for n in slimmed.graph.node if n.op_type == "Slice")
    starts, ends = (numpy_helper.to_array(next(t for t in slimmed.graph.initializer if t.name == n))
                    for n in slice_node.input[1:3])
    assert (int(starts[0]), int(ends[0])) == (1, 4)  # kept 1,2,5,6,9: old 2..6 -> new 1..3


def test_reshape_to_gemm_with_a_constant_and_with_a_computed_target():
    for computed in (False, True):
        g = GraphBuilder(opset=13)
        x = g.input([2, 3, 8, 8])
        y = g.op("MaxPool", [g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[1, 2])])], kernel_shape=[4, 4], strides=[4, 4])
        if computed:
            batch = g.op("Gather", [g.op("Shape", [y]), g.const(np.array([0], np.int64))], axis=0)
            target = g.op("Concat", [batch, g.const(np.array([24], np.int64))], axis=0)
        else:
            target = g.const(np.array([2, 24], np.int64))
        g.output(g.gemm(g.op("Reshape", [y, target]), 24, 5))
        slimmed, _ = slim_checked(g.model())
        assert conv_channels(slimmed) == [4]


def test_flatten_squeeze_and_matmul():
    g = GraphBuilder(opset=13)
    x = g.input([2, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[4])])
    flat = g.op("Flatten", [g.op("MaxPool", [y], kernel_shape=[4, 4], strides=[4, 4])], axis=1)
    a = g.op("MatMul", [flat, g.const(g.weights(24, 7))])
    pooled = g.op("Squeeze", [g.op("GlobalAveragePool", [y]), g.const(np.array([2, 3], np.int64))])
    b = g.op("MatMul", [pooled, g.const(g.weights(6, 7))])
    g.output(g.op("Add", [a, b]))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [5]


def test_channel_shuffle_deletes_zero_channels_of_one_group():
    """Channels 0 and 1 of the first of 2 groups: the shuffle is a permutation (one Gather), so both go."""
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[0, 1])])
    y = g.op("Reshape", [y, g.const(np.array([1, 2, 4, 8, 8], np.int64))])
    y = g.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = g.op("Reshape", [y, g.const(np.array([1, 8, 8, 8], np.int64))])
    head(g, y, 8)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed)[0] == 6


def test_zero_inception_branch_and_its_concat_slice_are_removed():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    a = g.op("Relu", [g.conv(x, 4, 6)])
    b = g.op("Relu", [g.conv(g.op("Relu", [g.conv(x, 4, 3, k=1, pad=0)]), 3, 5)])
    b = g.op("Mul", [b, g.const(np.float32(0.0))])  # a branch mask of 0
    head(g, g.op("Concat", [a, b], axis=1), 11)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 4]
    assert "Concat" not in ops(slimmed)


def test_tile_of_spatial_axes_passes_channels():
    """``x.repeat(1, 1, 2, 2)`` (Tile with repeats [1, 1, 2, 2]) copies each channel's plane: 3 masked
    channels, 0 -> 3 deleted (before: Tile had no rule); repeating the channel axis stays a barrier."""
    for repeats, deleted in (([1, 1, 2, 2], 3), ([1, 2, 1, 1], 0)):
        g = GraphBuilder()
        y = g.mask(g.conv(g.input([1, 3, 6, 6]), 3, 8), 8, zeros=[1, 4, 6])
        tiled = g.op("Tile", [y, g.const(np.array(repeats, np.int64))])
        head(g, tiled, 8 * repeats[1])
        _, report = slim_checked(g.model())
        assert report.deleted_masked_channels == deleted, report.format_table()


@pytest.mark.parametrize("windows", [True, False], ids=["swin_windows", "tokens_to_rows"])
def test_reshape_that_keeps_the_channels_last_layout_passes_them(windows):
    """A Reshape that merges the batch with other axes but leaves the channel axis last as it was: Swin's
    window partition ``(N, H/2, 2, W/2, 2, C) -> permute -> (N * 4, 4, C)``, or tokens to rows
    ``(N, H, W, C) -> (N * H * W, C)`` before a Linear. 3 masked channels: 0 -> 3 deleted (before: the
    Reshape that merged the batch was a barrier)."""
    g = GraphBuilder()
    y = g.mask(g.conv(g.input([1, 3, 4, 4]), 3, 8), 8, zeros=[1, 4, 6])
    y = g.op("Transpose", [y], perm=[0, 2, 3, 1])
    if windows:
        y = g.op("Reshape", [y, g.const(np.array([1, 2, 2, 2, 2, 8], np.int64))])
        y = g.op("Transpose", [y], perm=[0, 1, 3, 2, 4, 5])
        y = g.op("Reshape", [y, g.const(np.array([-1, 4, 8], np.int64))])
    else:
        y = g.op("Reshape", [y, g.const(np.array([-1, 8], np.int64))])
    g.output(g.op("Add", [g.op("MatMul", [y, g.const(g.weights(8, 6))]), g.const(g.weights(6, scale=0.1))]))
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 3, report.format_table()
    assert conv_channels(slimmed) == [5]


def test_flatten_of_the_batch_and_token_axes_passes_channels_on_the_last_axis():
    """LeViT's ``LinearNorm``: ``bn(x.flatten(0, 1)).reshape_as(x)`` on a (B, N, C) sequence is Flatten
    with axis 2: rows merge the batch and the tokens, and each channel stays one column, so the masked
    hidden channels of the MLP go: 2 (0 before: "flattens across the batch" was a barrier)."""
    g = GraphBuilder()
    y = g.conv(g.input([1, 3, 4, 4]), 3, 6)
    y = g.op("Transpose", [g.op("Reshape", [y, g.const(np.array([1, 6, 16], np.int64))])], perm=[0, 2, 1])
    y = g.op("Add", [g.op("MatMul", [y, g.const(g.weights(6, 8))]), g.const(g.weights(8, scale=0.1))])
    y = g.bn(g.op("Flatten", [y], axis=2), 8)
    y = g.op("Reshape", [y, g.const(np.array([1, 16, 8], np.int64))])
    y = g.op("Relu", [g.op("Mul", [y, g.const(g.mask_values(8, [1, 5]))])])
    g.output(g.op("MatMul", [y, g.const(g.weights(8, 6))]))
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 2, report.format_table()


def test_reshape_that_splits_merged_rows_and_the_channels_into_heads():
    """The dynamo spelling of LeViT's attention: ``(B*N, C) -> (B, N, heads, d)`` both un-merges the rows
    and splits the channels on the last axis; rows keep their elements, so the head dim maps as in a
    per-sample Reshape and the masked head channel goes in every head: 1 (0 before: "regroups the channel
    axis")."""
    g = GraphBuilder()
    y = g.conv(g.input([1, 3, 4, 4]), 3, 6)
    y = g.op("Transpose", [g.op("Reshape", [y, g.const(np.array([1, 6, 16], np.int64))])], perm=[0, 2, 1])
    y = g.op("Reshape", [y, g.const(np.array([16, 6], np.int64))])
    y = g.op("Add", [g.op("MatMul", [y, g.const(g.weights(6, 8))]), g.const(g.weights(8, scale=0.1))])
    y = g.op("Reshape", [y, g.const(np.array([1, 16, 2, 4], np.int64))])
    y = g.op("Relu", [g.op("Mul", [y, g.const(g.mask_values(4, [1]))])])
    y = g.op("Reshape", [y, g.const(np.array([1, 16, 8], np.int64))])
    g.output(g.op("MatMul", [y, g.const(g.weights(8, 3))]))
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 1, report.format_table()


def test_reshape_transpose_chain_that_mixes_space_into_channels_is_not_a_permutation():
    """(N, 16, 4, 4) -> (N, 4, 4, 4, 4) -> swap the second channel factor with H -> (N, 16, 4, 4): output
    channel (c1, h) reads a row of every input channel c1*4 + c2, so the chain is not turned into a Gather
    (which would move whole channels); the slimmed model stays exact. The c2 factor lands on axis 2, which
    the head conv slides over: the masked rows (c2 = 1) go from the first conv and a Gather / Mul on axis 2
    puts zero rows back before the head (rules/conv.py, a conv along the channel axis)."""
    g = GraphBuilder(opset=13)
    y = g.op("Relu", [g.mask(g.conv(g.input([1, 3, 4, 4]), 3, 16), 16, zeros=[1, 5, 9, 13])])
    y = g.op("Reshape", [y, g.const(np.array([1, 4, 4, 4, 4], np.int64))])
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 1, 3, 2, 4]), g.const(np.array([1, 16, 4, 4], np.int64))])
    head(g, y, 16)
    slimmed, report = slim_checked(g.model())
    gathers = [n for n in slimmed.graph.node if n.op_type == "Gather"]
    assert "Transpose" in ops(slimmed) and [helper.get_attribute_value(n.attribute[0]) for n in gathers] == [2]
    assert report.masked_channels == report.deleted_masked_channels == 4


def test_megvii_channel_shuffle_of_a_batch_of_one_maps_its_pairs():
    """megvii's ShuffleNetV2 ``channel_shuffle`` (YOLO-FastestV2, exported at batch 1): ``(1, 16, H, W) ->
    (8, 2, H*W)``, ``perm (1, 0, 2)``, ``-> (2, -1, 8, H, W)``, then ``x[0]`` (the even channels, kept as
    they are) and ``x[1]`` (the odd ones, into a conv). The first Reshape merges the batch of 1 with the
    channels: the whole tensor maps, channels ``2k, 2k + 1`` go together. Masks: A's channels 2, 3 (one
    pair) and B's channel 0 (half a pair, whose twin B[1] is live): 2 of 3 deleted (before: a barrier, 0)."""
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    a = g.mask(g.op("Relu", [g.conv(x, 3, 8)]), 8, zeros=[2, 3])
    b = g.mask(g.op("Relu", [g.conv(x, 3, 8)]), 8, zeros=[0])
    y = g.op("Reshape", [g.op("Concat", [a, b], axis=1), g.const(np.array([8, 2, 36], np.int64))])
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[1, 0, 2]), g.const(np.array([2, -1, 8, 6, 6], np.int64))])
    even, odd = (g.op("Gather", [y, g.const(np.array(k, np.int64))], axis=0) for k in (0, 1))
    branch = g.op("Relu", [g.conv(g.conv(odd, 8, 8, k=1, pad=0), 8, 8, groups=8)])
    head(g, g.op("Concat", [even, branch], axis=1), 16)
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == 3 and report.deleted_masked_channels == 2, report.format_table()
    assert conv_channels(slimmed)[:2] == [6, 8]


@pytest.mark.parametrize("normalised", [False, True], ids=["gated", "instance-norm"])
def test_groups_moved_into_the_batch_keep_the_channel_axis_when_groups_outnumber_their_channels(normalised):
    """SA-Net (G = 64 groups of C/G = 8 and more) at G = 4 > C/G = 2: ``(1, 8, H, W) -> (4, 2, H, W)``, a
    per-sample gate (or an InstanceNormalization of each sample, a GroupNorm export's), back to ``(1, 8, H,
    W)``. Channel j of every group is one component on axis 1: the mask of channel 1 in every group
    deletes 4 channels (before: the finest map put the 4 groups on the batch axis, the head conv saw its
    channels on axis 0 and was a barrier, 0 of 4; torch's SA-Net at c=32, G=8, prune 0.5: 0 -> 17)."""
    g = GraphBuilder()
    y = g.mask(g.op("Relu", [g.conv(g.input([1, 3, 4, 4]), 3, 8)]), 8, zeros=[1, 3, 5, 7])
    y = g.op("Reshape", [y, g.const(np.array([4, 2, 4, 4], np.int64))])
    if normalised:
        y = g.op("InstanceNormalization", [y, g.const(np.ones(2, np.float32)), g.const(np.zeros(2, np.float32))])
    y = g.op("Mul", [y, g.op("Sigmoid", [g.op("Mul", [y, g.const(np.full((1, 2, 1, 1), 0.7, np.float32))])])])
    head(g, g.op("Reshape", [y, g.const(np.array([1, 8, 4, 4], np.int64))]), 8)
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 4, report.format_table()
    assert conv_channels(slimmed) == [4, 4]
    assert slim(slimmed)[0].SerializeToString() == slimmed.SerializeToString()


@pytest.mark.parametrize("preprocessing", [[], ["Mul"], ["Mul", "Sub"], ["Mul", "Pad"]])
def test_an_nhwc_input_normalised_before_its_transpose_feeds_a_prunable_conv(preprocessing):
    """tf2onnx's M-LSD: ``x / 127.5 - 1`` on the NHWC input, then ``Transpose(0, 3, 1, 2)`` and the first
    conv (tf2onnx's M-LSD with alpha pads first). The Transpose decides the input's layout through the
    normalisation and the pad too, so the first conv's 2 masked channels go (before, with either: the
    conv was a barrier, 0 deleted)."""
    g = GraphBuilder()
    x = g.input([1, 8, 8, 3])
    for op in preprocessing:
        pads = np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64)  # TF "same" padding of H, W in NHWC
        x = g.op(op, [x, g.const(pads)]) if op == "Pad" else g.op(op, [x, g.const(np.float32(0.5))])
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    head(g, g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[2, 5])]), 8)
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 2, report.format_table()
    assert conv_channels(slimmed) == [6, 4]


def test_scatternd_of_whole_channel_rows_couples_data_and_updates():
    """ScatterND with 1-tuples over the batch axis (``out[0] = u[0]``): whole rows of channels are written,
    update channel c into output channel c; both masked alike, the 3 zero channels go from both convs
    (before: no rule, a barrier)."""
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 6, 6])
    data = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[1, 4, 6])])
    updates = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[1, 4, 6])])
    head(g, g.op("ScatterND", [data, g.const(np.array([[0]], np.int64)), updates]), 8)
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 6, report.format_table()
    assert conv_channels(slimmed)[:2] == [5, 5]


def test_nhwc_channel_shuffle_between_transposes_becomes_one_gather():
    """tf2onnx's spelling of a channel shuffle: Transpose to NHWC, Reshape (N, H, W, g, C/g), Transpose
    (0, 1, 2, 4, 3), Reshape back, Transpose to NCHW: the five moves permute whole channels, so they
    become one Gather and the 3 masked channels go (each its own unit)."""
    g = GraphBuilder(opset=13)
    y = g.op("Relu", [g.mask(g.conv(g.input([1, 3, 4, 4]), 3, 8), 8, zeros=[1, 2, 6])])
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 3, 1]), g.const(np.array([1, 4, 4, 2, 4], np.int64))])
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 1, 2, 4, 3]), g.const(np.array([1, 4, 4, 8], np.int64))])
    head(g, g.op("Transpose", [y], perm=[0, 3, 1, 2]), 8)
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 3, report.format_table()
    assert [n.op_type for n in slimmed.graph.node if n.op_type in ("Gather", "Transpose", "Reshape")] == ["Gather"]


@pytest.mark.parametrize(("starts", "ends", "steps", "zeros", "op"), [
    (7, -9, -1, [1, 4, 6], "Slice"),  # x.flip(1): the kept channels reversed, a Slice still
    (0, 8, 2, [2, 4], "Slice"),  # x[:, 0::2] keeps channels 0 and 6: new positions 0, 4 (step 4)
    (0, 8, 2, [3], "Gather"),  # keeps 0, 2, 4, 6: new positions 0, 2, 3, 5 (no step): a Gather
])
def test_strided_slice_of_the_channel_axis_selects_channels(starts, ends, steps, zeros, op):
    """A Slice with a step on the channel axis takes a list of channels (before: a barrier holding them
    all); a second conv reads every channel, so the unselected zero ones go too."""
    g = GraphBuilder(opset=13)
    y = g.op("Relu", [g.mask(g.conv(g.input([1, 3, 6, 6]), 3, 8), 8, zeros=zeros)])
    sliced = g.op("Slice", [y, *(g.const(np.array([v], np.int64)) for v in (starts, ends, 1, steps))])
    width = len(range(8)[slice(starts, ends, steps)])
    g.output(g.conv(sliced, width, 4), g.conv(y, 8, 4))
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == len(zeros), report.format_table()
    assert op in ops(slimmed) and conv_channels(slimmed)[0] == 8 - len(zeros)
