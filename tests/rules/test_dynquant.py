"""DynamicQuantizeLinear, ConvInteger and MatMulInteger rules on hand-built graphs (onnx.helper), the
form onnxruntime's ``quantize_dynamic`` writes: uint8 weights (MatMulInteger's with per-column zero points), a
grouped ConvInteger, a dead filter (its weights all equal its zero point), an input channel the weights
ignore but that is not zero (kept: deleting it would change the run-time scale), and a quantized tensor
read by another op (a barrier). onnxruntime's outputs are compared for exact equality."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, random_feeds, run
from onnx import TensorProto, numpy_helper

from onnxslim.graph.slim import slim


def _dynamic(g: GraphBuilder, x: str, weight: np.ndarray, zero_point: np.ndarray, op: str, **attrs) -> str:
    """DynamicQuantizeLinear(x) -> ``op`` (ConvInteger / MatMulInteger) -> Cast -> Mul by x_scale * w_scale."""
    q, scale, x_zero_point = g.op("DynamicQuantizeLinear", [x], outputs=3)
    y = g.op("Cast", [g.op(op, [q, g.const(weight, "wq"), x_zero_point, g.const(zero_point, "wz")], **attrs)],
             to=TensorProto.FLOAT)
    return g.op("Mul", [y, g.op("Mul", [scale, g.const(np.float32(0.01), "ws")])])


def _model(groups: int):
    """x -> Conv 3 -> 8 (filters 1, 5 zero: no float mask to fold, whose rounding would move the scale) -> Relu -> ConvInteger 8 -> 6 (group ``groups``; filter 2
    dead; input 3 unused when groups = 1) -> Relu -> pool -> MatMulInteger 6 -> 4 (per-column zero point,
    column 1 dead) -> MatMulInteger 4 -> 3. (onnxruntime's ConvInteger takes only a per-tensor weight
    zero point.)"""
    g = GraphBuilder(opset=17, seed=31)
    x = g.op("Relu", [g.conv(g.input([1, 3, 6, 6]), 3, 8, dead=(1, 5))])
    weight = g.rng.integers(0, 256, (6, 8 // groups, 3, 3)).astype(np.uint8)
    weight[2] = 120  # a dead filter: W - w_z = 0
    if groups == 1:
        weight[:, 3] = 120  # input 3 is read by no filter, but it is live
    y = _dynamic(g, x, weight, np.uint8(120), "ConvInteger", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=groups)
    y = g.op("Flatten", [g.op("GlobalAveragePool", [g.op("Relu", [y])])], axis=1)
    zero_point = np.array([128, 0, 255, 17], np.uint8)
    matrix = g.rng.integers(0, 256, (6, 4)).astype(np.uint8)
    matrix[:, 1] = zero_point[1]
    y = _dynamic(g, y, matrix, zero_point, "MatMulInteger")
    g.output(_dynamic(g, y, g.rng.integers(0, 256, (4, 3)).astype(np.uint8), np.uint8(128), "MatMulInteger"))
    return g.model()


def _integer_weights(model) -> dict[str, tuple[int, ...]]:
    init = {t.name: t for t in model.graph.initializer}
    shapes = {}
    for node in model.graph.node:
        if node.op_type.endswith("Integer"):
            shapes.setdefault(node.op_type, []).append(tuple(init[node.input[1]].dims))
    return {op: found[0] if op == "ConvInteger" else found for op, found in shapes.items()}


def _assert_exact(model, slimmed) -> None:
    for seed in range(3):
        feeds = random_feeds(model, seed=seed, batch=1)
        for expected, actual in zip(run(model, feeds), run(slimmed, feeds)):
            assert np.array_equal(expected, actual), float(np.abs(expected - actual).max())


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_integer_and_matmul_integer_delete_zero_channels(groups):
    model = _model(groups)
    slimmed, report = slim(model)
    _assert_exact(model, slimmed)
    shapes = _integer_weights(slimmed)
    # zero inputs 1 and 5 go (one per group when grouped); input 3 stays though no filter reads it:
    # it is not zero, and deleting it could change DynamicQuantizeLinear's range; filter 2 is dead
    # the dead filter 2 goes with one group; with two, groups stay equal (3 + 3 filters) and it stays
    filters = 5 if groups == 1 else 6
    assert shapes["ConvInteger"] == (filters, 6 // groups, 3, 3), report.format_table()  # 8 -> 6 inputs
    assert shapes["MatMulInteger"] == [(filters, 3), (3, 3)]  # the dead column 1 goes with its row after
    init = {t.name: numpy_helper.to_array(t) for t in slimmed.graph.initializer}
    first = next(n for n in slimmed.graph.node if n.op_type == "MatMulInteger")
    assert list(init[first.input[3]]) == [128, 255, 17]  # the per-column zero point is sliced


@pytest.mark.parametrize("q_read_elsewhere", [False, True])
def test_quantized_tensor_read_by_another_op_is_a_barrier(q_read_elsewhere):
    g = GraphBuilder(opset=17, seed=32)
    x = g.op("Relu", [g.conv(g.input([1, 3, 5, 5]), 3, 4, dead=(0, 2))])
    y = _dynamic(g, x, g.rng.integers(0, 256, (4, 4, 1, 1)).astype(np.uint8), np.uint8(0), "ConvInteger",
                 kernel_shape=[1, 1])
    q = next(n for n in g.nodes if n.op_type == "DynamicQuantizeLinear").output[0]
    if q_read_elsewhere:  # the uint8 q read as numbers, where a zero channel is the zero point, not 0
        g.output(y, g.op("Cast", [q], to=TensorProto.FLOAT))
    else:
        g.output(y)
    model = g.model()
    slimmed, _ = slim(model)
    _assert_exact(model, slimmed)
    assert _integer_weights(slimmed)["ConvInteger"] == ((4, 4, 1, 1) if q_read_elsewhere else (4, 2, 1, 1))


@pytest.mark.parametrize("wide", [False, True])
def test_int8_weights_beyond_7_bits_on_a_thinned_input_get_the_saturation_note(wide):
    """onnxruntime's AVX2 u8s8 kernels saturate pair sums of uint8 x int8 products: when a ConvInteger
    loses input channels and its int8 weights use more than 7 bits, the report says the result may differ
    from the input's in the last bits; 7-bit weights (reduce_range) get no note."""
    g = GraphBuilder(opset=17, seed=5)
    x = g.op("Relu", [g.conv(g.input([1, 3, 6, 6]), 3, 8, dead=(1, 5))])
    weight = g.rng.integers(-100 if wide else -64, 100 if wide else 64, (6, 8, 3, 3)).astype(np.int8)
    g.output(_dynamic(g, x, weight, np.int8(0), "ConvInteger", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    slimmed, report = slim(g.model())
    assert _integer_weights(slimmed)["ConvInteger"] == (6, 6, 3, 3)  # inputs 1 and 5 deleted
    noted = [note for note in report.notes if "saturate pair sums" in note]
    assert len(noted) == int(wide)
