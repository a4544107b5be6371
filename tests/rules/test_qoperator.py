"""QOperator rules (``onnxslim/graph/rules/qoperator.py``) on hand-built graphs (onnx.helper): QLinearConv
(per-channel weight scales and zero points, grouped, dead filters whose weights equal their zero point,
an input channel no filter reads), QLinearAdd / QLinearMul / QLinearSigmoid / QLinearConcat /
QLinearGlobalAveragePool, QLinearMatMul and QGemm; the shapes onnx cannot infer for com.microsoft ops;
prune's masks written into the weights. Activations are int8, as ``quantize_static`` writes them by
default; onnxruntime's outputs are compared for exact equality."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import GraphBuilder, random_feeds, run
from onnx import TensorProto, helper, numpy_helper

from onnxslim.graph.prune import prune
from onnxslim.graph.shapes import infer_shapes
from onnxslim.graph.slim import slim

MS = "com.microsoft"


def _model(g: GraphBuilder, output: str, shape: list[int]) -> onnx.ModelProto:
    """The builder's nodes with the com.microsoft opset, one float output of ``shape``."""
    graph = helper.make_graph(g.nodes, "q", g.inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 9
    return model


def _params(g: GraphBuilder, scale: float, zero_point: int) -> list[str]:
    return [g.const(np.float32(scale), "s"), g.const(np.int8(zero_point), "z")]


def _qconv(g, x, x_params, cin, cout, zero_point, groups=1, dead=(), unused=()) -> tuple[str, list[str]]:
    """QLinearConv with int8 weights within 7 bits, per-output-channel scales and zero points (1..cout);
    filters ``dead`` equal their zero point and have bias 0; column ``unused`` equals it in every filter."""
    w_zero = np.arange(1, cout + 1, dtype=np.int8)
    weight = (g.rng.integers(-60, 61, (cout, cin // groups, 3, 3)) + w_zero[:, None, None, None]).astype(np.int8)
    bias = g.rng.integers(-300, 300, cout).astype(np.int32)
    weight[list(dead)] = w_zero[list(dead), None, None, None]
    bias[list(dead)] = 0
    for column in unused:
        weight[:, column] = w_zero[:, None, None]
    y_params = _params(g, 0.05, zero_point)
    inputs = [x, *x_params, g.const(weight, "w"), g.const(g.rng.uniform(0.002, 0.01, cout).astype(np.float32), "ws"),
              g.const(w_zero, "wz"), *y_params, g.const(bias, "b")]
    return g.op("QLinearConv", inputs, kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=groups), y_params


def _weight_dims(model: onnx.ModelProto, op_type: str, slot: int = 3) -> list[tuple[int, ...]]:
    init = {t.name: t for t in model.graph.initializer}
    return [tuple(init[n.input[slot]].dims) for n in model.graph.node if n.op_type == op_type]


def _assert_exact(model, slimmed) -> None:
    for seed in range(3):
        feeds = random_feeds(model, seed=seed, batch=1)
        for expected, actual in zip(run(model, feeds), run(slimmed, feeds)):
            assert np.array_equal(expected, actual), float(np.abs(expected - actual).max())


def _slim_exact(model: onnx.ModelProto):
    """slim(model), after checking onnxruntime gives the result bit for bit the outputs of ``model``."""
    slimmed, report = slim(model)
    _assert_exact(model, slimmed)
    return slimmed, report


def _conv_chain(groups: int) -> onnx.ModelProto:
    """x -> Q -> QLinearConv 4 -> 8 (filters 1, 5 dead) -> QLinearConv 8 -> 6 (``groups``; filter 2 dead;
    input 3 read by no filter when groups = 1) -> QLinearGlobalAveragePool -> Flatten -> QGemm 6 -> 4 (transB)
    -> DequantizeLinear."""
    g = GraphBuilder(seed=41)
    x_params = _params(g, 0.05, 3)
    q = g.op("QuantizeLinear", [g.input([1, 4, 8, 8]), *x_params])
    y, y_params = _qconv(g, q, x_params, 4, 8, -5, dead=(1, 5))
    y, y_params = _qconv(g, y, y_params, 8, 6, 7, groups=groups, dead=(2,), unused=(3,) if groups == 1 else ())
    pooled_params = _params(g, 0.02, -2)
    y = g.op("Flatten", [g.op("QLinearGlobalAveragePool", [y, *y_params, *pooled_params], domain=MS, channels_last=0)])
    matrix = g.rng.integers(-60, 61, (4, 6)).astype(np.int8)
    out_params = _params(g, 0.1, 0)
    y = g.op("QGemm", [y, *pooled_params, g.const(matrix, "B"), g.const(np.float32(0.01), "bs"), g.const(np.int8(0), "bz"),
                       g.const(g.rng.integers(-50, 50, 4).astype(np.int32), "C"), *out_params], domain=MS, transB=1)
    return _model(g, g.op("DequantizeLinear", [y, *out_params]), [1, 4])


@pytest.mark.parametrize("groups", [1, 2])
def test_qlinear_conv_deletes_zero_point_channels(groups):
    model = _conv_chain(groups)
    slimmed, report = _slim_exact(model)
    # groups = 1: dead filters 1, 5 and the unread input 3 go; the dead filter 2 of the second conv goes
    # with its QGemm column. groups = 2: one dead filter per group goes (1 and 5), the groups stay equal
    # (3 + 3 inputs), so the second conv's dead filter 2 stays to keep 3 + 3 filters
    first, second = _weight_dims(slimmed, "QLinearConv")
    assert first[0] == (5 if groups == 1 else 6), report.format_table()
    assert second == ((5, 5, 3, 3) if groups == 1 else (6, 3, 3, 3))
    assert _weight_dims(slimmed, "QGemm") == [(4, second[0])]
    init = {t.name: numpy_helper.to_array(t) for t in slimmed.graph.initializer}
    conv = next(n for n in slimmed.graph.node if n.op_type == "QLinearConv")
    kept = [1, 3, 4, 5, 7, 8] if groups == 2 else [1, 3, 5, 7, 8]  # zero points 1..8 of the kept filters
    assert init[conv.input[5]].tolist() == kept and init[conv.input[4]].shape == (len(kept),)
    assert init[conv.input[8]].shape == (len(kept),)


def test_prune_masks_qlinear_weights_at_their_zero_point():
    """prune cannot multiply an int8 tensor by a float mask: the chosen filters are set to their weight
    zero point with bias 0 (output exactly y_zp), and the slimmed model reproduces that masked model."""
    model = _conv_chain(1)
    pruned, report, masked = prune(model, ratio=0.5)
    assert not any(n.op_type == "Mul" for n in masked.graph.node)
    _assert_exact(masked, pruned)
    first, second = (dims[0] for dims in _weight_dims(pruned, "QLinearConv"))
    assert first <= 4 and second == 3, report.format_table()  # filters 1, 3, 5 of the first were free already


def test_add_mul_sigmoid_concat():
    """A, B: QLinearConv 4 -> 6 with dead filters (0, 2) and (0, 3); QLinearAdd(A, B) is at its zero point
    in channel 0 only; swish = QLinearMul(add, QLinearSigmoid(add)) keeps it there; QLinearConcat(swish, A)
    -> QLinearConv 12 -> 5. Deleted: channel 0 (of A, B, the add, swish and both concat parts); A's 2 is
    coupled through the add with B's live 2, B's 3 with A's live 3."""
    g = GraphBuilder(seed=42)
    x_params = _params(g, 0.05, 3)
    q = g.op("QuantizeLinear", [g.input([1, 4, 6, 6]), *x_params])
    a, a_params = _qconv(g, q, x_params, 4, 6, -5, dead=(0, 2))
    b, b_params = _qconv(g, q, x_params, 4, 6, 9, dead=(0, 3))
    add_params = _params(g, 0.08, -1)
    added = g.op("QLinearAdd", [a, *a_params, b, *b_params, *add_params], domain=MS)
    sig_params, mul_params = _params(g, 1 / 256, -128), _params(g, 0.06, 4)
    sig = g.op("QLinearSigmoid", [added, *add_params, *sig_params], domain=MS)
    swish = g.op("QLinearMul", [added, *add_params, sig, *sig_params, *mul_params], domain=MS)
    cat_params = _params(g, 0.07, 2)
    cat = g.op("QLinearConcat", [*cat_params, swish, *mul_params, a, *a_params], domain=MS, axis=1)
    y, y_params = _qconv(g, cat, cat_params, 12, 5, 0)
    model = _model(g, g.op("DequantizeLinear", [y, *y_params]), [1, 5, 6, 6])
    slimmed, report = _slim_exact(model)
    assert _weight_dims(slimmed, "QLinearConv") == [(5, 4, 3, 3), (5, 4, 3, 3), (5, 10, 3, 3)], report.format_table()


def test_sigmoid_of_a_zero_point_channel_is_not_zero():
    """QLinearSigmoid maps the zero point to Q(1/2): a conv reading it holds every channel (as float Sigmoid)."""
    g = GraphBuilder(seed=46)
    x_params = _params(g, 0.05, 3)
    q = g.op("QuantizeLinear", [g.input([1, 4, 6, 6]), *x_params])
    a, a_params = _qconv(g, q, x_params, 4, 6, -5, dead=(0, 2))
    sig_params = _params(g, 1 / 256, -128)
    y, y_params = _qconv(g, g.op("QLinearSigmoid", [a, *a_params, *sig_params], domain=MS), sig_params, 6, 3, 0)
    model = _model(g, g.op("DequantizeLinear", [y, *y_params]), [1, 3, 6, 6])
    slimmed, report = _slim_exact(model)
    assert _weight_dims(slimmed, "QLinearConv") == [(6, 4, 3, 3), (3, 6, 3, 3)], report.format_table()


def test_concat_drops_an_input_that_loses_every_channel():
    g = GraphBuilder(seed=43)
    x_params = _params(g, 0.05, 0)
    q = g.op("QuantizeLinear", [g.input([1, 3, 6, 6]), *x_params])
    live, live_params = _qconv(g, q, x_params, 3, 4, 1)
    dead, dead_params = _qconv(g, q, x_params, 3, 2, -3, dead=(0, 1))
    cat_params = _params(g, 0.07, 2)
    cat = g.op("QLinearConcat", [*cat_params, live, *live_params, dead, *dead_params], domain=MS, axis=1)
    y, y_params = _qconv(g, cat, cat_params, 6, 3, 0)
    model = _model(g, g.op("DequantizeLinear", [y, *y_params]), [1, 3, 6, 6])
    slimmed, _ = _slim_exact(model)
    concat = next(n for n in slimmed.graph.node if n.op_type == "QLinearConcat")
    assert len(concat.input) == 5 and _weight_dims(slimmed, "QLinearConv")[-1] == (3, 4, 3, 3)


def test_qlinear_matmul_per_column_zero_points():
    """x (5, 8) -> Q -> QLinearMatMul 8 -> 6 (per-column zero points, column 1 dead) ->
    QLinearMatMul 6 -> 3: column 1 and the row that reads it go."""
    g = GraphBuilder(seed=44)
    x_params = _params(g, 0.05, 3)
    q = g.op("QuantizeLinear", [g.input([5, 8]), *x_params])
    zero = np.array([0, -3, 5, 1, 2, -1], np.int8)
    matrix = (g.rng.integers(-60, 61, (8, 6)) + zero).astype(np.int8)
    matrix[:, 1] = zero[1]
    h_params = _params(g, 0.05, -4)
    h = g.op("QLinearMatMul", [q, *x_params, g.const(matrix, "B"), g.const(np.full(6, 0.01, np.float32), "bs"),
                               g.const(zero, "bz"), *h_params])
    out_params = _params(g, 0.1, 1)
    y = g.op("QLinearMatMul", [h, *h_params, g.const(g.rng.integers(-60, 61, (6, 3)).astype(np.int8), "B2"),
                               g.const(np.float32(0.01), "bs2"), g.const(np.int8(0), "bz2"), *out_params])
    model = _model(g, g.op("DequantizeLinear", [y, *out_params]), [5, 3])
    slimmed, _ = _slim_exact(model)
    assert _weight_dims(slimmed, "QLinearMatMul") == [(8, 5), (5, 3)]
    init = {t.name: numpy_helper.to_array(t) for t in slimmed.graph.initializer}
    first = next(n for n in slimmed.graph.node if n.op_type == "QLinearMatMul")
    assert init[first.input[5]].tolist() == [0, 5, 1, 2, -1]
    pruned, report, masked = prune(model, ratio=0.5)  # masks: B's columns set to their zero points
    _assert_exact(masked, pruned)
    assert _weight_dims(pruned, "QLinearMatMul") == [(8, 3), (3, 3)], report.format_table()


@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_contrib_shapes_match_onnxruntime(ceil_mode):
    """onnx infers nothing for com.microsoft ops; the shapes slim gives them are onnxruntime's (none
    after a QLinearAveragePool with ceil_mode, where onnx's AveragePool formula and onnxruntime differ)."""
    g = GraphBuilder(seed=45)
    x_params = _params(g, 0.05, 0)
    q = g.op("QuantizeLinear", [g.input([1, 3, 11, 9]), *x_params])
    pooled = g.op("QLinearAveragePool", [q, *x_params, *x_params], domain=MS, kernel_shape=[3, 2], strides=[2, 3],
                  pads=[1, 0, 1, 1], ceil_mode=ceil_mode)
    relu = g.op("QLinearLeakyRelu", [pooled, *x_params, *x_params], domain=MS, alpha=0.1)
    both = g.op("QLinearConcat", [*x_params, relu, *x_params, relu, *x_params], domain=MS, axis=1)
    out = g.op("QLinearGlobalAveragePool", [both, *x_params, *x_params], domain=MS, channels_last=0)
    model = _model(g, g.op("DequantizeLinear", [out, *x_params]), [1, 6, 1, 1])
    shapes = infer_shapes(model)
    feeds = random_feeds(model, batch=1)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.INT8, None) for name in (pooled, relu, both, out))
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for name, value in zip((pooled, relu, both, out), session.run(None, feeds)):
        assert shapes.get(name) == (None if ceil_mode else value.shape), name


_ONE_INPUT = {  # op: extra attributes; inputs X, X_scale, X_zp, Y_scale, Y_zp
    "QLinearGlobalAveragePool": {"channels_last": 0},
    "QLinearAveragePool": {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    "QLinearLeakyRelu": {"alpha": 0.1},
}


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul", "QLinearConcat", *_ONE_INPUT])
def test_zero_point_in_zero_point_out(op, dtype):
    """The fact the rules stand on, checked against onnxruntime for random scales and zero points: a
    channel at its input zero point comes out at the output zero point (QLinearMul: whatever the other
    operand holds; QLinearConcat: that input's channels)."""
    rng = np.random.default_rng(47)
    info = np.iinfo(dtype)
    for _ in range(10):
        points = rng.integers(info.min, info.max + 1, 3).astype(dtype)
        scales = np.exp(rng.uniform(-6, 1, 3)).astype(np.float32)
        zero_input = np.full((1, 4, 5, 5), points[0], dtype)
        other = rng.integers(info.min, info.max + 1, (1, 4, 5, 5)).astype(dtype)
        inits = [numpy_helper.from_array(v, n) for n, v in zip(("as", "az", "bs", "bz", "ys", "yz"),
                                                               (scales[0], points[0], scales[1], points[1], scales[2], points[2]))]
        names = {"QLinearAdd": ["a", "as", "az", "a", "as", "az", "ys", "yz"],
                 "QLinearMul": ["a", "as", "az", "b", "bs", "bz", "ys", "yz"],
                 "QLinearConcat": ["ys", "yz", "a", "as", "az", "b", "bs", "bz"]}.get(op, ["a", "as", "az", "ys", "yz"])
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        node = helper.make_node(op, names, ["y"], domain=MS, **(_ONE_INPUT.get(op) or ({"axis": 1} if op == "QLinearConcat" else {})))
        inputs = [helper.make_tensor_value_info(n, elem, [1, 4, 5, 5]) for n in ("a", "b") if n in names]
        graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", elem, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
        feeds = {"a": zero_input, "b": other} if "b" in names else {"a": zero_input}
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        assert np.all(y[:, :4] == points[2]), (scales, points)


def test_weight_quantized_at_run_time_folds():
    """onnxruntime's quantizer writes ``QuantizeLinear(float weight)`` when the weight is a Constant node
    (Paddle2ONNX models): the quantizer folds (normalize.weight_quantizers), and the filters whose float
    weights are 0 (at the zero point once quantized) go."""
    g = GraphBuilder(seed=48)
    x_params = _params(g, 0.05, 3)
    q = g.op("QuantizeLinear", [g.input([1, 4, 6, 6]), *x_params])
    weight = g.weights(6, 4, 3, 3)
    weight[[1, 4]] = 0
    w_params = _params(g, 0.01, 0)
    quantized_weight = g.op("QuantizeLinear", [g.const(weight, "wf"), *w_params])
    y_params = _params(g, 0.05, -7)
    y = g.op("QLinearConv", [q, *x_params, quantized_weight, *w_params, *y_params], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    z, z_params = _qconv(g, y, y_params, 6, 3, 0)
    model = _model(g, g.op("DequantizeLinear", [z, *z_params]), [1, 3, 6, 6])
    slimmed, report = _slim_exact(model)
    assert _weight_dims(slimmed, "QLinearConv") == [(4, 4, 3, 3), (3, 4, 3, 3)], report.format_table()
    assert not any(n.op_type == "QuantizeLinear" and n.input[0].startswith("wf") for n in slimmed.graph.node)


def test_shapes_reach_through_a_long_chain_of_contrib_ops():
    """Shape inference reaches through 40 contrib ops alternating with default-domain ones in one pass
    (before proxies, one inference round per contrib op, at most 16)."""
    g = GraphBuilder(seed=49)
    params = _params(g, 0.05, 0)
    y = g.op("QuantizeLinear", [g.input([1, 4, 6, 6]), *params])
    for _ in range(40):
        y = g.op("MaxPool", [g.op("QLinearLeakyRelu", [y, *params, *params], domain=MS, alpha=0.1)], kernel_shape=[1, 1])
    model = _model(g, g.op("DequantizeLinear", [y, *params]), [1, 4, 6, 6])
    shapes = infer_shapes(model)
    assert shapes[y] == (1, 4, 6, 6)


def test_qgemm_with_float_output():
    """QGemm without y_scale writes float (``alpha * (A - a_zp)(B - b_zp) * a_s * b_s``, plus C): B not
    transposed here; the dead conv filter's row of B goes."""
    g = GraphBuilder(seed=50)
    x_params = _params(g, 0.05, 3)
    q = g.op("QuantizeLinear", [g.input([1, 4, 6, 6]), *x_params])
    y, y_params = _qconv(g, q, x_params, 4, 6, -5, dead=(2,))
    pooled_params = _params(g, 0.02, -2)
    y = g.op("Flatten", [g.op("QLinearGlobalAveragePool", [y, *y_params, *pooled_params], domain=MS, channels_last=0)])
    out = g.op("QGemm", [y, *pooled_params, g.const(g.rng.integers(-60, 61, (6, 3)).astype(np.int8), "B"),
                         g.const(np.float32(0.01), "bs"), g.const(np.int8(0), "bz"),
                         g.const(g.rng.integers(-50, 50, 3).astype(np.int32), "C")], domain=MS, alpha=0.5)
    model = _model(g, out, [1, 3])
    slimmed, report = _slim_exact(model)
    assert _weight_dims(slimmed, "QGemm") == [(5, 3)], report.format_table()


def test_prune_masks_no_int8_tensor_onnx_cannot_type():
    """QLinearConv -> Transpose -> channels-last QLinearAveragePool -> Transpose -> QLinearConv: onnx types
    nothing after the pool (no proxy for a channels-last pool), and prune put a float Mul mask on the int8
    Transpose output (an invalid masked reference: onnxruntime refused Mul(int8, float)). Now an untyped
    tensor takes the type of its first input's chain, the int8 layers are masked in their weights, and the
    pruned model reproduces the masked one bit for bit."""
    g = GraphBuilder(seed=4)
    x_params = _params(g, 0.05, 3)
    q = g.op("QuantizeLinear", [g.input([1, 4, 8, 8]), *x_params])
    y, y_params = _qconv(g, q, x_params, 4, 8, -5, dead=(1, 5))
    pool_params = _params(g, 0.04, 1)
    pooled = g.op("QLinearAveragePool", [g.op("Transpose", [y], perm=[0, 2, 3, 1]), *y_params, *pool_params],
                  domain=MS, kernel_shape=[2, 2], strides=[2, 2], channels_last=1)
    y, y_params = _qconv(g, g.op("Transpose", [pooled], perm=[0, 3, 1, 2]), pool_params, 8, 6, 7, dead=(2,))
    model = _model(g, g.op("DequantizeLinear", [y, *y_params]), [1, 6, 4, 4])
    pruned, report, masked = prune(model, ratio=0.5, round_to=1)
    assert not any(n.op_type == "Mul" for n in masked.graph.node)
    _assert_exact(masked, pruned)
    assert [dims[0] for dims in _weight_dims(pruned, "QLinearConv")] == [4, 6], report.format_table()  # half; the output stays
