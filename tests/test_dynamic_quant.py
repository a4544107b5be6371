"""Dynamically quantized models (onnxruntime's ``quantize_dynamic``: DynamicQuantizeLinear, ConvInteger,
MatMulInteger, a Mul by the computed scale) slim and prune exactly.

A torch Conv-BN-ReLU x3 with a residual add and a Linear head, with some channels zeroed (their conv
filters and BN shifts), is exported with the legacy exporter and quantized dynamically (uint8
activations, int8 or uint8 weights). Deleting a zero channel leaves every DynamicQuantizeLinear's
min / max, hence its scale and zero point, unchanged, so onnxruntime's outputs are compared for exact
equality (tolerance 0).

Int8 weights are quantized with ``reduce_range=True`` (7 bits), as onnxruntime advises for them: without
it, its AVX2 u8s8 kernels sum pairs of uint8 x int8 products in int16 with saturation, so the result
depends on which channels sit next to each other, and deleting channels changes the pairs (measured:
40 of 40 runs differ, up to 0.09 on the logits; the exact int32 sum of the slimmed model equals the
original's). uint8 weights (the default) and 7-bit int8 weights do not saturate.
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
from onnx import TensorProto
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from onnxslim.cli import main
from onnxslim.graph.slim import slim
from onnxslim.graph.stats import count_params

#: channels zeroed in the residual stream (conv1 and conv3) and in conv2's output
RESIDUAL_ZEROS, INNER_ZEROS = (1, 4, 9, 14), (0, 2, 7, 11, 13)


class ResidualNet(nn.Module):
    """conv1-bn-relu -> conv2-bn-relu -> conv3-bn (+ residual) -relu -> pool -> Linear(16, 10)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                                    nn.Conv2d(16, 16, 3, padding=1)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(16) for _ in range(3)])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        a = torch.relu(self.norms[0](self.convs[0](x)))
        b = torch.relu(self.norms[1](self.convs[1](a)))
        c = torch.relu(self.norms[2](self.convs[2](b)) + a)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(c, 1), 1))


def _masked_net() -> ResidualNet:
    """Random weights and BN statistics; the zeroed channels' filters, biases and BN shifts are 0, so
    they are exactly 0 after each BN (the exporter folds BN into the conv)."""
    torch.manual_seed(0)
    net = ResidualNet().eval()
    with torch.no_grad():
        for norm in net.norms:
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
            norm.bias.uniform_(-0.1, 0.3)
        for layer, zeros in zip(range(3), (RESIDUAL_ZEROS, INNER_ZEROS, RESIDUAL_ZEROS)):
            conv, norm, index = net.convs[layer], net.norms[layer], list(zeros)
            conv.weight[index] = 0
            conv.bias[index] = 0
            norm.running_mean[index] = 0
            norm.bias[index] = 0
    return net


def _quantized(tmp_path, weight_type: QuantType = QuantType.QUInt8, per_channel: bool = False) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_masked_net(), (torch.randn(1, 3, 12, 12),), buffer, dynamo=False, opset_version=17)
    source, target = tmp_path / "float.onnx", tmp_path / "dynamic.onnx"
    source.write_bytes(buffer.getvalue())
    quantize_dynamic(str(source), str(target), weight_type=weight_type, reduce_range=weight_type == QuantType.QInt8,
                     per_channel=per_channel)
    return onnx.load(str(target))


def _outputs(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _assert_exact(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 3, 12, 12)).astype(np.float32)
        for optimize in (False, True):
            expected, actual = _outputs(reference, x, optimize), _outputs(candidate, x, optimize)
            assert np.array_equal(expected, actual), (seed, optimize, float(np.abs(expected - actual).max()))


def _weight_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    """Shapes of the integer weights (ConvInteger / MatMulInteger's B), in graph order."""
    init = {t.name: t for t in model.graph.initializer}
    return [tuple(init[n.input[1]].dims) for n in model.graph.node
            if n.op_type in ("ConvInteger", "MatMulInteger") and n.input[1] in init]


@pytest.mark.parametrize("weight_type, per_channel", [(QuantType.QInt8, False), (QuantType.QUInt8, False),
                                                     (QuantType.QUInt8, True)], ids=["int8", "uint8", "uint8-per-channel"])
def test_quantize_dynamic_model_slims_exactly(weight_type, per_channel, tmp_path):
    """per_channel: the head's MatMulInteger gets per-column scales and zero points (the convs stay per
    tensor in onnxruntime's dynamic quantizer)."""
    model = _quantized(tmp_path, weight_type, per_channel)
    ops = {n.op_type for n in model.graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} <= ops
    slimmed, report = slim(model)
    r, i = len(RESIDUAL_ZEROS), len(INNER_ZEROS)
    assert _weight_shapes(model) == [(16, 3, 3, 3), (16, 16, 3, 3), (16, 16, 3, 3), (16, 10)]
    assert _weight_shapes(slimmed) == [(16 - r, 3, 3, 3), (16 - i, 16 - r, 3, 3), (16 - r, 16 - i, 3, 3),
                                       (16 - r, 10)], report.format_table()
    weight_dtype = TensorProto.INT8 if weight_type == QuantType.QInt8 else TensorProto.UINT8
    init = {t.name: t for t in slimmed.graph.initializer}
    assert all(init[n.input[1]].data_type == weight_dtype for n in slimmed.graph.node if n.op_type == "ConvInteger")
    # params count the integer weights (convs, head), the float biases and the 4 weight scales
    scales = 3 + (10 if per_channel else 1)
    assert count_params(model) == 16 * 27 + 16 * 16 * 9 * 2 + 16 * 10 + 16 * 3 + 10 + scales
    kept = (16 - r) * 27 + (16 - i) * (16 - r) * 9 * 2 + (16 - r) * 10
    assert report.params_after == count_params(slimmed) == kept + (16 - r) * 2 + (16 - i) + 10 + scales
    _assert_exact(model, slimmed)


def test_prune_quantize_dynamic_model_exact_against_masked(tmp_path):
    model = _quantized(tmp_path)
    source, out, masked = tmp_path / "q.onnx", tmp_path / "pruned.onnx", tmp_path / "masked.onnx"
    onnx.save(model, str(source))
    result = CliRunner().invoke(main, ["prune", str(source), str(out), "--ratio", "0.5", "--save-masked", str(masked)])
    assert result.exit_code == 0, result.output
    pruned, reference = onnx.load(str(out)), onnx.load(str(masked))
    shapes = _weight_shapes(pruned)
    assert [s[0] for s in shapes[:3]] == [8, 8, 8], shapes  # half of each conv's 16 filters
    _assert_exact(reference, pruned)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_weights_beyond_7_bits_get_a_note(reduce_range, tmp_path):
    """onnxruntime's AVX2 u8s8 kernels saturate pair sums: with full-range int8 weights the slimmed
    model's outputs can differ (the exact int32 sums agree), and the report says why."""
    model = _quantized(tmp_path, QuantType.QInt8)
    if not reduce_range:
        source = tmp_path / "float.onnx"
        quantize_dynamic(str(source), str(tmp_path / "full.onnx"), weight_type=QuantType.QInt8)
        model = onnx.load(str(tmp_path / "full.onnx"))
    _, report = slim(model)
    notes = [note for note in report.notes if "saturate" in note]
    assert len(notes) == (0 if reduce_range else 1), report.notes
