"""Reduce rule: reductions over spatial axes pass channels (see also tests/test_gates.py for reductions
over the channel axis)."""

from __future__ import annotations

from graphs import GraphBuilder, conv_channels, slim_checked


def test_reduce_mean_over_space_is_a_global_pool():
    g = GraphBuilder(opset=13)
    x = g.input([2, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[0, 5])])
    y = g.op("ReduceMean", [y], axes=[2, 3], keepdims=0)
    g.output(g.gemm(y, 6, 3))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4]
