"""Engine-level cases across rules (masks, dead filters, empty tensors, barriers, IR 3, shared weights, rounding,
inputs never modified, scale folding): the slimmed model's onnxruntime outputs equal the masked model's.

The cases of one op family live beside its rule module: ``tests/rules/test_<module>.py``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, conv_channels, head, ops, slim_checked
from onnx import helper, numpy_helper

from onnxslim.graph.slim import slim

# -- masks, dead filters, zero propagation -------------------------------------------------------

def test_mask_after_conv_deletes_channels_and_folds_the_scale():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[0, 3, 4])])
    head(g, y, 8)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [5, 4]
    assert "Mul" not in ops(slimmed)
    assert (report.masked_channels, report.deleted_masked_channels) == (3, 3)
    assert report.folded_masks == 1


def test_dead_filter_with_zero_bias_is_deleted_without_a_mask():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    head(g, g.op("Relu", [g.conv(x, 3, 6, dead=[1, 2])]), 6)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4]


def test_input_channels_that_every_consumer_ignores_are_deleted_from_the_producer():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 6)])
    a = g.conv(y, 6, 4)
    b = g.conv(y, 6, 4, k=1, pad=0)
    for name in (g.nodes[-2].input[1], g.nodes[-1].input[1]):
        t = next(t for t in g.initializers if t.name == name)
        arr = numpy_helper.to_array(t).copy()
        arr[:, [2, 5]] = 0
        t.CopyFrom(numpy_helper.from_array(arr, name))
    g.output(a, b)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4, 4]


def test_a_tensor_never_becomes_empty_before_a_conv():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    head(g, g.op("Relu", [g.mask(g.conv(x, 3, 4), 4, zeros=[0, 1, 2, 3])]), 4)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [1, 4]
    assert "does not become empty" in report.kept[0].reason


def test_a_layer_whose_outputs_all_die_frees_its_inputs_in_one_slim():
    """A Gemm whose outputs a mask all zeroes keeps one placeholder (the head needs a channel); its filter
    held every channel of the conv before it until its mask folded in, so a second slim took that conv
    5 -> 1. slim repeats the pass: one slim is a fixed point."""
    g = GraphBuilder()
    y = g.op("Relu", [g.conv(g.input([1, 3, 6, 6]), 3, 5, k=1, pad=0)])
    hidden = g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [y])]), 5, 4)
    dead = g.op("Relu", [g.op("Mul", [hidden, g.const(np.zeros((1, 4), np.float32))])])
    g.output(g.gemm(dead, 4, 3))
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [1], report.format_table()
    assert slim(slimmed)[0].SerializeToString() == slimmed.SerializeToString()


def test_a_node_nothing_reads_holds_no_channel():
    """A Mul whose output nothing reads (valid ONNX) broadcasts masked channel 1 over the input's channels,
    which held it for the pass that then dropped the Mul as dead code: a second slim deleted it."""
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    y = g.mask(g.op("Relu", [g.conv(x, 3, 4)]), 4, zeros=[1, 2])
    g.op("Mul", [g.op("Slice", [y, *(g.const(np.array([v], np.int64)) for v in (1, 2, 1))]), x])  # unread
    head(g, y, 4)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [2, 4] and report.deleted_masked_channels == 2, report.format_table()
    assert slim(slimmed)[0].SerializeToString() == slimmed.SerializeToString()


# -- barriers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("barrier", ["LRN", "Softmax", "DepthToSpace", "output"])
def test_barriers_keep_channels(barrier):
    g = GraphBuilder(opset=13)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[0, 1])])
    if barrier == "LRN":
        head(g, g.op("LRN", [y], size=3), 8)
    elif barrier == "Softmax":
        head(g, g.op("Softmax", [y], axis=1), 8)
    elif barrier == "DepthToSpace":
        g.output(g.op("DepthToSpace", [y], blocksize=2))
    else:
        g.output(y)
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed)[0] == 8
    assert report.kept and "barrier" in report.kept[0].reason or "graph output" in report.kept[0].reason


# -- exporter spellings ---------------------------------------------------------------------------

def test_constant_nodes_and_ir3_initializers_as_inputs():
    g = GraphBuilder(opset=8)
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.bn(g.conv(x, 3, 6), 6), 6, zeros=[0, 3])])
    head(g, y, 6)
    model = g.model(ir_version=3)
    # weights as Constant nodes, the rest listed as graph inputs (IR 3)
    first = model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Constant", [], [first.name], value=first))
    del model.graph.initializer[0]
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model)
    slimmed, _ = slim_checked(model)
    assert slimmed.ir_version == 3
    assert {t.name for t in slimmed.graph.initializer} <= {i.name for i in slimmed.graph.input}
    assert conv_channels(slimmed) == [4, 4]


def test_ir7_initializers_listed_as_inputs_stop_being_inputs():
    # torch.onnx.export(..., keep_initializers_as_inputs=True) and older converters list weights as graph
    # inputs at IR >= 4 too: onnxruntime then cannot fold or fuse them, and a sliced weight could not be
    # overridden by the original's value anyway, so the slimmed model lists only the real inputs
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.bn(g.conv(x, 3, 6), 6), 6, zeros=[0, 3])])
    head(g, y, 6)
    model = g.model(ir_version=7)
    listed = [t.name for t in model.graph.initializer][::2]
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer if t.name in listed)
    onnx.checker.check_model(model, full_check=True)
    slimmed, report = slim_checked(model)
    assert conv_channels(slimmed) == [4, 4]
    assert [i.name for i in slimmed.graph.input] == ["x"]
    kept = set(listed) & {t.name for t in slimmed.graph.initializer}  # the folded mask's weight is gone
    assert any(note.startswith(f"{len(kept)} weight(s) were also declared as graph inputs") for note in report.notes)


def test_slim_cli_on_weights_declared_as_inputs_does_not_import_torch(tmp_path):
    """The slim command stays torch-free (README): dropping the weights from the inputs once went through
    onnxruntime.tools, whose import pulls in torch (seconds per call)."""
    import subprocess
    import sys
    from pathlib import Path

    g = GraphBuilder()
    y = g.op("Relu", [g.mask(g.conv(g.input([1, 3, 8, 8]), 3, 6), 6, zeros=[0, 3])])
    head(g, y, 6)
    model = g.model(ir_version=7)
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    script = ("import sys\nfrom onnxslim.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    assert not e.code, e.code\nprint('torch' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, "slim", str(source), str(out), "--no-verify-speed"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert [i.name for i in onnx.load(out).graph.input] == ["x"]


def test_shared_weight_is_split_when_readers_need_different_slices():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    a = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[0])])
    b = g.op("Relu", [g.conv(x, 3, 6)])
    shared = g.const(g.weights(4, 6, 3, 3))
    g.output(g.op("Conv", [a, shared], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             g.op("Conv", [b, shared], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    slimmed, report = slim_checked(g.model())
    assert sorted(conv_channels(slimmed)) == [4, 4, 6, 6]  # both readers of the weight must agree
    assert sum(list(t.dims) == [4, 6, 3, 3] for t in slimmed.graph.initializer) == 1  # not duplicated


def test_round_to_keeps_multiples():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 16), 16, zeros=range(7))])
    head(g, y, 16)
    slimmed, report = slim_checked(g.model(), round_to=4)
    assert conv_channels(slimmed) == [12, 4]
    assert report.kept and "round" in report.kept[0].reason


def test_inputs_are_never_modified(tmp_path):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    head(g, g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[1])]), 6)
    model = g.model()
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    before_bytes, proto_bytes = path.read_bytes(), model.SerializeToString()
    slim(str(path), tmp_path / "out.onnx")
    slim(model)
    assert path.read_bytes() == before_bytes and model.SerializeToString() == proto_bytes
    assert onnx.load(tmp_path / "out.onnx").graph.node
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


# -- scale folding -------------------------------------------------------------------------------


def test_a_non_zero_structure_mask_is_folded_into_the_branch():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    stem = g.op("Relu", [g.conv(x, 4, 8)])
    branch = g.op("Mul", [g.bn(g.conv(stem, 8, 8), 8), g.const(np.array([0.7], np.float32))])
    head(g, g.op("Relu", [g.op("Add", [stem, branch])]), 8)
    slimmed, report = slim_checked(g.model())
    assert "Mul" not in ops(slimmed) and report.folded_masks == 1


def test_a_positive_scale_after_relu_and_pooling_folds_into_the_conv_before():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    a = g.op("MaxPool", [g.op("Relu", [g.bn(g.conv(x, 4, 6), 6)])], kernel_shape=[2, 2], strides=[2, 2])
    a = g.op("Mul", [a, g.const(np.array([0.5], np.float32))])  # an Inception branch's structure scale
    b = g.op("MaxPool", [g.op("Relu", [g.conv(x, 4, 5)])], kernel_shape=[2, 2], strides=[2, 2])
    head(g, g.op("Concat", [a, b], axis=1), 11)
    slimmed, report = slim_checked(g.model())
    assert "Mul" not in ops(slimmed) and report.folded_masks == 1
