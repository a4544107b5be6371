"""Float16 models (YOLOv5 exported with ``--half``): prune's masks take the tensor's type, and the check's
default tolerance is 16 ulps of float16."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import GraphBuilder
from onnx import TensorProto, numpy_helper

from onnxslim.graph.prune import prune
from onnxslim.validate.gate import CheckOptions, run_check


def to_half(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float16 twin of a float32 model built by :class:`GraphBuilder` (weights, inputs and outputs)."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for position, tensor in enumerate(half.graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            half.graph.initializer[position].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in [*half.graph.input, *half.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del half.graph.value_info[:]
    onnx.checker.check_model(half, full_check=True)
    return half


def _net() -> onnx.ModelProto:
    g = GraphBuilder(seed=4)
    y = g.op("Relu", [g.conv(g.input([1, 3, 10, 10]), 3, 16)])
    y = g.op("Relu", [g.conv(y, 16, 16)])
    g.output(g.conv(y, 16, 4))
    return to_half(g.model())


def test_prune_of_a_float16_model_masks_in_float16_and_stays_exact(tmp_path):
    """Before: the float32 masks made the masked model fail shape inference ("B has inconsistent type
    tensor(float)"), an internal error. 8 of the 16 channels of each hidden layer go (ratio 0.5)."""
    slimmed, report, masked = prune(_net(), ratio=0.5)
    masks = [t for t in masked.graph.initializer if "prune_mask" in t.name]
    assert masks and all(t.data_type == TensorProto.FLOAT16 for t in masks)
    assert report.masked_channels == report.deleted_masked_channels == 16, report.format_table()
    onnx.save(masked, tmp_path / "masked.onnx")
    onnx.save(slimmed, tmp_path / "slimmed.onnx")
    result = run_check(tmp_path / "masked.onnx", tmp_path / "slimmed.onnx", options=CheckOptions(progress=False))
    assert result.passed, result.to_markdown()
    assert result.equivalence.atol == result.equivalence.rtol == 16 * 2.0**-10


def test_the_float16_default_tolerance_still_catches_a_wrong_model(tmp_path):
    """A changed weight (one filter negated) moves the outputs by far more than 16 float16 ulps: fails."""
    reference = _net()
    broken = onnx.ModelProto()
    broken.CopyFrom(reference)
    weight = broken.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values[0] = -values[0]
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(reference, tmp_path / "reference.onnx")
    onnx.save(broken, tmp_path / "broken.onnx")
    result = run_check(tmp_path / "reference.onnx", tmp_path / "broken.onnx", options=CheckOptions(progress=False))
    assert not result.passed
