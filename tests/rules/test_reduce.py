"""Reduce rule: reductions over spatial axes pass channels; ReduceMax over the channel axis deletes zero
channels of a provably non-negative input, and keeps them otherwise (see also tests/test_gates.py for the
other reductions over the channel axis, tests/test_cbam.py for CBAM blocks exported from PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, conv_channels, slim_checked


def test_reduce_mean_over_space_is_a_global_pool():
    g = GraphBuilder(opset=13)
    x = g.input([2, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[0, 5])])
    y = g.op("ReduceMean", [y], axes=[2, 3], keepdims=0)
    g.output(g.gemm(y, 6, 3))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4]


# -- ReduceMax / ReduceMin over the channel axis: zero channels go only when the input is provably >= 0 ---

ZEROS = [0, 3, 5]
NEGATIVE_MASK = np.array([0, 1.2, -0.7, 0, 0.9, 0, 1.1, 0.8], np.float32)  # GAL masks can be negative


def _signed(g, y):
    return g.mask(y, 8, zeros=ZEROS)


def _relu(g, y):
    return g.op("Relu", [g.mask(y, 8, zeros=ZEROS)])


def _relu6_times_gate(g, y):  # x * sigmoid(conv(x)): the channel attention of CBAM, with a Relu6
    x = g.op("Clip", [g.mask(y, 8, zeros=ZEROS), g.const(np.float32(0)), g.const(np.float32(6))])
    return g.op("Mul", [x, g.op("Sigmoid", [g.conv(g.op("GlobalAveragePool", [x]), 8, 8, k=1)])])


def _relu_then_negative_mask(g, y):
    return g.mask(g.op("Relu", [y]), 8, values=NEGATIVE_MASK)


def _leaky_relu(g, y):
    return g.op("LeakyRelu", [g.mask(y, 8, zeros=ZEROS)])


@pytest.mark.parametrize("op, features, deleted", [
    ("ReduceMax", _relu, 3), ("ReduceMax", _relu6_times_gate, 3), ("ReduceMax", _signed, 0),
    ("ReduceMax", _relu_then_negative_mask, 0), ("ReduceMax", _leaky_relu, 0), ("ReduceMin", _relu, 0)],
    ids=["max-relu", "max-relu6-gate", "max-signed", "max-negative-mask", "max-leaky-relu", "min-relu"])
def test_max_over_channels_deletes_zeros_of_a_nonnegative_input(op, features, deleted):
    """CBAM spatial attention ``x * sigmoid(conv(max_c(x)))``: on an input >= 0, ``max_c`` over all
    channels is the max over the kept ones. A signed input (no ReLU, a LeakyRelu, a negative mask entry
    after the ReLU) can have a zero channel as its maximum; ReduceMin's minimum is the zero channel."""
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = features(g, g.bn(g.conv(x, 3, 8), 8))
    gate = g.op("Sigmoid", [g.conv(g.op(op, [y], axes=[1], keepdims=1), 1, 1, k=7)])
    g.output(g.conv(g.op("Mul", [y, gate]), 8, 4))
    slimmed, report = slim_checked(g.model())
    assert (report.masked_channels, report.deleted_masked_channels) == (3, deleted), report.format_table()
    assert conv_channels(slimmed)[0] == 8 - deleted
    if not deleted:
        why = "the input is not provably >= 0" if op == "ReduceMax" else "can be the minimum"
        assert report.kept and all(op in k.reason and why in k.reason for k in report.kept), report.format_table()
