"""Property: on random DAGs of conv/BN/activation/pool/add/concat/split/gemm with random masks, the
slimmed model passes the checker, is never larger, and its outputs equal the masked model's within
1e-5 x max|output| (fp32)."""

from __future__ import annotations

import numpy as np
from graphs import GraphBuilder, assert_equivalent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxslim.graph.slim import slim

SPATIAL = 6


def build_random_model(data) -> tuple:
    g = GraphBuilder(seed=data.draw(st.integers(0, 2**16), label="seed"))
    x = g.input([2, 3, SPATIAL, SPATIAL])
    pool: list[tuple[str, int]] = [(x, 3)]  # (tensor, channels)
    masked = 0
    steps = data.draw(st.integers(2, 9), label="steps")
    for _ in range(steps):
        kind = data.draw(st.sampled_from(
            ["conv", "conv", "conv_bn_mask", "dwconv", "act", "pool", "add", "concat", "split", "mask", "dead"]), label="op")
        src, c = pool[data.draw(st.integers(0, len(pool) - 1), label="src")]
        if kind in ("conv", "conv_bn_mask", "dead"):
            cout = data.draw(st.integers(1, 8), label="cout")
            k = data.draw(st.sampled_from([1, 3]), label="k")
            dead = data.draw(st.sets(st.integers(0, cout - 1), max_size=cout), label="dead") if kind == "dead" else ()
            y = g.conv(src, c, cout, k=k, pad=k // 2, dead=dead, bias=data.draw(st.booleans(), label="bias"))
            if kind == "conv_bn_mask":
                zeros = data.draw(st.sets(st.integers(0, cout - 1), max_size=cout), label="zeros")
                y = g.mask(g.bn(y, cout), cout, zeros=zeros)
                masked += len(zeros)
            y = g.op(data.draw(st.sampled_from(["Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish"]), label="act"), [y])
            pool.append((y, cout))
        elif kind == "dwconv":
            pool.append((g.op("Relu", [g.conv(src, c, c, k=3, groups=c)]), c))
        elif kind == "act":
            pool.append((g.op(data.draw(st.sampled_from(["Relu", "Elu", "Sigmoid", "HardSigmoid"]), label="act"), [src]), c))
        elif kind == "pool":
            op = data.draw(st.sampled_from(["MaxPool", "AveragePool"]), label="pool")
            pool.append((g.op(op, [src], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), c))
        elif kind == "mask":
            zeros = data.draw(st.sets(st.integers(0, c - 1), max_size=c), label="zeros")
            masked += len(zeros)
            pool.append((g.mask(src, c, zeros=zeros), c))
        elif kind == "add":
            same = [(t, cc) for t, cc in pool if cc == c and t != src]
            if same:
                other, _ = same[data.draw(st.integers(0, len(same) - 1), label="other")]
                pool.append((g.op(data.draw(st.sampled_from(["Add", "Mul", "Max"]), label="binop"), [src, other]), c))
        elif kind == "concat":
            other, oc = pool[data.draw(st.integers(0, len(pool) - 1), label="other")]
            pool.append((g.op("Concat", [src, other], axis=1), c + oc))
        elif kind == "split" and c >= 2:
            first = data.draw(st.integers(1, c - 1), label="split")
            a, b = g.op("Split", [src, g.const(np.array([first, c - first], np.int64))], outputs=2, axis=1)
            pool.extend([(a, first), (b, c - first)])
    last, c = pool[-1]
    if data.draw(st.booleans(), label="flatten"):
        features = g.op("Flatten", [g.op("MaxPool", [last], kernel_shape=[3, 3], strides=[3, 3])], axis=1)
        width = c * (SPATIAL // 3) ** 2
    else:
        features = g.op("Flatten", [g.op("GlobalAveragePool", [last])], axis=1)
        width = c
    hidden = data.draw(st.integers(1, 6), label="hidden")
    zeros = data.draw(st.sets(st.integers(0, hidden - 1), max_size=hidden), label="fczeros")
    h = g.op("Relu", [g.mask(g.gemm(features, width, hidden), hidden, zeros=zeros, rank=2)])
    g.output(g.gemm(h, hidden, 3))
    return g.model(), masked


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_graphs_slim_exactly(data):
    model, _ = build_random_model(data)
    slimmed, report = slim(model)  # runs onnx.checker with full_check
    assert report.params_after <= report.params_before
    assert report.macs_after <= report.macs_before
    assert_equivalent(model, slimmed)
