"""Quantized (QDQ) models slim as quantized graphs (issue #11, kind 11).

Built two ways: with onnxruntime.quantization (``quantize_static``, QDQ format, a small calibration
reader) from a masked float model, per channel and per tensor; and by hand with onnx.helper (uint8
activations with non-zero zero points, a float mask between Q/DQ pairs, a mismatched pair). The slimmed
model keeps the int8 weights int8 and the same int8 arithmetic, so onnxruntime's outputs are compared for
*exact* equality (tolerance 0), both with graph optimisations off and with onnxruntime's QDQ fusion on.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import GraphBuilder
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from onnxslim.graph.inspect import inspect_model
from onnxslim.graph.slim import slim


def _run(model: onnx.ModelProto, feeds: dict, optimize: bool) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_exact(reference: onnx.ModelProto, candidate: onnx.ModelProto, shape) -> None:
    feeds = {"x": np.random.default_rng(7).standard_normal(shape).astype(np.float32)}
    for optimize in (False, True):
        for expected, actual in zip(_run(reference, feeds, optimize), _run(candidate, feeds, optimize)):
            assert np.array_equal(expected, actual), (optimize, float(np.abs(expected - actual).max()))


def _masked_float_model() -> tuple[onnx.ModelProto, int]:
    """Conv-mask-Relu twice, a 1x1 Conv, GlobalAveragePool, Gemm; returns (model, zeroed channels)."""
    g = GraphBuilder(opset=17, seed=21)
    x = g.input([1, 3, 16, 16])
    a = g.op("Relu", [g.mask(g.conv(x, 3, 32), 32, zeros=range(0, 32, 3))])  # 11 zero channels
    b = g.op("Relu", [g.mask(g.conv(a, 32, 48), 48, zeros=range(1, 48, 4))])  # 12
    c = g.op("Relu", [g.conv(b, 48, 48, k=1)])
    g.output(g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [c])], axis=1), 48, 10))
    return g.model(), 23


class _Calibration(CalibrationDataReader):
    def __init__(self, count: int = 8):
        self.batches = iter([{"x": np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32)}
                             for i in range(count)])

    def get_next(self):
        return next(self.batches, None)


def _quantize(model: onnx.ModelProto, tmp_path, per_channel: bool, quant_format=QuantFormat.QDQ) -> onnx.ModelProto:
    source, target = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, str(source))
    quantize_static(str(source), str(target), _Calibration(), quant_format=quant_format, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(target))


def _weights(model: onnx.ModelProto) -> dict[int, int]:
    """Bytes of initializer data per element type."""
    sizes: dict[int, int] = {}
    for tensor in model.graph.initializer:
        sizes[tensor.data_type] = sizes.get(tensor.data_type, 0) + len(numpy_helper.to_array(tensor).tobytes())
    return sizes


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_onnxruntime_qdq_model_slims_quantized(per_channel, tmp_path):
    float_model, zeroed = _masked_float_model()
    qdq = _quantize(float_model, tmp_path, per_channel)
    slimmed, report = slim(qdq)
    assert (report.masked_channels, report.deleted_masked_channels) == (zeroed, zeroed), report.format_table()
    _assert_exact(qdq, slimmed, (1, 3, 16, 16))
    before, after = _weights(qdq), _weights(slimmed)
    assert after.get(TensorProto.INT8, 0) < before[TensorProto.INT8]  # int8 weights stay int8, fewer
    assert after.get(TensorProto.FLOAT, 0) <= before[TensorProto.FLOAT]  # nothing was dequantized
    assert len(slimmed.SerializeToString()) < len(qdq.SerializeToString())
    assert report.params_after < report.params_before
    layers = inspect_model(qdq).layers  # quantized weights count as the layers' params
    assert [layer.params for layer in layers][:2] == [32 * 3 * 9 + 32, 48 * 32 * 9 + 48]


def _qdq(g: GraphBuilder, x: str, scale: float, zero_point: int, dq_zero_point: int | None = None) -> str:
    """A per-tensor uint8 QuantizeLinear -> DequantizeLinear pair (``dq_zero_point`` to mismatch it)."""
    s = g.const(np.float32(scale), "s")
    q = g.op("QuantizeLinear", [x, s, g.const(np.uint8(zero_point), "zp")])
    zp = zero_point if dq_zero_point is None else dq_zero_point
    return g.op("DequantizeLinear", [q, s, g.const(np.uint8(zp), "zp")])


def _quantized_conv(g: GraphBuilder, x: str, cin: int, cout: int, per_channel: bool = True) -> str:
    """Conv with an int8 weight behind DequantizeLinear (per output channel, axis 0) and an int32 bias."""
    w = g.rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int8)
    scale = g.rng.uniform(0.001, 0.01, cout if per_channel else 1).astype(np.float32)
    zero_point = np.zeros(scale.shape, np.int8)
    if not per_channel:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    weight = g.op("DequantizeLinear", [g.const(w, "wq"), g.const(scale, "ws"), g.const(zero_point, "wz")], axis=0)
    bias_scale = np.full(cout, 0.0001, np.float32)
    bias = g.op("DequantizeLinear", [g.const(g.rng.integers(-500, 500, cout).astype(np.int32), "bq"),
                                     g.const(bias_scale, "bs")], axis=0)
    return g.op("Conv", [x, weight, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_hand_built_qdq_graph(per_channel):
    """x -> QDQ -> Conv(DQ int8) -> QDQ -> float mask -> QDQ -> Conv(DQ int8) -> QDQ, uint8 activations with
    zero points 128 / 3 / 0. Channels 1, 2, 5 are masked; a second mask sits behind a Q/DQ pair whose
    zero points differ (3 vs 4), so its zero channels come out as the constant -s and are kept."""
    g = GraphBuilder(opset=13, seed=22)
    x = _qdq(g, g.input([1, 4, 8, 8]), 0.05, 128)
    y = _qdq(g, _quantized_conv(g, x, 4, 8, per_channel), 0.02, 3)
    y = _qdq(g, g.op("Relu", [g.mask(y, 8, zeros=(1, 2, 5))]), 0.01, 0)
    y = _qdq(g, _quantized_conv(g, y, 8, 6, per_channel), 0.02, 3)
    z = _qdq(g, g.mask(y, 6, zeros=(0, 4)), 0.02, 3, dq_zero_point=4)  # zero -> (3 - 4) * 0.02
    g.output(g.op("GlobalAveragePool", [_quantized_conv(g, z, 6, 5, per_channel)]))
    model = g.model()
    slimmed, report = slim(model)
    assert (report.masked_channels, report.deleted_masked_channels) == (5, 3), report.format_table()
    assert [len(k.channels) for k in report.kept] == [2]
    _assert_exact(model, slimmed, (1, 4, 8, 8))
    int8 = {t.name: t for t in slimmed.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 4}
    assert sorted(tuple(t.dims)[:2] for t in int8.values()) == [(5, 4), (5, 6), (6, 5)]


def _spatial_gate_model() -> tuple[onnx.ModelProto, int]:
    """CBAM-style spatial gate: Conv-mask-Relu, max over channels, 3x3 Conv to one channel, Sigmoid,
    the features times the gate, Conv, pooled Gemm; returns (model, zeroed channels)."""
    g = GraphBuilder(opset=17, seed=23)
    zeros = (0, 3, 4, 9, 15)
    a = g.op("Relu", [g.mask(g.conv(g.input([1, 3, 16, 16]), 3, 16), 16, zeros=zeros)])
    top = g.op("ReduceMax", [a], axes=[1], keepdims=1)
    gated = g.op("Mul", [a, g.op("Sigmoid", [g.conv(top, 1, 1)])])
    c = g.op("Relu", [g.conv(gated, 16, 8)])
    g.output(g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [c])], axis=1), 8, 10))
    return g.model(), len(zeros)


def test_max_over_channels_of_a_dequantized_relu(tmp_path):
    """The max over channels reads DQ(Q(Relu(.))): with a positive scale and the pair's own zero point
    the dequantized map is >= 0 (rules/quant.py ``nonnegative``), so its zero channels cannot be the max
    and are deleted; outputs stay bit-equal."""
    float_model, zeroed = _spatial_gate_model()
    qdq = _quantize(float_model, tmp_path, per_channel=True)
    readers = {n.input[0] for n in qdq.graph.node if n.op_type == "ReduceMax"}
    assert any(n.op_type == "DequantizeLinear" and n.output[0] in readers for n in qdq.graph.node)
    slimmed, report = slim(qdq)
    assert (report.masked_channels, report.deleted_masked_channels) == (zeroed, zeroed), report.format_table()
    _assert_exact(qdq, slimmed, (1, 3, 16, 16))


def _fake_quantized_conv(g: GraphBuilder, x: str, cin: int, cout: int, per_channel: bool) -> str:
    """Conv whose float weight is fake-quantized, DQ(Q(w)) sharing one int8 scale and zero point (how
    QAT exports write it: torch.fake_quantize_per_channel_affine, pytorch-quantization for TensorRT)."""
    w = g.weights(cout, cin, 3, 3)
    scale = (np.abs(w).reshape(cout, -1).max(axis=1) / 127).astype(np.float32)
    scale = scale if per_channel else scale.max().reshape(())
    s, z = g.const(scale, "ws"), g.const(np.zeros(scale.shape, np.int8), "wz")
    axis = {"axis": 0} if per_channel else {}
    weight = g.op("DequantizeLinear", [g.op("QuantizeLinear", [g.const(w, "w"), s, z], **axis), s, z], **axis)
    return g.op("Conv", [x, weight, g.const(g.weights(cout, scale=0.1), "b")], kernel_shape=[3, 3], pads=[1, 1, 1, 1])


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_fake_quantized_weights_and_constants(per_channel):
    """QAT-style graph: fake-quantized conv weights, and a decomposed HardSwish whose constant 3 is
    itself behind a Q/DQ pair (onnxruntime's quantizer writes that for a ``Constant`` node). Both are
    read as constants: the masked channels go, each weight keeps its QuantizeLinear -> DequantizeLinear
    form with a sliced float input, and the outputs stay bit-equal."""
    g = GraphBuilder(opset=13, seed=24)
    x = _qdq(g, g.input([1, 4, 8, 8]), 0.05, 128)
    y = _qdq(g, _fake_quantized_conv(g, x, 4, 8, per_channel), 0.05, 128)
    y = _qdq(g, g.mask(y, 8, zeros=(1, 2, 5)), 0.05, 128)
    three = _qdq(g, g.const(np.float32(3.0)), 3.0 / 255, 0)
    y = _qdq(g, g.op("Mul", [y, _qdq(g, g.op("Relu", [g.op("Add", [y, three])]), 0.05, 0)]), 0.1, 128)
    g.output(_fake_quantized_conv(g, y, 8, 6, per_channel))
    model = g.model()
    slimmed, report = slim(model)
    assert (report.masked_channels, report.deleted_masked_channels) == (3, 3), report.format_table()
    _assert_exact(model, slimmed, (1, 4, 8, 8))
    inits = {t.name: t for t in slimmed.graph.initializer}
    weights = [inits[n.input[0]] for n in slimmed.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    assert sorted(tuple(t.dims)[:2] for t in weights if len(t.dims) == 4) == [(5, 4), (6, 5)]


def test_a_mask_scale_is_not_folded_into_fake_quantized_weights():
    """Conv(fake-quantized) -> mask -> Relu -> Conv(fake-quantized): the zero channels go, but the mask's
    other scales stay a Mul; folding them into a weight would store it dequantized (float) and undo the
    int8 quantization of that layer. Every conv still reads DQ(Q(float weight))."""
    g = GraphBuilder(opset=13, seed=25)
    x = _qdq(g, g.input([1, 4, 8, 8]), 0.05, 128)
    y = g.op("Relu", [g.mask(_fake_quantized_conv(g, x, 4, 8, True), 8, zeros=(0, 3))])
    g.output(_fake_quantized_conv(g, _qdq(g, y, 0.05, 0), 8, 6, True))
    model = g.model()
    slimmed, report = slim(model)
    assert (report.masked_channels, report.deleted_masked_channels) == (2, 2), report.format_table()
    assert report.folded_masks == 0 and len(report.remaining_masks) == 1
    _assert_exact(model, slimmed, (1, 4, 8, 8))
    producers = {o: n for n in slimmed.graph.node for o in n.output}
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in slimmed.graph.node if n.op_type == "Conv")


def test_qoperator_model_slims(tmp_path):
    # onnxruntime's QOperator format (QLinearConv, QLinearMul of the mask, QGemm ...): the masked channels
    # go (rules/qoperator.py; tests/test_qoperator_models.py); uint8 activations with full-range int8
    # weights get the saturation note (this feed happens to compare bit for bit)
    model, _ = _masked_float_model()
    quantized = _quantize(model, tmp_path, per_channel=True, quant_format=QuantFormat.QOperator)
    assert any(node.op_type == "QLinearConv" for node in quantized.graph.node)
    slimmed, report = slim(quantized)
    _assert_exact(quantized, slimmed, (1, 3, 16, 16))
    assert [(layer.channels_before, layer.channels_after) for layer in report.layers[:2]] == [(32, 21), (48, 36)]
    assert any("saturate" in note for note in report.notes), report.notes


@pytest.mark.parametrize("opset", [13, 19])
def test_quantized_pad_arithmetic_folds(opset):
    """A static quantizer puts a Q/DQ pair on every float tensor, also on the float arithmetic of TF
    "same" pads (tf_efficientnet exports: Sub, Clip, Div of sizes, then Cast to int64) and on a Pad's
    fill value. Those pairs reach only the Pad's parameter inputs, so they fold like the float graph's and
    the Pad passes channels (before: "pads or fill value are computed", a barrier holding every masked
    channel); the Q/DQ of data (a scale the features are multiplied by) and of weights stay."""
    g = GraphBuilder(opset=opset, seed=26)
    x = _qdq(g, g.input([1, 4, 8, 8]), 0.05, 128)
    y = _qdq(g, g.op("Relu", [g.mask(_quantized_conv(g, x, 4, 8), 8, zeros=(0, 3, 6))]), 0.02, 0)
    need = g.op("Sub", [_qdq(g, g.const(np.float32(3.0)), 0.05, 0), _qdq(g, g.const(np.float32(1.0)), 0.05, 0)])
    half = g.op("Div", [g.op("Clip", [_qdq(g, need, 0.05, 0), _qdq(g, g.const(np.float32(0.0)), 0.05, 0)]),
                        _qdq(g, g.const(np.float32(2.0)), 0.05, 0)])
    pads = g.op("Mul", [g.op("Cast", [_qdq(g, half, 0.05, 0)], to=TensorProto.INT64),
                        g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pattern")])
    padded = g.op("Pad", [y, pads, _qdq(g, g.const(np.float32(0.0)), 0.05, 0)])
    scaled = _qdq(g, g.op("Mul", [padded, _qdq(g, g.const(np.float32(1.5)), 0.05, 0)]), 0.05, 0)
    g.output(g.op("GlobalAveragePool", [_quantized_conv(g, scaled, 8, 5)]))
    model = g.model()
    slimmed, report = slim(model)
    assert (report.masked_channels, report.deleted_masked_channels) == (3, 3), report.format_table()
    _assert_exact(model, slimmed, (1, 4, 8, 8))
    producers = {o: n for n in slimmed.graph.node for o in n.output}
    pad = next(n for n in slimmed.graph.node if n.op_type == "Pad")
    assert all(name not in producers for name in pad.input[1:])  # pads and fill are constants now
    mul = next(n for n in slimmed.graph.node if n.op_type == "Mul" and n.input[0] == pad.output[0])
    assert producers[mul.input[1]].op_type == "DequantizeLinear"  # the data scale stays quantized
    int8 = {t.name for t in slimmed.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 4}
    assert sum(n.op_type == "DequantizeLinear" and n.input[0] in int8 for n in slimmed.graph.node) == 2


@pytest.mark.parametrize("bits", [8, 7])
def test_qdq_convs_that_lose_input_channels_with_8_bit_weights_get_the_saturation_note(bits):
    """onnxruntime fuses DQ -> Conv -> Q into a QLinearConv, whose AVX2 u8s8 kernels saturate pair sums
    like ConvInteger's: a YOLOv8-lite face detector quantized by ``quantize_static`` (int8 weights) differed
    from its prune reference by up to 0.95 and nothing said why; with ``reduce_range=True`` (7-bit weights)
    bit for bit. The note names the convs reading thinned uint8 activations with weights beyond 7 bits."""
    g = GraphBuilder(opset=13, seed=26)
    x = _qdq(g, g.input([1, 4, 8, 8]), 0.05, 128)
    y = _qdq(g, g.op("Relu", [g.mask(_quantized_conv(g, x, 4, 8), 8, zeros=(1, 2, 5))]), 0.01, 0)
    g.output(_qdq(g, _quantized_conv(g, y, 8, 6), 0.02, 3))
    model = g.model()
    if bits == 7:
        for tensor in model.graph.initializer:
            if tensor.data_type == TensorProto.INT8:
                tensor.CopyFrom(numpy_helper.from_array(np.clip(numpy_helper.to_array(tensor), -64, 64), tensor.name))
    slimmed, report = slim(model)
    assert report.deleted_masked_channels == 3
    notes = [note for note in report.notes if "beyond 7 bits" in note]
    if bits == 8:  # the second conv: the first reads every input channel
        second = [node for node in slimmed.graph.node if node.op_type == "Conv"][-1]
        assert len(notes) == 1 and notes[0].startswith(f"1 QDQ conv(s) ({second.name})"), report.notes
    else:
        assert not notes
        _assert_exact(model, slimmed, (1, 4, 8, 8))
