"""One small graph per rule: the slimmed model's onnxruntime outputs equal the masked model's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, assert_equivalent
from onnx import TensorProto, helper, numpy_helper

from onnxslim.graph.slim import slim


def slim_checked(model: onnx.ModelProto, **options):
    slimmed, report = slim(model, **options)
    assert_equivalent(model, slimmed)
    assert report.params_after <= report.params_before
    return slimmed, report


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def conv_channels(model: onnx.ModelProto) -> list[int]:
    inits = {t.name: t for t in model.graph.initializer}
    return [int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv"]


def head(g: GraphBuilder, x, c, k=3):
    """A consumer that reduces over channels (a padded conv) and the graph output."""
    y = g.conv(x, c, 4, k=k, pad=k // 2)
    g.output(y)
    return y


# -- masks, dead filters, zero propagation -------------------------------------------------------

def test_mask_after_conv_deletes_channels_and_folds_the_scale():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[0, 3, 4])])
    head(g, y, 8)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [5, 4]
    assert "Mul" not in ops(slimmed)
    assert (report.masked_channels, report.deleted_masked_channels) == (3, 3)
    assert report.folded_masks == 1


def test_dead_filter_with_zero_bias_is_deleted_without_a_mask():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    head(g, g.op("Relu", [g.conv(x, 3, 6, dead=[1, 2])]), 6)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4]


def _dead_weights_positive_bias(g: GraphBuilder, conv_node, channels) -> None:
    """Zero the filters of ``channels`` but give them a positive bias: the channel is the constant b."""
    for slot, value in ((1, 0.0), (2, 0.3)):
        t = next(t for t in g.initializers if t.name == conv_node.input[slot])
        arr = numpy_helper.to_array(t).copy()
        arr[list(channels)] = value
        t.CopyFrom(numpy_helper.from_array(arr, t.name))


def test_dead_filter_with_bias_is_kept_before_a_padded_conv_and_absorbed_by_an_unpadded_one():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    c = g.conv(x, 3, 6)
    _dead_weights_positive_bias(g, g.nodes[-1], [1, 2])
    y = g.op("Relu", [c])
    g.output(g.conv(y, 6, 4, k=3, pad=1), g.conv(y, 6, 4, k=1, pad=0))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 4, 4]  # the padded conv cannot absorb the constant

    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    c = g.conv(x, 3, 6)
    _dead_weights_positive_bias(g, g.nodes[-1], [1, 2])
    g.output(g.conv(g.op("Relu", [c]), 6, 4, k=1, pad=0), g.conv(g.op("Relu", [c]), 6, 4, k=3, pad=0))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4, 4]  # absorbed into both unpadded convs' biases


def test_batchnorm_shift_makes_a_dead_filter_non_zero_and_a_mask_after_bn_deletes_it():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.bn(g.conv(x, 3, 6, dead=[0, 1], bias=False), 6)  # dead filters, but BN shifts them
    head(g, y, 6)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 4]

    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.bn(g.conv(x, 3, 6), 6), 6, zeros=[0, 1])])
    head(g, y, 6)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4]
    assert "Mul" not in ops(slimmed) and report.folded_masks == 1


def test_input_channels_that_every_consumer_ignores_are_deleted_from_the_producer():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 6)])
    a = g.conv(y, 6, 4)
    b = g.conv(y, 6, 4, k=1, pad=0)
    for name in (g.nodes[-2].input[1], g.nodes[-1].input[1]):
        t = next(t for t in g.initializers if t.name == name)
        arr = numpy_helper.to_array(t).copy()
        arr[:, [2, 5]] = 0
        t.CopyFrom(numpy_helper.from_array(arr, name))
    g.output(a, b)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4, 4]


@pytest.mark.parametrize("op,attrs,deleted", [
    ("Relu", {}, True), ("LeakyRelu", {"alpha": 0.1}, True), ("Elu", {}, True), ("Selu", {}, True),
    ("Tanh", {}, True), ("Softsign", {}, True), ("HardSwish", {}, True), ("Identity", {}, True),
    ("Dropout", {}, True), ("Celu", {}, True), ("Sigmoid", {}, False), ("HardSigmoid", {}, False),
    ("Softplus", {}, False), ("Exp", {}, False),
])
def test_activations_keep_zero_exactly_when_f0_is_zero(op, attrs, deleted):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op(op, [g.mask(g.conv(x, 3, 6), 6, zeros=[1, 4])], **attrs)
    head(g, y, 6)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed)[0] == (4 if deleted else 6)
    if not deleted:
        assert report.kept and "constant" in report.kept[0].reason


def test_clip_prelu_and_cast_pass_zero():
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = g.op("Clip", [g.mask(g.conv(x, 3, 6), 6, zeros=[2]), g.const(np.float32(0)), g.const(np.float32(6))])
    y = g.op("PRelu", [y, g.const(g.rng.uniform(0, 0.3, (6, 1, 1)).astype(np.float32))])
    y = g.op("Cast", [y], to=TensorProto.FLOAT)
    head(g, y, 6)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed)[0] == 5


def test_non_zero_constant_is_absorbed_by_gemm_bias():
    g = GraphBuilder()
    x = g.input([2, 3, 8, 8])
    y = g.op("Sigmoid", [g.mask(g.conv(x, 3, 6), 6, zeros=[0, 5])])
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    g.output(g.gemm(y, 6, 4))
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [4]
    assert report.deleted_masked_channels == 2


# -- pooling, resize, pad, reductions ------------------------------------------------------------

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


def test_reduce_mean_over_space_is_a_global_pool():
    g = GraphBuilder(opset=13)
    x = g.input([2, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[0, 5])])
    y = g.op("ReduceMean", [y], axes=[2, 3], keepdims=0)
    g.output(g.gemm(y, 6, 3))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4]


# -- couplings: residual, variadic, SE gating, HardSwish decomposition ---------------------------

def residual_graph(zeros_a, zeros_b, op="Add"):
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    stem = g.op("Relu", [g.mask(g.conv(x, 4, 8), 8, zeros=zeros_a)])
    inner = g.op("Relu", [g.mask(g.conv(stem, 8, 6), 6, zeros=[2])])
    branch = g.mask(g.conv(inner, 6, 8), 8, zeros=zeros_b)
    y = g.op("Relu", [g.op(op, [stem, branch])])
    head(g, y, 8)
    return g.model()


def test_residual_add_couples_channels_and_deletes_shared_zeros():
    slimmed, report = slim_checked(residual_graph([1, 5], [1, 5]))
    assert conv_channels(slimmed) == [6, 5, 6, 4]
    assert report.deleted_masked_channels == report.masked_channels


def test_residual_add_keeps_a_channel_that_is_live_on_the_other_side():
    slimmed, report = slim_checked(residual_graph([1, 5], [5]))
    assert conv_channels(slimmed) == [7, 5, 7, 4]
    assert any("live" in kept.reason for kept in report.kept)


@pytest.mark.parametrize("op", ["Sum", "Max", "Sub", "Mul"])
def test_other_binary_couplings(op):
    slimmed, _ = slim_checked(residual_graph([3], [3], op=op))
    assert conv_channels(slimmed)[0] == 7


def test_sum_of_three_branches():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    branches = [g.mask(g.conv(x, 4, 6), 6, zeros=[0, 2]) for _ in range(3)]
    head(g, g.op("Relu", [g.op("Sum", branches)]), 6)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4, 4, 4]


@pytest.mark.parametrize("gate", ["Sigmoid", "HardSigmoid"])
def test_squeeze_excitation_gating_couples_gate_and_features(gate):
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    feat = g.op("Relu", [g.mask(g.conv(x, 4, 8), 8, zeros=[0, 6])])
    squeeze = g.op("Relu", [g.mask(g.conv(g.op("GlobalAveragePool", [feat]), 8, 4, k=1, pad=0), 4, zeros=[1])])
    excite = g.op(gate, [g.conv(squeeze, 4, 8, k=1, pad=0)])
    head(g, g.op("Mul", [feat, excite]), 8)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 3, 6, 4]
    assert report.deleted_masked_channels == 3


def test_decomposed_hardswish_keeps_zero():
    g = GraphBuilder(opset=11)
    x = g.input([1, 3, 8, 8])
    y = g.mask(g.conv(x, 3, 6), 6, zeros=[2, 3])
    hs = g.op("Div", [g.op("Mul", [y, g.op("Clip", [g.op("Add", [y, g.const(np.float32(3))]),
                                                    g.const(np.float32(0)), g.const(np.float32(6))])]),
                      g.const(np.float32(6))])
    head(g, hs, 6)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4]


# -- grouped and depthwise convs, ConvTranspose, InstanceNorm -------------------------------------

def test_depthwise_conv_ties_input_and_output_channels():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    expand = g.op("Relu", [g.mask(g.conv(x, 4, 12, k=1, pad=0), 12, zeros=[0, 5, 7])])
    dw = g.op("Relu", [g.conv(expand, 12, 12, groups=12)])
    g.output(g.conv(dw, 12, 4, k=1, pad=0))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [9, 9, 4]
    dw_node = [n for n in slimmed.graph.node if n.op_type == "Conv"][1]
    assert helper.get_attribute_value(next(a for a in dw_node.attribute if a.name == "group")) == 9


def test_mask_after_depthwise_deletes_its_input_channel_too():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    expand = g.op("Relu", [g.conv(x, 4, 8, k=1, pad=0)])
    dw = g.op("Relu", [g.mask(g.conv(expand, 8, 8, groups=8), 8, zeros=[1, 2])])
    g.output(g.conv(dw, 8, 4, k=1, pad=0))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 6, 4]


def test_grouped_conv_deletes_a_dead_group_and_balances_the_others():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 4, 8, k=1, pad=0), 8, zeros=[0, 1, 2, 3, 5])])
    grouped = g.op("Relu", [g.conv(y, 8, 6, groups=2)])
    g.output(g.conv(grouped, 6, 4, k=1, pad=0))
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [3, 3, 4]  # group 0 goes (its outputs are absorbed constants)
    assert report.deleted_masked_channels == 5  # channel 5 too: group 1 is the only group left


def test_conv_transpose_as_consumer_and_producer():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 4, 6), 6, zeros=[1, 4])])
    w = g.weights(6, 5, 2, 2)
    up = g.op("ConvTranspose", [y, g.const(w), g.const(g.weights(5, scale=0.1))], kernel_shape=[2, 2], strides=[2, 2])
    up = g.op("Relu", [g.mask(up, 5, zeros=[0])])
    head(g, up, 5)
    slimmed, _ = slim_checked(g.model())
    convt = next(n for n in slimmed.graph.node if n.op_type == "ConvTranspose")
    dims = next(t.dims for t in slimmed.graph.initializer if t.name == convt.input[1])
    assert list(dims) == [4, 4, 2, 2]


def test_grouped_conv_transpose():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 4, 6), 6, zeros=[0, 1, 2])])
    up = g.op("ConvTranspose", [y, g.const(g.weights(6, 2, 2, 2))], kernel_shape=[2, 2], strides=[2, 2], group=2)
    head(g, g.op("Relu", [up]), 4)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed)[0] == 3


def test_instance_norm_passes_channels():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.mask(g.conv(x, 3, 6), 6, zeros=[0, 2])
    y = g.op("InstanceNormalization", [y, g.const(np.ones(6, np.float32)), g.const(np.zeros(6, np.float32))])
    head(g, g.op("Relu", [y]), 6)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4]


# -- Concat, Split, Slice, Gather, Flatten, Reshape, Squeeze, MatMul -----------------------------

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


def test_a_tensor_never_becomes_empty_before_a_conv():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    head(g, g.op("Relu", [g.mask(g.conv(x, 3, 4), 4, zeros=[0, 1, 2, 3])]), 4)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [1, 4]
    assert "does not become empty" in report.kept[0].reason


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


def test_hidden_neurons_of_a_gemm_stack():
    g = GraphBuilder()
    x = g.input([2, 20])
    h = g.op("Relu", [g.mask(g.gemm(x, 20, 16), 16, zeros=range(0, 16, 2), rank=2)])
    g.output(g.gemm(h, 16, 4))
    slimmed, report = slim_checked(g.model())
    assert report.params_after == 20 * 8 + 8 + 8 * 4 + 4


# -- barriers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("barrier", ["LRN", "Softmax", "DepthToSpace", "output"])
def test_barriers_keep_channels(barrier):
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[0, 1])])
    if barrier == "LRN":
        head(g, g.op("LRN", [y], size=3), 8)
    elif barrier == "Softmax":
        head(g, g.op("Softmax", [y], axis=1), 8)
    elif barrier == "DepthToSpace":
        g.output(g.op("DepthToSpace", [y], blocksize=2))
    else:
        g.output(y)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed)[0] == 8
    assert report.kept and "barrier" in report.kept[0].reason or "graph output" in report.kept[0].reason


def test_channel_shuffle_reshape_is_a_barrier():
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[0, 1])])
    y = g.op("Reshape", [y, g.const(np.array([1, 2, 4, 8, 8], np.int64))])
    y = g.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = g.op("Reshape", [y, g.const(np.array([1, 8, 8, 8], np.int64))])
    head(g, y, 8)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed)[0] == 8


# -- exporter spellings ---------------------------------------------------------------------------

def test_constant_nodes_and_ir3_initializers_as_inputs():
    g = GraphBuilder(opset=8)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.bn(g.conv(x, 3, 6), 6), 6, zeros=[0, 3])])
    head(g, y, 6)
    model = g.model(ir_version=3)
    # weights as Constant nodes, the rest listed as graph inputs (IR 3)
    first = model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Constant", [], [first.name], value=first))
    del model.graph.initializer[0]
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model)
    slimmed, _ = slim_checked(model)
    assert slimmed.ir_version == 3
    assert {t.name for t in slimmed.graph.initializer} <= {i.name for i in slimmed.graph.input}
    assert conv_channels(slimmed) == [4, 4]


def test_shared_weight_is_split_when_readers_need_different_slices():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    a = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[0])])
    b = g.op("Relu", [g.conv(x, 3, 6)])
    shared = g.const(g.weights(4, 6, 3, 3))
    g.output(g.op("Conv", [a, shared], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             g.op("Conv", [b, shared], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    slimmed, report = slim_checked(g.model())
    assert sorted(conv_channels(slimmed)) == [4, 4, 6, 6]  # both readers of the weight must agree
    assert sum(list(t.dims) == [4, 6, 3, 3] for t in slimmed.graph.initializer) == 1  # not duplicated


def test_round_to_keeps_multiples():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 16), 16, zeros=range(7))])
    head(g, y, 16)
    slimmed, report = slim_checked(g.model(), round_to=4)
    assert conv_channels(slimmed) == [12, 4]
    assert report.kept and "round" in report.kept[0].reason


def test_inputs_are_never_modified(tmp_path):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    head(g, g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[1])]), 6)
    model = g.model()
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    before_bytes, proto_bytes = path.read_bytes(), model.SerializeToString()
    slim(str(path), tmp_path / "out.onnx")
    slim(model)
    assert path.read_bytes() == before_bytes and model.SerializeToString() == proto_bytes
    assert onnx.load(tmp_path / "out.onnx").graph.node
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


# -- whole structures: a zero residual branch, a zero Inception branch ---------------------------

def test_zero_residual_branch_is_removed_from_the_graph():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    stem = g.op("Relu", [g.conv(x, 4, 8)])
    branch = g.conv(g.op("Relu", [g.conv(stem, 8, 6)]), 6, 8)
    gated = g.op("Mul", [branch, g.const(np.array([0.0], np.float32))])  # a block mask of 0 (GAL)
    y = g.op("Relu", [g.op("Add", [stem, gated])])
    head(g, y, 8)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [8, 4]  # the branch's two convs are gone
    assert "Add" not in ops(slimmed) and "Mul" not in ops(slimmed)


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


def test_a_non_zero_structure_mask_is_folded_into_the_branch():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    stem = g.op("Relu", [g.conv(x, 4, 8)])
    branch = g.op("Mul", [g.bn(g.conv(stem, 8, 8), 8), g.const(np.array([0.7], np.float32))])
    head(g, g.op("Relu", [g.op("Add", [stem, branch])]), 8)
    slimmed, report = slim_checked(g.model())
    assert "Mul" not in ops(slimmed) and report.folded_masks == 1


def test_a_positive_scale_after_relu_and_pooling_folds_into_the_conv_before():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    a = g.op("MaxPool", [g.op("Relu", [g.bn(g.conv(x, 4, 6), 6)])], kernel_shape=[2, 2], strides=[2, 2])
    a = g.op("Mul", [a, g.const(np.array([0.5], np.float32))])  # an Inception branch's structure scale
    b = g.op("MaxPool", [g.op("Relu", [g.conv(x, 4, 5)])], kernel_shape=[2, 2], strides=[2, 2])
    head(g, g.op("Concat", [a, b], axis=1), 11)
    slimmed, report = slim_checked(g.model())
    assert "Mul" not in ops(slimmed) and report.folded_masks == 1
