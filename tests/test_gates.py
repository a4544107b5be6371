"""Broadcast gates, reductions over the channel axis, zero operands and invalid inputs (issue #11 kinds 1, 10).

Third-party-style graphs: spatial attention (CBAM: mean/max over channels -> conv -> sigmoid -> x * g),
attention U-Net gates (x * sigmoid(conv_{F->1}(...))), ``x + g[N,1,H,W]``, ``Sub(x, Mul(x, 0))``; each
slimmed model is compared with onnxruntime and the deleted channels are counted.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, assert_equivalent
from onnx import TensorProto, helper

from onnxslim.errors import OnnxSlimError
from onnxslim.graph.slim import slim

ZEROS = [0, 3, 5]  # masked channels of the 8-channel feature map


def masked_features(g: GraphBuilder, c: int = 8):
    x = g.input([1, 3, 8, 8])
    return g.op("Relu", [g.mask(g.bn(g.conv(x, 3, c), c), c, zeros=ZEROS)])


def reduce_over_channels(g: GraphBuilder, op: str, y: str, keepdims: int = 1) -> str:
    if g.opset >= 18 or (op == "ReduceSum" and g.opset >= 13):
        return g.op(op, [y, g.const(np.array([1], np.int64))], keepdims=keepdims)
    return g.op(op, [y], axes=[1], keepdims=keepdims)


def slim_exact(model: onnx.ModelProto, **options):
    slimmed, report = slim(model, **options)
    assert_equivalent(model, slimmed)
    return slimmed, report


def conv_outputs(model: onnx.ModelProto) -> list[int]:
    inits = {t.name: t for t in model.graph.initializer}
    return [int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv"]


# -- broadcast gates --------------------------------------------------------------------------------

@pytest.mark.parametrize("op, deleted", [("Mul", 3), ("Add", 0), ("Sub", 0), ("Div", 0)])
def test_one_channel_operand_broadcast_over_channels(op, deleted):
    """Attention U-Net gate ``y * sigmoid(conv_{8->1}(y))``: the gate's one channel stays, y's zeros go.
    With Add / Sub / Div a zero channel of y becomes ``g`` (or 0/g) and is read by the head: kept."""
    g = GraphBuilder()
    y = masked_features(g)
    gate = g.op("Sigmoid", [g.conv(y, 8, 1, k=3)])
    operands = [gate, y] if op == "Add" else [y, gate]  # either order
    g.output(g.conv(g.op(op, operands), 8, 4))
    slimmed, report = slim_exact(g.model())
    assert conv_outputs(slimmed) == [8 - deleted, 1, 4]
    assert (report.masked_channels, report.deleted_masked_channels) == (3, deleted)


def test_gate_without_any_mask_is_left_intact():
    """The reported bug: with no mask at all the gate branch was deleted and the graph unsorted."""
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 8)])
    g.output(g.op("Mul", [y, g.op("Sigmoid", [g.conv(y, 8, 1, k=7, pad=3)])]))
    slimmed, report = slim_exact(g.model())
    assert conv_outputs(slimmed) == [8, 1]
    assert report.removed_nodes == 0


# -- reductions over the channel axis -------------------------------------------------------------

@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("op, deleted", [("ReduceMean", 3), ("ReduceSum", 3), ("ReduceL2", 3), ("ReduceL1", 3),
                                         ("ReduceSumSquare", 3), ("ReduceMax", 3), ("ReduceMin", 0),
                                         ("ReduceProd", 0), ("ReduceLogSumExp", 0)])
def test_spatial_attention_reduction_over_channels(op, deleted, opset):
    """CBAM-style spatial attention with one reduction over channels (attribute axes at opset 13 and,
    for ReduceSum, an axes input; inputs everywhere at opset 18). The input is a ReLU (>= 0), so a zero
    channel cannot be ReduceMax's maximum; ReduceMin's minimum it is (see tests/rules/test_reduce.py)."""
    g = GraphBuilder(opset=opset)
    y = masked_features(g)
    gate = g.op("Sigmoid", [g.conv(reduce_over_channels(g, op, y), 1, 1, k=7, pad=3)])
    g.output(g.conv(g.op("Mul", [y, gate]), 8, 4))
    slimmed, report = slim_exact(g.model())
    assert report.deleted_masked_channels == deleted
    assert conv_outputs(slimmed)[0] == 8 - deleted
    if not deleted:
        assert any(op in k.reason for k in report.kept), report.format_table()


def test_cbam_mean_and_max_of_a_signed_input_keeps_channels_with_a_reason():
    """Without the ReLU the masked map has either sign: a zero channel can be the maximum."""
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.mask(g.bn(g.conv(x, 3, 8), 8), 8, zeros=ZEROS)
    pooled = g.op("Concat", [reduce_over_channels(g, "ReduceMean", y), reduce_over_channels(g, "ReduceMax", y)],
                  axis=1)
    g.output(g.conv(g.op("Mul", [y, g.op("Sigmoid", [g.conv(pooled, 2, 1, k=7, pad=3)])]), 8, 4))
    _, report = slim_exact(g.model())
    assert report.deleted_masked_channels == 0
    assert report.kept and all("ReduceMax" in k.reason and "zero channel can be the maximum" in k.reason
                               for k in report.kept)


def test_mean_over_channels_without_keepdims_then_unsqueeze():
    g = GraphBuilder()
    y = masked_features(g)
    mean = g.op("Unsqueeze", [reduce_over_channels(g, "ReduceMean", y, keepdims=0), g.const(np.array([1]))])
    g.output(g.conv(g.op("Mul", [y, g.op("Sigmoid", [mean])]), 8, 4))
    slimmed, report = slim_exact(g.model())
    assert report.deleted_masked_channels == 3
    assert conv_outputs(slimmed) == [5, 4]


def test_mean_over_channels_and_space_is_rescaled_exactly():
    """ReduceMean over (C, H, W): the divisor counts C; the slimmed graph rescales by C'/C."""
    g = GraphBuilder(opset=18)
    y = masked_features(g)
    mean = g.op("ReduceMean", [y, g.const(np.array([1, 2, 3], np.int64))], keepdims=1)
    g.output(g.op("Add", [g.conv(y, 8, 4), mean]))
    slimmed, report = slim_exact(g.model())
    assert report.deleted_masked_channels == 3
    assert "Mul" in [n.op_type for n in slimmed.graph.node]  # the C'/C rescale


def test_every_channel_masked_keeps_one_for_the_reduction():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.mask(g.conv(x, 3, 4), 4, zeros=[0, 1, 2, 3])
    g.output(g.op("Mul", [g.conv(x, 3, 4), reduce_over_channels(g, "ReduceMean", y)]))
    slimmed, _ = slim_exact(g.model())
    assert conv_outputs(slimmed) == [1, 4]


def test_reduce_log_sum_exp_over_space_of_a_zero_channel_is_not_zero():
    """log(sum exp(0)) over H*W positions is log(H*W): the channel is not zero and stays."""
    g = GraphBuilder()
    y = masked_features(g)
    lse = g.op("ReduceLogSumExp", [y], axes=[2, 3], keepdims=1)
    g.output(g.conv(lse, 8, 4, k=1, pad=0))
    _, report = slim_exact(g.model())
    assert report.deleted_masked_channels == 0


class SpatialAttention:
    """A torch CBAM spatial-attention block (mean, or mean and max, over channels), built lazily."""

    @staticmethod
    def build(use_max: bool):
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
                mask = torch.ones(8)
                mask[ZEROS] = 0
                self.register_buffer("mask", mask.view(1, 8, 1, 1))
                self.gate = nn.Conv2d(2 if use_max else 1, 1, 7, padding=3)
                self.head = nn.Conv2d(8, 4, 3, padding=1)

            def forward(self, x):
                y = torch.relu(self.bn(self.conv(x)) * self.mask)
                parts = [y.mean(1, keepdim=True)] + ([y.amax(1, keepdim=True)] if use_max else [])
                return self.head(y * torch.sigmoid(self.gate(torch.cat(parts, 1))))

        return Block().eval()


def export(module, dynamo: bool) -> onnx.ModelProto:
    import torch

    example = (torch.randn(1, 3, 8, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(module, example, dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(module, example, buffer, dynamo=False, opset_version=17)
        return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("use_max, deleted", [(False, 3), (True, 3)], ids=["mean", "mean_max"])
def test_torch_spatial_attention(dynamo, use_max, deleted):
    pytest.importorskip("torch")
    model = export(SpatialAttention.build(use_max), dynamo)
    slimmed, report = slim_exact(model)
    assert (report.masked_channels, report.deleted_masked_channels) == (3, deleted), report.format_table()


# -- zero operands, invalid inputs, --no-check ------------------------------------------------------

@pytest.mark.parametrize("op", ["Sub", "Add"])
def test_subtracting_a_zeroed_copy(op):
    """``Sub(x, Mul(x, 0))`` is x: the zero operand is dropped (it used to leave a one-input Sub)."""
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 8)])
    zero = g.op("Mul", [y, g.const(np.zeros((1, 8, 1, 1), np.float32))])
    g.output(g.conv(g.op(op, [y, zero]), 8, 4))
    slimmed, _ = slim_exact(g.model())
    assert op not in [n.op_type for n in slimmed.graph.node]


def test_zero_minus_x_becomes_neg():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 8)])
    zero = g.op("Mul", [g.op("Relu", [g.conv(x, 3, 8)]), g.const(np.zeros((1, 8, 1, 1), np.float32))])
    g.output(g.conv(g.op("Sub", [zero, y]), 8, 4))
    slimmed, _ = slim_exact(g.model())
    assert "Neg" in [n.op_type for n in slimmed.graph.node]
    assert conv_outputs(slimmed) == [8, 4]


def _invalid_model() -> onnx.ModelProto:
    """An Add of [1,3,8,8] and [1,4,8,8]: the shapes do not broadcast, onnx.checker (full) rejects it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    w = onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "bad", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_invalid_input_is_reported_as_such(tmp_path):
    with pytest.raises(OnnxSlimError, match="^invalid input model: it fails onnx.checker"):
        slim(_invalid_model())
    path = tmp_path / "bad.onnx"
    onnx.save(_invalid_model(), path)
    from click.testing import CliRunner

    from onnxslim.cli import main

    for command in (["slim", str(path), "-o", str(tmp_path / "s.onnx")],
                    ["prune", str(path), "-o", str(tmp_path / "p.onnx")], ["inspect", str(path)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert "error: invalid input model" in result.output and "internal" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_no_check_still_refuses_to_write_a_model_that_does_not_load(tmp_path, monkeypatch):
    """--no-check skips the full shape check only: a broken rewrite is never written."""
    from onnxslim.graph import slim as slim_module

    g = GraphBuilder()
    y = masked_features(g)
    g.output(g.conv(y, 8, 4))
    model = g.model()
    original = slim_module.remove_dead_code

    def unsorted(m):  # simulate a rewrite bug: the graph comes out in the wrong order
        removed = original(m)
        m.graph.node.reverse()
        return removed

    monkeypatch.setattr(slim_module, "remove_dead_code", unsorted)
    with pytest.raises(OnnxSlimError, match="internal error"):
        slim(model, tmp_path / "out.onnx", check=False)
    assert not (tmp_path / "out.onnx").exists()
