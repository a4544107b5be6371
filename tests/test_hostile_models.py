"""Hostile inputs (attack pass 2): malformed constant quantization parameters, data specs with bad or
huge numbers, a non-UTF-8 recipe and a code-running pickle of a newer protocol are each one ``error:``
line and exit 2 (nothing written, the input unchanged); valid 4-bit and float8 weights are slimmed."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import GraphBuilder, assert_equivalent
from onnx import TensorProto, helper

from onnxslim.cli import main
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.slim import slim
from onnxslim.io import write_bytes_atomic


def _dequantized_conv(scales: int = 4, zero_points: int = 4, axis: int = 0) -> onnx.ModelProto:
    """Conv(x, DequantizeLinear(int8 w[4,3,3,3], scale[scales], zero_point[zero_points], axis)) -> mask -> Conv."""
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    weight = g.op("DequantizeLinear", [g.const(np.ones((4, 3, 3, 3), np.int8)),
                                       g.const(np.full(scales, 0.1, np.float32)),
                                       g.const(np.zeros(zero_points, np.int8))], axis=axis)
    y = g.mask(g.op("Conv", [x, weight], pads=[1] * 4), 4, zeros=[2])
    g.output(g.conv(y, 4, 2))
    outputs = [helper.make_tensor_value_info(g.outputs[0], TensorProto.FLOAT, [1, 2, 8, 8])]
    model = helper.make_model(helper.make_graph(g.nodes, "q", g.inputs, outputs, g.initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("scales, zero_points, axis, message", [
    (4, 3, 0, "zero point dims [3] differ from the scale's [4]"),
    (5, 5, 0, "5 scales for the 4 entries of axis 0"),
    (4, 4, 7, "axis 7 is outside the rank 4"),
], ids=["zero-point-length", "scale-length", "axis"])
def test_malformed_quantization_parameters_are_bad_input(tmp_path, scales, zero_points, axis, message):
    path = tmp_path / "q.onnx"
    onnx.save(_dequantized_conv(scales, zero_points, axis), path)
    before = path.read_bytes()
    for command in (["slim", path, tmp_path / "out.onnx"], ["inspect", path]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: invalid input model: ") and message in lines[0], lines
    assert path.read_bytes() == before and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("dtype, entries", [(TensorProto.INT4, 54), (TensorProto.FLOAT8E4M3FN, 108)],
                         ids=["int4", "float8"])
def test_sub_byte_and_float8_weights_slim(tmp_path, dtype, entries):
    """onnx.helper packs two INT4 values per ``int32_data`` entry (108 values in 54 entries); a sliced
    int4 or float8 weight is written back (int4 requantized, float8 dequantized), not a traceback."""
    g = GraphBuilder(opset=21)
    x = g.input([1, 3, 8, 8])
    g.initializers.append(helper.make_tensor("wq", dtype, [4, 3, 3, 3], [1, -2] * 54))
    g.initializers.append(helper.make_tensor("wz", dtype, [4], [0, 1, 0, 0] if dtype == TensorProto.INT4 else [0] * 4))
    weight = g.op("DequantizeLinear", ["wq", g.const(np.full(4, 0.1, np.float32)), "wz"], axis=0)
    y = g.mask(g.op("Conv", [x, weight], pads=[1] * 4), 4, zeros=[2])
    g.output(g.conv(y, 4, 2))
    model = g.model()
    assert len(model.graph.initializer[0].int32_data) == entries
    path = tmp_path / "w.onnx"
    onnx.save(model, path)
    slimmed, report = slim(path)
    assert report.deleted_masked_channels == 1
    assert_equivalent(model, slimmed)


@pytest.mark.parametrize("spec, message", [
    ("mnist:abc", "bad mnist spec 'mnist:abc'"),
    ("mnist:999999", "would take"),
    ("mnistseg:99999", "would take"),
    ("synthetic:-1,3,8,8", "every dim must be >= 1"),
    ("synthetic:100000,100000,100000,100000", "would take"),
], ids=["mnist-not-a-number", "mnist-petabytes", "mnistseg-huge", "synthetic-negative", "synthetic-huge"])
def test_data_specs_with_bad_numbers_are_bad_input(tmp_path, spec, message):
    """A data spec's numbers are checked before any array is built: no ValueError traceback, no
    petabyte allocation."""
    g = GraphBuilder()
    g.output(g.conv(g.input([1, 1, 28, 28]), 1, 2))
    path = tmp_path / "m.onnx"
    onnx.save(g.model(), path)
    result = CliRunner().invoke(main, ["check", str(path), str(path), "--data", spec])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


class _Payload:
    """Unpickling this object would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_pickle_of_a_newer_protocol_is_one_error_line(tmp_path):
    """A plain ``pickle.dump`` (protocol 4/5, not torch's 2) of an object that would run code: torch's
    weights_only loader refuses it and warns about the protocol; stderr holds only the error line."""
    marker, checkpoint = tmp_path / "pwned", tmp_path / "evil.pt"
    checkpoint.write_bytes(pickle.dumps({"state": _Payload(marker)}, protocol=pickle.HIGHEST_PROTOCOL))
    result = subprocess.run([sys.executable, "-m", "onnxslim", "export", str(checkpoint), "-o",
                             str(tmp_path / "e.onnx")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "evil.pt" in lines[0], result.stderr
    assert not marker.exists() and not (tmp_path / "e.onnx").exists()


def test_recipe_that_is_not_utf8_is_one_error_line(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(b"\xff\xfe\x00name = 1\n")
    result = CliRunner().invoke(main, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not valid TOML (not UTF-8" in lines[0], lines


def _masked_conv_model() -> onnx.ModelProto:
    g = GraphBuilder()
    y = g.op("Relu", [g.mask(g.conv(g.input([1, 3, 8, 8]), 3, 4), 4, zeros=[1])])
    g.output(g.conv(y, 4, 2))
    return g.model()


def _legacy(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    if how == "opset 6":  # the mask as Mul-6 with legacy broadcasting along axis 1: one value per channel
        model.opset_import[0].version = 6
        mul = next(n for n in model.graph.node if n.op_type == "Mul")
        mask = next(t for t in model.graph.initializer if t.name == mul.input[1])
        mask.dims[:] = [4]
        mul.attribute.extend([helper.make_attribute("broadcast", 1), helper.make_attribute("axis", 1)])
    elif how == "opset 99":
        model.opset_import[0].version = 99
    else:  # a negative dim in the declared input shape
        model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -5
    return model


@pytest.mark.parametrize("how, message", [
    ("opset 6", "opset 6 is older than 7"),
    ("opset 99", "opset 99 is newer than this onnx package defines"),
    ("negative dim", "'x' is declared with a negative dim [1, 3, -5, 8]"),
], ids=["opset-6-legacy-broadcast", "opset-99", "negative-input-dim"])
def test_models_the_checker_lets_through_are_refused(tmp_path, how, message):
    """onnx.checker passes these; slim would read a Mul-6's legacy broadcast as numpy broadcasting, write
    an opset no runtime knows, or blame itself ('internal error') for the user's negative dim."""
    model = _legacy(_masked_conv_model(), how)
    onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    for command in (["slim", path, tmp_path / "out.onnx"], ["prune", path, tmp_path / "out.onnx"], ["inspect", path]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: invalid input model: ") and message in lines[0], lines
    assert path.read_bytes() == before and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("option", ["OUT", "--json"])
def test_an_output_on_a_fifo_or_device_is_refused(tmp_path, option):
    """``slim m.onnx /dev/null`` (as root) renamed a regular file over the device; a FIFO stands in for it
    here. Refused before any work, the FIFO left as it was."""
    model = tmp_path / "m.onnx"
    onnx.save(_masked_conv_model(), model)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    output = [str(fifo)] if option == "OUT" else [str(tmp_path / "out.onnx"), "--json", str(fifo)]
    result = CliRunner().invoke(main, ["slim", str(model), *output, "--no-verify-speed"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {fifo}: it is a device, FIFO"), lines
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not (tmp_path / "out.onnx").exists()
    with pytest.raises(OnnxSlimError, match="not a regular file"):
        write_bytes_atomic(fifo, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("command", ["check", "bench"])
def test_a_model_onnxruntime_cannot_run_is_one_error_line(tmp_path, command):
    """A DequantizeLinear axis out of range passes onnx.checker and loads in onnxruntime, then fails when
    it runs: ``check`` printed a traceback (exit 1), ``bench`` onnxruntime's own log lines as well."""
    reference, candidate = tmp_path / "ref.onnx", tmp_path / "bad.onnx"
    good = _dequantized_conv()
    onnx.save(good, reference)
    onnx.save(_dequantized_conv(axis=7), candidate)
    args = [str(reference), str(candidate)] if command == "check" else [str(candidate), "--warmup", "0"]
    result = subprocess.run([sys.executable, "-m", "onnxslim", command, *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines()
             if line.strip() and "sample/s" not in line and "run/s" not in line]  # progress bars
    assert len(lines) == 1 and lines[0].startswith("error: ") and "DequantizeLinear" in lines[0], result.stderr


@pytest.mark.parametrize("offset", ["abc", "-100"], ids=["not-a-number", "negative"])
def test_external_data_with_a_bad_offset_is_bad_input(tmp_path, offset):
    """An external-data ``offset`` that is not an integer >= 0: was a ValueError traceback ('abc')."""
    path = tmp_path / "m.onnx"
    onnx.save_model(_masked_conv_model(), str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "offset":
                entry.value = offset
        if "offset" not in [entry.key for entry in tensor.external_data]:
            tensor.external_data.add(key="offset", value=offset)
    onnx.save(proto, str(path))
    before = path.read_bytes()
    for command in (["slim", path, tmp_path / "out.onnx"], ["inspect", path]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "bad external data offset or length" in lines[0], lines
    assert path.read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_model_inconsistent_once_its_pads_are_folded_is_bad_input(tmp_path):
    """Pads computed in float (TF "same" arithmetic, as a quantizer may round it) make one branch 9 rows
    high and the other 8, concatenated: onnx.checker cannot see it, onnxruntime fails at run time. slim
    and prune say `invalid input model` (exit 2), not an internal error on their result."""
    g = GraphBuilder(seed=31)
    a = g.op("Relu", [g.conv(g.input([1, 4, 8, 8]), 4, 4)])
    rows = g.op("Add", [g.const(np.float32(0.6)), g.const(np.float32(0.6))])  # 1.2 -> 1 row
    pads = g.op("Mul", [g.op("Cast", [rows], to=TensorProto.INT64),
                        g.const(np.array([0, 0, 0, 0, 0, 0, 1, 0], np.int64), "pattern")])
    g.output(g.op("Concat", [a, g.op("Pad", [a, pads])], axis=1), shape=[1, 8, None, 8])
    path = tmp_path / "inconsistent.onnx"
    onnx.save(g.model(), str(path))
    with pytest.raises(OnnxSlimError, match="invalid input model: once its computed constants are folded"):
        slim(str(path))
    result = CliRunner().invoke(main, ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5"])
    assert result.exit_code == 2 and "error: invalid input model" in result.output, result.output
    assert not (tmp_path / "p.onnx").exists()


def _weight_as_graph_output(which: str) -> onnx.ModelProto:
    """conv 3 -> 8, mask (channels 1, 2 zero), conv 8 -> 4; the weight of the conv ``which`` (producer or
    consumer of the masked channels) is also a graph output."""
    g = GraphBuilder(seed=5)
    y = g.conv(g.input([1, 3, 8, 8]), 3, 8)
    producer = g.nodes[-1].input[1]
    g.output(g.conv(g.mask(y, 8, zeros=[1, 2]), 8, 4))
    model = g.model()
    weight = producer if which == "producer" else model.graph.node[-1].input[1]
    shape = [8, 3, 3, 3] if which == "producer" else [4, 8, 3, 3]
    model.graph.output.append(helper.make_tensor_value_info(weight, TensorProto.FLOAT, shape))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("which", ["producer", "consumer"])
def test_a_weight_that_is_a_graph_output_is_not_copied(which):
    """A conv weight that the model also returns stays in the model as it is: slicing it (consumer: 524 ->
    676 params) or folding the mask into it (producer: 524 -> 604, then 732 once the channels were held)
    added a second, sliced or scaled copy. Now its readers keep their channels and the mask folds only where
    no copy is made: exact, and never larger."""
    model = _weight_as_graph_output(which)
    slimmed, report = slim(model)
    assert_equivalent(model, slimmed)
    assert report.params_after <= report.params_before, (report.params_before, report.params_after)
    assert report.size_after <= report.size_before
    assert any("is a graph output" in reason for reason in report.format_table().splitlines()), report.format_table()


def test_ir3_model_with_unlisted_initializers_is_refused(tmp_path):
    """IR 3 requires every initializer to be a graph input; onnx.checker rejects the model, but the check ran
    on the skeleton (which lists them): slim wrote a result and prune failed with `internal error: the masked
    model fails onnx.checker`. Now every command says `invalid input model` (exit 2)."""
    model = _masked_conv_model()
    model.ir_version, model.opset_import[0].version = 3, 8
    with pytest.raises(onnx.checker.ValidationError, match="in initializer but not in graph input"):
        onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for command in (["slim", path, tmp_path / "out.onnx"], ["prune", path, tmp_path / "out.onnx"], ["inspect", path]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: invalid input model: IR version 3 requires every "
                                                       "initializer to be a graph input, and 5 are not"), lines
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("how", ["no-layer", "no-input"])
def test_prune_global_with_nothing_to_prune(tmp_path, how):
    """A model without prunable layers (only a Relu; a conv of a constant, no graph input): `prune --scope
    global` with rounding divided by a zero total cost (ZeroDivisionError traceback). Now it writes the model
    unchanged in channels, like --scope layer."""
    g = GraphBuilder()
    if how == "no-layer":
        g.output(g.op("Relu", [g.input([1, 3, 8, 8])]))
    else:
        g.output(g.conv(g.const(np.ones((1, 3, 8, 8), np.float32)), 3, 4))
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(g.model(), path)
    result = CliRunner().invoke(main, ["prune", str(path), str(out), "--scope", "global", "--round-to", "8",
                                       "--no-verify-speed"])
    assert result.exit_code == 0, result.output
    assert_equivalent(onnx.load(path), onnx.load(out))


def test_duplicate_node_names_are_refused(tmp_path):
    """Two nodes with one name: onnx.checker passes the model, onnxruntime refuses to load it. slim wrote a
    result with the same two names (its speed check: `not a loadable ONNX model`); now every command says
    `invalid input model` (exit 2). Empty names, which onnxruntime accepts, stay accepted."""
    model = _masked_conv_model()
    for node in model.graph.node:
        node.name = "n" if node.op_type == "Conv" else ""
    onnx.checker.check_model(model)
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    for command in (["slim", path, out], ["prune", path, out], ["inspect", path]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0] == ("error: invalid input model: two nodes are named 'n' (onnxruntime "
                                                "refuses to load the model); give them unique names"), lines
    assert not out.exists()
    model.graph.node[0].name = ""
    slimmed, _ = slim(model)
    assert_equivalent(model, slimmed)


def test_value_info_only_for_the_tensors_the_input_described(tmp_path):
    """A model describing one intermediate tensor: slim re-inferred value_info for every tensor, so a model
    with nothing to delete came out larger (a QOperator model at round-to 8: 10,635 -> 11,005 bytes). Now
    only the described tensors get value_info back, and the file does not grow."""
    model = _masked_conv_model()
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.value_info.append(inferred.graph.value_info[0])
    described = {v.name for v in model.graph.value_info}
    slimmed, report = slim(model, round_to=8)  # 4 channels, rounded up to 8: nothing deleted
    assert {v.name for v in slimmed.graph.value_info} <= described
    assert report.size_after <= report.size_before, (report.size_before, report.size_after)
    assert_equivalent(model, slimmed)
