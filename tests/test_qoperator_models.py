"""Statically quantized models in onnxruntime's QOperator format (``quantize_static(...,
quant_format=QuantFormat.QOperator)``: QuantizeLinear, QLinearConv, uint8/int8 MaxPool, QLinearSigmoid,
QLinearMul, QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, QGemm, DequantizeLinear) slim and prune
exactly.

A torch model (Conv-BN-ReLU, MaxPool, Conv-BN-ReLU, a depthwise conv with SiLU, a 1x1 conv with a
residual add, a Concat, global pooling, a Linear head) with some channels zeroed (filters, biases, BN
shifts) is exported with both torch exporters and quantized with a small random calibration set, per
tensor and per channel. The zeroed channels are at their zero points in the quantized model, and slim
deletes them; onnxruntime's outputs are compared for exact equality (tolerance 0).

Measured (onnxruntime 1.32, AVX2 without VNNI): ``quantize_static``'s default int8 activations with int8
weights compare bit for bit, and so do uint8 activations with ``reduce_range=True``; uint8 activations
with full-range int8 weights (``activation_type=QUInt8``) do not (40 of 40 runs differ, up to 0.2 on the
logits): onnxruntime's u8s8 kernels saturate pair sums of products, so deleting input channels changes
results (a single QLinearConv: 30 of 30 random draws differ when zero-point input channels are deleted,
0 of 30 when output channels are). slim says so in a note. A float layer left between quantized ones
(ConvTranspose: QOperator has no QLinearConvTranspose) is quantized by onnxruntime itself when it loads
the model (its WeightBiasQuantization pass, one scale from the largest weight): when that layer loses
channels the scale can change (5 of 5 runs differ in the test below; none without that pass), and slim
says so in a note.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from onnxslim.cli import main
from onnxslim.graph.inspect import inspect_model
from onnxslim.graph.slim import slim

#: channels zeroed in the residual stream (conv1 and conv3) and in conv2's (and the depthwise conv's) output
RESIDUAL_ZEROS, INNER_ZEROS = (1, 4, 9), (0, 2, 7)
CONVS = ("c1", "c2", "dw", "c3")


class Net(nn.Module):
    """conv1-bn-relu -> maxpool = a; conv2-bn-relu -> depthwise -> SiLU -> conv3 (+ a) = c;
    cat(c, a) -> pool -> Linear(32, 10)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        a = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        b = self.dw(torch.relu(self.b2(self.c2(a))))
        c = self.c3(b * torch.sigmoid(b)) + a
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.cat([c, a], 1), 1), 1))


def _masked_net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for norm in (net.b1, net.b2):
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
            norm.bias.uniform_(-0.1, 0.3)
        for conv, norm, zeros in ((net.c1, net.b1, RESIDUAL_ZEROS), (net.c2, net.b2, INNER_ZEROS),
                                  (net.dw, None, INNER_ZEROS), (net.c3, None, RESIDUAL_ZEROS)):
            conv.weight[list(zeros)] = 0
            conv.bias[list(zeros)] = 0
            if norm is not None:
                norm.running_mean[list(zeros)] = 0
                norm.bias[list(zeros)] = 0
    return net


class _Calibration(CalibrationDataReader):
    def __init__(self, count: int = 8):
        self.batches = iter([{"x": np.random.default_rng(i).standard_normal((1, 3, 12, 12)).astype(np.float32)}
                             for i in range(count)])

    def get_next(self):
        return next(self.batches, None)


def _float_model(tmp_path, dynamo: bool):
    path = tmp_path / f"float_{dynamo}.onnx"
    if not path.exists():
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_masked_net(), (torch.randn(1, 3, 12, 12),), buffer, dynamo=dynamo, input_names=["x"],
                              opset_version=18 if dynamo else 17)
        path.write_bytes(buffer.getvalue())
    return path


def _quantized(tmp_path, dynamo: bool = False, per_channel: bool = False, **options) -> onnx.ModelProto:
    target = tmp_path / "qoperator.onnx"
    quantize_static(str(_float_model(tmp_path, dynamo)), str(target), _Calibration(), per_channel=per_channel,
                    quant_format=QuantFormat.QOperator, **options)
    return onnx.load(str(target))


def _inexact_runs(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> int:
    """Runs (10 inputs, onnxruntime with and without graph optimizations) whose outputs differ at all."""
    differ = 0
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.graph_optimization_level = 1, level
        sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                    for m in (reference, candidate)]
        for seed in range(10):
            x = np.random.default_rng(100 + seed).standard_normal((1, 3, 12, 12)).astype(np.float32) * 2
            expected, actual = (s.run(None, {"x": x})[0] for s in sessions)
            differ += not np.array_equal(expected, actual)
    return differ


def _conv_filters(model: onnx.ModelProto) -> list[int]:
    init = {t.name: t for t in model.graph.initializer}
    return [init[n.input[3]].dims[0] for n in model.graph.node if n.op_type == "QLinearConv"]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_qoperator_model_slims_exactly(dynamo, per_channel, tmp_path):
    model = _quantized(tmp_path, dynamo, per_channel)
    ops = {n.op_type for n in model.graph.node}
    # the dynamo exporter writes the pooling as ReduceMean, which stays float between DQ and Q
    pooling = {"ReduceMean", "DequantizeLinear"} if dynamo else {"QLinearGlobalAveragePool"}
    assert {"QLinearConv", "QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearConcat", "QGemm", "MaxPool"} | pooling <= ops
    slimmed, report = slim(model)
    assert _conv_filters(model) == [16] * 4
    assert _conv_filters(slimmed) == [16 - len(RESIDUAL_ZEROS), 16 - len(INNER_ZEROS), 16 - len(INNER_ZEROS),
                                      16 - len(RESIDUAL_ZEROS)], report.format_table()
    init = {t.name: t for t in slimmed.graph.initializer}
    gemm = next(n for n in slimmed.graph.node if n.op_type == "QGemm")
    assert list(init[gemm.input[3]].dims) == [10, 32 - 2 * len(RESIDUAL_ZEROS)]  # the head loses c's and a's
    assert report.params_after < report.params_before and not report.notes, report.notes
    assert _inexact_runs(model, slimmed) == 0
    # inspect counts a channel at its zero point as zero (its value is the zero point, not 0)
    layers = [layer for layer in inspect_model(model).layers if layer.op_type == "QLinearConv"]
    assert [len(layer.zero_channels) for layer in layers] == [3, 3, 3, 3]


@pytest.mark.parametrize("reduce_range", [False, True])
def test_uint8_activations_with_int8_weights(reduce_range, tmp_path):
    """uint8 activations: bit for bit with 7-bit weights (reduce_range); with full-range int8 weights the
    report says that onnxruntime's u8s8 kernels may make outputs differ (they do here)."""
    model = _quantized(tmp_path, activation_type=QuantType.QUInt8, reduce_range=reduce_range)
    slimmed, report = slim(model)
    notes = [note for note in report.notes if "saturate" in note]
    assert len(notes) == (0 if reduce_range else 2), report.notes  # one for QLinearConv, one for QGemm
    assert (_inexact_runs(model, slimmed) == 0) == reduce_range


def test_prune_qoperator_model_exact_against_masked(tmp_path):
    source, out, masked = tmp_path / "q.onnx", tmp_path / "pruned.onnx", tmp_path / "masked.onnx"
    onnx.save(_quantized(tmp_path, per_channel=True), str(source))
    result = CliRunner().invoke(main, ["prune", str(source), str(out), "--ratio", "0.5", "--round-to", "1",
                                       "--save-masked", str(masked)])
    assert result.exit_code == 0, result.output
    pruned, reference = onnx.load(str(out)), onnx.load(str(masked))
    assert _conv_filters(pruned) == [8, 8, 8, 8], result.output  # half of each conv's 16 filters
    assert not any(n.op_type == "Mul" for n in reference.graph.node)  # masked in the weights
    assert _inexact_runs(reference, pruned) == 0


class UpNet(nn.Module):
    """conv-relu -> ConvTranspose (stays float between DequantizeLinear and QuantizeLinear: QOperator has
    no QLinearConvTranspose) -> relu -> conv."""

    def __init__(self):
        super().__init__()
        self.down, self.up, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.ConvTranspose2d(16, 8, 2, stride=2), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.up(torch.relu(self.down(x)))))


def test_float_layer_between_quantized_ones_gets_a_note(tmp_path):
    """onnxruntime quantizes a float ConvTranspose between DequantizeLinear and QuantizeLinear itself when
    it loads the model (WeightBiasQuantization, one scale from the largest weight): the slimmed model's
    ConvTranspose lost input rows, so the report says so; without that pass the outputs are equal bit for bit."""
    torch.manual_seed(1)
    net = UpNet().eval()
    with torch.no_grad():
        net.down.weight[list(RESIDUAL_ZEROS)] = 0
        net.down.bias[list(RESIDUAL_ZEROS)] = 0
        net.up.weight[list(RESIDUAL_ZEROS)] *= 4  # the largest weights sit in the rows that go
    source, target = tmp_path / "up.onnx", tmp_path / "up_q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 12, 12),), str(source), dynamo=False, input_names=["x"], opset_version=17)
    quantize_static(str(source), str(target), _Calibration(), quant_format=QuantFormat.QOperator)
    model = onnx.load(str(target))
    assert any(n.op_type == "ConvTranspose" for n in model.graph.node)
    slimmed, report = slim(model)
    assert _conv_filters(slimmed)[0] == 16 - len(RESIDUAL_ZEROS), report.format_table()
    assert any("WeightBiasQuantization" in note for note in report.notes), report.notes
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    inexact = []
    for disabled in ([], ["WeightBiasQuantization"]):
        sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                         disabled_optimizers=disabled) for m in (model, slimmed)]
        inputs = (np.random.default_rng(seed).standard_normal((1, 3, 12, 12)).astype(np.float32) for seed in range(5))
        inexact.append(sum(not np.array_equal(*(s.run(None, {"x": x})[0] for s in sessions)) for x in inputs))
    assert inexact[1] == 0 and inexact[0] > 0, inexact  # measured: 5 of 5 differ with the pass (onnxruntime 1.32)
