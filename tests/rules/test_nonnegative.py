"""``ChannelAnalysis.nonnegative`` / ``positive``: which tensors are provably >= 0 / > 0, answered by each
producer's rule (``Rule.nonnegative`` / ``Rule.positive``) from the ONNX operator spec; constants by their
values, graph inputs never. A division by a positive tensor keeps zero channels zero (L2 normalisation)."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, slim_checked

from onnxslim.graph.slim import analyse

# case -> (builder of the tensor from (g, signed, positive), expected answer); ``signed`` is a conv output
# (either sign), ``positive`` is Relu(signed)
CASES = {
    "relu": (lambda g, s, p: g.op("Relu", [s]), True),
    "sigmoid": (lambda g, s, p: g.op("Sigmoid", [s]), True),
    "hard_sigmoid": (lambda g, s, p: g.op("HardSigmoid", [s], alpha=-2.0, beta=-1.0), True),
    "softplus": (lambda g, s, p: g.op("Softplus", [s]), True),
    "abs": (lambda g, s, p: g.op("Abs", [s]), True),
    "exp": (lambda g, s, p: g.op("Exp", [s]), True),
    "relu6_clip": (lambda g, s, p: g.op("Clip", [s, g.const(np.float32(0)), g.const(np.float32(6))]), True),
    "clip_below_zero": (lambda g, s, p: g.op("Clip", [s, g.const(np.float32(-1)), g.const(np.float32(6))]), False),
    "clip_of_positive": (lambda g, s, p: g.op("Clip", [p, g.const(np.float32(-1)), g.const(np.float32(6))]), True),
    "clip_max_negative": (lambda g, s, p: g.op("Clip", [p, g.const(np.float32(-3)), g.const(np.float32(-1))]), False),
    "thresholded_relu": (lambda g, s, p: g.op("ThresholdedRelu", [s], alpha=0.5), True),
    "leaky_relu_of_signed": (lambda g, s, p: g.op("LeakyRelu", [s]), False),
    "leaky_relu_of_positive": (lambda g, s, p: g.op("LeakyRelu", [p]), True),
    "tanh_of_positive": (lambda g, s, p: g.op("Tanh", [p]), True),
    "hardswish_of_signed": (lambda g, s, p: g.op("HardSwish", [s]), False),
    "neg_of_positive": (lambda g, s, p: g.op("Neg", [p]), False),
    "mul_by_nonnegative_mask": (lambda g, s, p: g.mask(p, 8, zeros=[1, 2]), True),
    "mul_by_mask_with_a_negative_entry": (
        lambda g, s, p: g.mask(p, 8, values=np.array([1, 0, -0.5, 1, 1, 1, 0, 1], np.float32)), False),
    "relu_times_sigmoid": (lambda g, s, p: g.op("Mul", [p, g.op("Sigmoid", [s])]), True),
    "add_of_positive_and_signed": (lambda g, s, p: g.op("Add", [p, s]), False),
    "max_of_positive_and_signed": (lambda g, s, p: g.op("Max", [s, p]), True),
    "min_of_positive_and_signed": (lambda g, s, p: g.op("Min", [s, p]), False),
    "sub_of_positives": (lambda g, s, p: g.op("Sub", [p, p]), False),
    "div_by_positive_constant": (lambda g, s, p: g.op("Div", [p, g.const(np.float32(6))]), True),
    "div_by_computed_positive": (lambda g, s, p: g.op("Div", [p, g.op("Exp", [s])]), False),
    "max_pool": (lambda g, s, p: g.op("MaxPool", [p], kernel_shape=[2, 2]), True),
    "average_pool_of_signed": (lambda g, s, p: g.op("AveragePool", [s], kernel_shape=[2, 2]), False),
    "global_lp_pool_of_signed": (lambda g, s, p: g.op("GlobalLpPool", [s]), True),
    "resize_nearest": (lambda g, s, p: g.op("Resize", [p, "", g.const(np.array([1, 1, 2, 2], np.float32))]), True),
    "resize_cubic": (
        lambda g, s, p: g.op("Resize", [p, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="cubic"), False),
    "pad_zero": (lambda g, s, p: g.op("Pad", [p, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))]), True),
    "pad_negative_fill": (
        lambda g, s, p: g.op("Pad", [p, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1])), g.const(np.float32(-1))]), False),
    "pad_reflect": (lambda g, s, p: g.op("Pad", [p, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))], mode="reflect"), True),
    "softmax": (lambda g, s, p: g.op("Softmax", [s], axis=3), True),
    "log_softmax": (lambda g, s, p: g.op("LogSoftmax", [s], axis=3), False),
    "concat_of_positives": (lambda g, s, p: g.op("Concat", [p, g.op("Sigmoid", [s])], axis=1), True),
    "concat_with_signed": (lambda g, s, p: g.op("Concat", [p, s], axis=1), False),
    "transpose_reshape_slice": (lambda g, s, p: g.op("Slice", [
        g.op("Reshape", [g.op("Transpose", [p], perm=[0, 2, 3, 1]), g.const(np.array([1, -1, 8]))]),
        g.const(np.array([0])), g.const(np.array([4])), g.const(np.array([2]))]), True),
    "reduce_max_over_channels": (lambda g, s, p: g.op("ReduceMax", [p], axes=[1]), True),
    "reduce_l2_of_signed": (lambda g, s, p: g.op("ReduceL2", [s], axes=[1]), True),
    "reduce_log_sum_exp": (lambda g, s, p: g.op("ReduceLogSumExp", [p], axes=[1]), False),
    "conv_of_positive": (lambda g, s, p: g.conv(p, 8, 4), False),
    "batchnorm_with_a_positive_shift": (lambda g, s, p: g.op("BatchNormalization", [p, *(g.const(np.full(8, v, np.float32))
                                                                                       for v in (1.5, 0.2, 0.1, 1.0))]), True),
    "batchnorm_with_a_negative_shift": (lambda g, s, p: g.op("BatchNormalization", [p, *(g.const(np.full(8, v, np.float32))
                                                                                        for v in (1.5, 0.0, 0.1, 1.0))]), False),
    # QuantizeLinear / DequantizeLinear (QDQ models): DQ(q) = (q - z) * s is >= 0 when s > 0 and q >= z
    "dq_of_q_of_positive_int8": (lambda g, s, p: _dq(g, _q(g, p, np.int8(0)), np.int8(0)), True),
    "dq_of_q_of_signed_int8": (lambda g, s, p: _dq(g, _q(g, s, np.int8(0)), np.int8(0)), False),
    "dq_uint8_zero_point_0_of_signed": (lambda g, s, p: _dq(g, _q(g, s, np.uint8(0)), np.uint8(0)), True),
    "dq_int8_zero_point_min_of_signed": (lambda g, s, p: _dq(g, _q(g, s, np.int8(-128)), np.int8(-128)), True),
    "dq_uint8_zero_point_128_of_positive": (lambda g, s, p: _dq(g, _q(g, p, np.uint8(128)), np.uint8(128)), True),
    "dq_uint8_zero_point_128_of_signed": (lambda g, s, p: _dq(g, _q(g, s, np.uint8(128)), np.uint8(128)), False),
    "dq_mismatched_zero_points": (lambda g, s, p: _dq(g, _q(g, p, np.int8(0)), np.int8(3)), False),
    "dq_negative_scale": (lambda g, s, p: _dq(g, _q(g, p, np.int8(0)), np.int8(0), scale=-0.1), False),
}


def _q(g, x, zero_point, scale=0.1):
    return g.op("QuantizeLinear", [x, g.const(np.float32(scale)), g.const(zero_point)])


def _dq(g, q, zero_point, scale=0.1):
    return g.op("DequantizeLinear", [q, g.const(np.float32(scale)), g.const(zero_point)])


@pytest.mark.parametrize("case", list(CASES))
def test_nonnegative_answers(case):
    build, expected = CASES[case]
    g = GraphBuilder(opset=17)
    x = g.input([1, 3, 8, 8])
    signed = g.conv(x, 3, 8)
    tensor = build(g, signed, g.op("Relu", [signed]))
    g.output(tensor)
    analysis = analyse(g.model())
    assert analysis.nonnegative(tensor) is expected
    assert analysis.nonnegative(tensor) is expected  # memoised: the same answer
    assert analysis.nonnegative(x) is False  # a graph input can be anything
    assert analysis.nonnegative(signed) is False


def test_constants_answer_by_their_values():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    w = g.const(np.abs(g.weights(8, 3, 3, 3)), "w")
    b = g.const(np.array([0.5, -0.5] * 4, np.float32), "b")
    g.output(g.op("Conv", [x, w, b], pads=[1, 1, 1, 1]))
    analysis = analyse(g.model())
    assert analysis.nonnegative(w) is True
    assert analysis.nonnegative(b) is False


def test_a_deep_chain_is_answered_without_recursion():
    """3000 ops between the ReLU and the question: producers are answered in topological order."""
    g = GraphBuilder()
    y = g.op("Relu", [g.conv(g.input([1, 3, 4, 4]), 3, 4)])
    for position in range(3000):
        y = g.op("Tanh" if position % 2 else "MaxPool", [y], **({} if position % 2 else {"kernel_shape": [1, 1]}))
    g.output(y)
    assert analyse(g.model()).nonnegative(y) is True


@pytest.mark.parametrize("zero_point, expected", [(np.uint8(7), True), (np.int8(0), False)])
def test_quantized_integers_are_nonnegative_when_unsigned(zero_point, expected):
    g = GraphBuilder(opset=17)
    q = _q(g, g.conv(g.input([1, 3, 8, 8]), 3, 8), zero_point)
    g.output(_dq(g, q, zero_point))
    assert analyse(g.model()).nonnegative(q) is expected


# case -> (builder from (g, signed, nonnegative), expected answer of positive())
POSITIVE = {
    "sqrt_of_sum_of_squares_plus_eps": (lambda g, s, p: g.op("Add", [
        g.op("Sqrt", [g.op("ReduceSum", [g.op("Pow", [s, g.const(np.float32(2))]), g.const(np.array([1]))])]),
        g.const(np.float32(1e-10))]), True),
    "signed_plus_eps": (lambda g, s, p: g.op("Add", [s, g.const(np.float32(1e-10))]), False),
    "square_of_signed_plus_eps": (lambda g, s, p: g.op("Add", [g.op("Pow", [s, g.const(np.float32(2))]),
                                                               g.const(np.float32(1e-10))]), True),
    "cube_of_signed_plus_eps": (lambda g, s, p: g.op("Add", [g.op("Pow", [s, g.const(np.float32(3))]),
                                                             g.const(np.float32(1e-10))]), False),
    "nonnegative_plus_zero": (lambda g, s, p: g.op("Add", [p, g.const(np.float32(0))]), False),
    "clip_min_eps": (lambda g, s, p: g.op("Clip", [s, g.const(np.float32(1e-12))]), True),
    "clip_min_zero": (lambda g, s, p: g.op("Clip", [s, g.const(np.float32(0))]), False),
    "max_with_eps": (lambda g, s, p: g.op("Max", [s, g.const(np.float32(1e-6))]), True),
    "min_of_eps_and_signed": (lambda g, s, p: g.op("Min", [s, g.const(np.float32(1e-6))]), False),
    "exp_underflows": (lambda g, s, p: g.op("Exp", [s]), False),
    "sigmoid_underflows": (lambda g, s, p: g.op("Sigmoid", [s]), False),
    "relu_of_nonnegative": (lambda g, s, p: g.op("Relu", [p]), False),
    "expand_of_positive": (lambda g, s, p: g.op("Expand", [
        g.op("Clip", [g.op("ReduceL2", [s], axes=[1]), g.const(np.float32(1e-12))]),
        g.const(np.array([1, 8, 8, 8]))]), True),
    "product_of_positives_underflows": (lambda g, s, p: g.op("Mul", [*[g.op("Clip", [s, g.const(np.float32(1e-30))])] * 2]),
                                        False),
}


@pytest.mark.parametrize("case", list(POSITIVE))
def test_positive_answers(case):
    build, expected = POSITIVE[case]
    g = GraphBuilder(opset=17)
    signed = g.conv(g.input([1, 3, 8, 8]), 3, 8)
    tensor = build(g, signed, g.op("Relu", [signed]))
    g.output(tensor)
    analysis = analyse(g.model())
    assert analysis.positive(tensor) is expected
    assert analysis.positive(signed) is False


def _l2_norm_ssd(g, y):
    """SSD's L2Norm layer as exported: ``y / (sqrt(sum_c y^2) + eps) * weight[c]``."""
    norm = g.op("Sqrt", [g.op("ReduceSum", [g.op("Pow", [y, g.const(np.float32(2))]), g.const(np.array([1]))])])
    y = g.op("Div", [y, g.op("Add", [norm, g.const(np.float32(1e-10))])])
    return g.op("Mul", [y, g.const(np.full((1, 8, 1, 1), 20.0, np.float32))])


def _normalize(g, y):
    """``F.normalize(y, dim=1)``: ``y / max(||y||_2, eps)`` over the channels."""
    return g.op("Div", [y, g.op("Clip", [g.op("ReduceL2", [y], axes=[1]), g.const(np.float32(1e-12))])])


def _exp_gate(g, y):
    """``y / exp(z)``: exp can underflow to 0, so 0 / 0 is not ruled out and zero channels are kept."""
    return g.op("Div", [y, g.op("Exp", [g.conv(g.nodes[0].input[0], 3, 1)])])


@pytest.mark.parametrize(("normalise", "deleted"), [(_l2_norm_ssd, 3), (_normalize, 3), (_exp_gate, 0)])
def test_l2_normalisation_keeps_zero_channels_zero(normalise, deleted):
    g = GraphBuilder(opset=13)
    y = g.mask(g.op("Relu", [g.bn(g.conv(g.input([1, 3, 8, 8]), 3, 8, bias=False), 8)]), 8, zeros=[1, 4, 6])
    g.output(g.conv(normalise(g, y), 8, 4))
    _, report = slim_checked(g.model())
    assert (report.masked_channels, report.deleted_masked_channels) == (3, deleted), report.format_table()
