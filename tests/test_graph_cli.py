"""`onnxslim slim | prune | inspect` from the command line, and the prune / inspect APIs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import GraphBuilder, assert_equivalent
from thirdparty import resnet_v1_ir3, to_ir3

from onnxslim.cli import main
from onnxslim.graph.inspect import inspect_model
from onnxslim.graph.prune import prune


@pytest.fixture
def masked_model(tmp_path):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    a = g.op("Relu", [g.mask(g.bn(g.conv(x, 3, 8), 8), 8, zeros=[0, 2, 4])])
    b = g.op("Relu", [g.mask(g.conv(a, 8, 8), 8, zeros=[1])])
    c = g.op("LRN", [b], size=3)
    g.output(g.conv(g.op("Relu", [g.op("Add", [b, c])]), 8, 4))
    path = tmp_path / "masked.onnx"
    onnx.save(g.model(), path)
    return path


def test_slim_command_writes_model_table_and_json(masked_model, tmp_path):
    out, report, plot = tmp_path / "slim.onnx", tmp_path / "report.json", tmp_path / "layers.png"
    result = CliRunner().invoke(main, ["slim", str(masked_model), "-o", str(out), "--json", str(report),
                                       "--plot", str(plot), "--round-to", "1"])
    assert result.exit_code == 0, result.output
    assert "8 -> 5" in result.output and "params:" in result.output and "MACs:" in result.output
    assert "barrier LRN" in result.output  # the masked channel held by the LRN, with the reason
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    data = json.loads(report.read_text())
    assert data["masked_channels"] == 4 and data["deleted_masked_channels"] == 3
    assert_equivalent(onnx.load(masked_model), onnx.load(out))


@pytest.mark.parametrize("args,message", [
    (["slim", "missing.onnx", "-o", "out.onnx"], "model file not found"),
    (["slim", "{bad}", "-o", "out.onnx"], "not a readable ONNX model"),
    (["slim", "{model}", "-o", "{model}"], "refusing to overwrite"),
    (["slim", "{model}", "-o", "out.onnx", "--input-shape", "x:1,3"], "has rank"),
    (["slim", "{model}", "-o", "out.onnx", "--input-shape", "nope:1,3,8,8"], "unknown input"),
    (["slim", "{model}", "-o", "out.onnx", "--input-shape", "x:1,4,8,8"],
     "dim 1 is 3, --input-shape gives 4 (it has no dynamic dims: drop --input-shape)"),
    (["slim", "{model}", "-o", "out.onnx", "--input-shape", "x=1"], "bad --input-shape"),
])
def test_bad_input_is_one_line_and_exit_2(masked_model, tmp_path, args, message):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    args = [a.replace("{model}", str(masked_model)).replace("{bad}", str(bad)) for a in args]
    before = masked_model.read_bytes()
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.strip().count("\n") == 0 or "Usage" in result.output
    assert masked_model.read_bytes() == before


def test_inspect_command_shows_groups_and_barriers(masked_model, tmp_path):
    out = tmp_path / "inspect.json"
    result = CliRunner().invoke(main, ["inspect", str(masked_model), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "barriers" in result.output and "LRN" in result.output
    data = json.loads(out.read_text())
    by_op = [layer for layer in data["layers"] if layer["op_type"] == "Conv"]
    assert by_op[0]["zero_channels"] == [0, 2, 4] and by_op[0]["deletable_channels"] == [0, 2, 4]
    assert by_op[1]["zero_channels"] == [1] and by_op[1]["deletable_channels"] == []
    lrn = next(b for b in data["barriers"] if b["op_type"] == "LRN")
    assert by_op[1]["group"] in lrn["groups"]


def test_inspect_reports_residual_coupling():
    report = inspect_model(to_ir3(resnet_v1_ir3()))
    groups = [g for g in report.groups if len(g.layers) > 1]
    assert groups, "residual stages couple their convolutions"
    assert all(g.channels in (8, 16, 32) for g in groups)


@pytest.mark.parametrize("criterion,scope", [("l1", "layer"), ("l2", "global"), ("bn", "layer"), ("random", "global")])
def test_prune_reproduces_its_masked_reference(criterion, scope):
    model = resnet_v1_ir3()
    slimmed, report, masked = prune(model, ratio=0.5, criterion=criterion, scope=scope)
    assert_equivalent(masked, slimmed)
    if scope == "global":  # half of the layers' MACs (the default cost)
        assert report.macs_after <= 0.55 * report.macs_before
    else:
        assert report.params_after < 0.6 * report.params_before
    assert report.deleted_masked_channels == report.masked_channels


def test_prune_by_layer_removes_the_lowest_l1_filters():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 6)])
    weight = next(t for t in g.initializers if t.name == g.nodes[0].input[1])
    values = onnx.numpy_helper.to_array(weight).copy()
    values[[1, 4]] *= 1e-3  # the two weakest filters
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    g.output(g.conv(y, 6, 4))
    slimmed, report, _ = prune(g.model(), ratio=1 / 3, criterion="l1")
    first = next(n for n in slimmed.graph.node if n.op_type == "Conv")
    kept = onnx.numpy_helper.to_array(next(t for t in slimmed.graph.initializer if t.name == first.input[1]))
    assert kept.shape[0] == 4
    assert np.allclose(np.delete(values, [1, 4], axis=0), kept)


def test_prune_command(masked_model, tmp_path):
    out, masked = tmp_path / "pruned.onnx", tmp_path / "reference.onnx"
    result = CliRunner().invoke(main, ["prune", str(masked_model), "-o", str(out), "--ratio", "0.5",
                                       "--save-masked", str(masked)])
    assert result.exit_code == 0, result.output
    assert_equivalent(onnx.load(masked), onnx.load(out))
