"""Elementwise rules: which ops multiply, are identities, and let a positive scale pass (mask folding)."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, assert_equivalent, conv_channels, head, ops, slim_checked
from onnx import TensorProto, helper

from onnxslim.graph.rules import default_rules
from onnxslim.graph.slim import slim


@pytest.mark.parametrize("op, multiplies, identity, commutes", [
    ("Mul", True, False, False), ("Add", False, False, False), ("PRelu", False, False, True),
    ("Relu", False, False, True), ("Identity", False, True, True), ("Sigmoid", False, False, False),
])
def test_facts_the_cleanup_asks(op, multiplies, identity, commutes):
    node = helper.make_node(op, ["a", "b"] if op in ("Mul", "Add", "PRelu") else ["a"], ["y"])
    rule = default_rules().rule_for(node)
    assert (rule.multiplies(node), rule.is_identity(node), rule.commutes_with_positive_scale(node)) == \
        (multiplies, identity, commutes)


@pytest.mark.parametrize("act, folds_into_producer", [("PRelu", True), ("Sigmoid", False)])
def test_a_positive_mask_scale_moves_through_prelu_but_not_sigmoid(act, folds_into_producer):
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    y = g.conv(x, 3, 4)
    y = g.op("PRelu", [y, g.const(g.weights(4, 1, 1), "slope")]) if act == "PRelu" else g.op(act, [y])
    g.output(g.op("Relu", [g.mask(y, 4, zeros=[])]))  # no consumer with weights: only the producer can fold
    model = g.model()
    slimmed, report = slim(model)
    assert report.folded_masks == int(folds_into_producer)
    assert_equivalent(model, slimmed)


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


@pytest.mark.parametrize("spelling", ["where_greater", "masked_fill", "hardshrink", "not_and"])
def test_where_of_a_comparison_keeps_zero_channels_zero(spelling):
    """``torch.where(y > t, y, 0)``, ``y.masked_fill(y < t, 0)``, Hardshrink (``Where(|y| <= l, 0, y)``)
    and a logical mask: on a zero channel the condition is a constant and both branches are 0, so the
    channel stays zero. 3 masked channels: 0 -> 3 deleted (before: the comparison was a barrier)."""
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    y = g.mask(g.conv(x, 3, 8), 8, zeros=[1, 4, 6])
    t, zero = g.const(np.float32(0.2)), g.const(np.float32(0.0))
    if spelling == "where_greater":
        y = g.op("Where", [g.op("Greater", [y, t]), y, zero])
    elif spelling == "masked_fill":
        y = g.op("Where", [g.op("Less", [y, t]), zero, y])
    elif spelling == "hardshrink":
        y = g.op("Where", [g.op("LessOrEqual", [g.op("Abs", [y]), t]), zero, y])
    else:
        band = g.op("And", [g.op("Not", [g.op("Less", [y, t])]), g.op("GreaterOrEqual", [y, zero])])
        y = g.op("Where", [band, y, g.op("Mul", [y, g.const(np.float32(0.1))])])
    head(g, y, 8)
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 3, report.format_table()
    assert conv_channels(slimmed) == [5, 4]
