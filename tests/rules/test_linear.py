"""Gemm and MatMul rules: filters and criteria, MACs, reduction, mask-scale folding (onnxruntime-checked)."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, assert_equivalent, conv_channels, head, slim_checked

from onnxslim.graph.prune import channel_scores, prune
from onnxslim.graph.slim import analyse, slim
from onnxslim.graph.stats import model_stats
from rules.rankings import FILTERS, KEPT


def _fc_model(op: str):
    """x (1, 4) -> op (4 -> 4, filters = FILTERS) -> Relu -> Gemm (4 -> 2) -> output."""
    g = GraphBuilder()
    x = g.input([1, 4])
    if op == "Gemm":
        hidden = g.op("Gemm", [x, g.const(FILTERS, "w"), g.const(np.zeros(4, np.float32), "b")], transB=1)
    else:
        hidden = g.op("MatMul", [x, g.const(FILTERS.T.copy(), "w")])
    g.output(g.gemm(g.op("Relu", [hidden]), 4, 2))
    return g.model()


def _first_weight_rows(model, op: str) -> np.ndarray:
    weights = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == op)
    value = np.frombuffer(weights[node.input[1]].raw_data, np.float32).reshape(tuple(weights[node.input[1]].dims))
    return value if op == "Gemm" else value.T


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_l1_and_l2_rank_filters_differently(op, criterion):
    model = _fc_model(op)
    analysis = analyse(model)
    scores = next(iter(channel_scores(analysis, criterion).values()))
    norms = np.abs(FILTERS).sum(1) if criterion == "l1" else np.linalg.norm(FILTERS, axis=1)
    assert np.allclose(scores, norms)
    slimmed, report, masked = prune(model, ratio=0.5, criterion=criterion)
    assert np.array_equal(_first_weight_rows(slimmed, op), FILTERS[KEPT[criterion]])
    assert_equivalent(masked, slimmed)


def test_macs_and_reduction():
    model = _fc_model("MatMul")
    analysis = analyse(model)
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    rule = analysis.rule_for(matmul)
    assert (rule.reduction(matmul, 0), rule.reduction(matmul, 1)) == ("full", "none")
    assert model_stats(model).layer_macs == {matmul.name: 4 * 4, model.graph.node[-1].name: 4 * 2}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_mask_scale_after_gemm_folds_into_its_weights(trans_b):
    g = GraphBuilder()
    x = g.input([2, 6])
    hidden = g.mask(g.gemm(x, 6, 5, trans_b=trans_b), 5, zeros=[2], rank=2)
    g.output(g.gemm(g.op("Tanh", [hidden]), 5, 3))
    model = g.model()
    slimmed, report = slim(model)
    assert "Mul" not in [n.op_type for n in slimmed.graph.node] and report.folded_masks == 1
    assert [(layer.channels_before, layer.channels_after) for layer in report.layers] == [(5, 4), (3, 3)]
    assert_equivalent(model, slimmed)


def test_a_mask_scale_before_matmul_folds_into_its_rows():
    g = GraphBuilder()
    x = g.input([2, 6])
    hidden = g.mask(g.op("Tanh", [g.gemm(x, 6, 5)]), 5, zeros=[0], rank=2)
    g.output(g.op("MatMul", [hidden, g.const(g.weights(5, 3), "w")]))
    model = g.model()
    slimmed, report = slim(model)
    assert "Mul" not in [n.op_type for n in slimmed.graph.node] and report.folded_masks == 1
    assert_equivalent(model, slimmed)


def test_non_zero_constant_is_absorbed_by_gemm_bias():
    g = GraphBuilder()
    x = g.input([2, 3, 8, 8])
    y = g.op("Sigmoid", [g.mask(g.conv(x, 3, 6), 6, zeros=[0, 5])])
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    g.output(g.gemm(y, 6, 4))
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [4]
    assert report.deleted_masked_channels == 2


def test_hidden_neurons_of_a_gemm_stack():
    g = GraphBuilder()
    x = g.input([2, 20])
    h = g.op("Relu", [g.mask(g.gemm(x, 20, 16), 16, zeros=range(0, 16, 2), rank=2)])
    g.output(g.gemm(h, 16, 4))
    slimmed, report = slim_checked(g.model())
    assert report.params_after == 20 * 8 + 8 + 8 * 4 + 4


@pytest.mark.parametrize("spatial", [1, 2], ids=["sequence", "nhwc"])
def test_dense_layers_on_the_last_axis_of_a_sequence_or_nhwc_map(spatial):
    """``nn.Linear`` on (N, L, C) after a Conv1d, or tf2onnx's Dense on (N, H, W, C): MatMul + Add with
    the channels on the last axis; the conv's and the first dense layer's zero channels go."""
    g = GraphBuilder()
    x = g.input([1, 3] + [5] * spatial)
    k = [3] * spatial
    conv = g.op("Conv", [x, g.const(g.weights(8, 3, *k)), g.const(g.weights(8, scale=0.1))],
                kernel_shape=k, pads=[1] * 2 * spatial)
    y = g.mask(g.op("Relu", [conv]), 8, zeros=[1, 4], rank=2 + spatial)
    y = g.op("Transpose", [y], perm=[0, *range(2, 2 + spatial), 1])
    hidden = g.op("Add", [g.op("MatMul", [y, g.const(g.weights(8, 6))]), g.const(g.weights(6, scale=0.1))])
    hidden = g.op("Mul", [g.op("Relu", [hidden]), g.const(g.mask_values(6, [0, 3, 5]))])
    g.output(g.op("Add", [g.op("MatMul", [hidden, g.const(g.weights(6, 4))]), g.const(g.weights(4, scale=0.1))]))
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 5, report.format_table()
    inits = {t.name: list(t.dims) for t in slimmed.graph.initializer}
    assert [inits[n.input[1]] for n in slimmed.graph.node if n.op_type == "MatMul"] == [[6, 3], [3, 4]]


@pytest.mark.parametrize(("equation", "weight", "sliced"), [
    ("bchw,oc->bohw", (6, 8), (4, 5)),  # torch.einsum as a 1x1 conv (both exporters keep the Einsum)
    ("oc,bchw->bohw", (6, 8), (4, 5)),  # the weight first
    ("bchw,co", (8, 6), (5, 4)),  # implicit output: bhow, the new channels on axis 2
    ("...chw,oc->...ohw", (6, 8), (4, 5)),
])
def test_einsum_as_a_pointwise_conv_deletes_input_and_output_channels(equation, weight, sliced):
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    y = g.mask(g.op("Relu", [g.bn(g.conv(x, 3, 8, bias=False), 8)]), 8, zeros=[1, 3, 5])
    operands = [y, g.const(g.weights(*weight))]
    y = g.op("Relu", [g.op("Einsum", operands[::-1] if equation.startswith("oc,") else operands, equation=equation)])
    axis = 1 if "->" in equation else 2  # the implicit output is (b, h, o, w)
    y = g.op("Mul", [y, g.const(g.mask_values(6, [0, 4]).reshape([1, 1, 1, 1][:axis] + [6] + [1] * (3 - axis)))])
    if axis == 2:
        y = g.op("Transpose", [y], perm=[0, 2, 1, 3])
    g.output(g.conv(y, 6, 4))
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 5, report.format_table()
    einsum = next(n for n in slimmed.graph.node if n.op_type == "Einsum")
    assert tuple(next(t.dims for t in slimmed.graph.initializer if t.name in einsum.input)) == sliced
    assert report.macs_after < report.macs_before


def test_einsum_that_sums_the_channels_away_is_a_barrier():
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    y = g.mask(g.op("Relu", [g.conv(x, 3, 8)]), 8, zeros=[2])
    g.output(g.op("Einsum", [y, g.const(g.weights(8))], equation="bchw,c->bhw"))
    _, report = slim_checked(g.model())
    assert report.deleted_masked_channels == 0 and "barrier Einsum" in report.kept[0].reason


@pytest.mark.parametrize("rank", [2, 3])
def test_constant_channels_are_absorbed_by_the_add_after_a_matmul(rank):
    """A Keras-style head: masked conv -> global mean -> BatchNorm as Mul / Add (a zero channel becomes
    its shift) -> Dense as MatMul + Add, on (N, C) or on a (N, L, C) sequence. The Add's bias takes
    ``shift[k] * B[k]``; without it the MatMul could not drop the constant channels."""
    g = GraphBuilder()
    y = g.mask(g.op("Relu", [g.conv(g.input([1, 3, 6, 6]), 3, 8)]), 8, zeros=[1, 4, 6])
    y = g.op("Transpose", [g.op("ReduceMean", [y], axes=[3], keepdims=0)], perm=[0, 2, 1])  # (N, H, C)
    if rank == 2:
        y = g.op("ReduceMean", [y], axes=[1], keepdims=0)
    y = g.op("Add", [g.op("Mul", [y, g.const(g.rng.uniform(0.5, 1.5, 8).astype(np.float32))]),
                     g.const(g.rng.uniform(0.5, 1.0, 8).astype(np.float32))])
    dense = g.op("Add", [g.op("MatMul", [y, g.const(g.weights(8, 5))]), g.const(g.weights(5, scale=0.1))])
    g.output(dense)
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 3, report.format_table()
    matmul = next(n for n in slimmed.graph.node if n.op_type == "MatMul")
    assert next(list(t.dims) for t in slimmed.graph.initializer if t.name == matmul.input[1]) == [5, 5]


def _masked_tokens(g: GraphBuilder):
    """x (1, 3, 6, 6) -> Conv (8) -> Relu -> mask (zeros 1, 4, 6) -> (N, 8, 36), and the map itself."""
    x = g.input([1, 3, 6, 6])
    y = g.mask(g.op("Relu", [g.conv(x, 3, 8)]), 8, zeros=[1, 4, 6])
    return y, g.op("Reshape", [y, g.const(np.array([0, 8, 36], np.int64))])


def test_matmul_passes_a_features_rows_against_a_computed_operand():
    """Attention pooling (GCNet's context, a spatial softmax): ``(N, C, HW) @ (N, HW, 1)`` with the
    attention computed from the map; row c of the product reads row c of the map only, so the 3 masked
    channels go from the conv, the product and the Gemm after it (before: a barrier, 0 deleted)."""
    g = GraphBuilder()
    y, tokens = _masked_tokens(g)
    logits = g.op("Reshape", [g.conv(y, 8, 1, k=1), g.const(np.array([0, 1, 36], np.int64))])
    attention = g.op("Transpose", [g.op("Softmax", [logits], axis=-1)], perm=[0, 2, 1])
    pooled = g.op("Flatten", [g.op("MatMul", [tokens, attention])])
    g.output(g.gemm(pooled, 8, 3))
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 3, report.format_table()
    assert conv_channels(slimmed) == [5, 1]


def test_matmul_passes_a_features_columns_after_a_computed_operand():
    """``softmax(q^T q) @ v`` with v the map's tokens (N, HW, C): column c of the product reads column c
    of v only; the attention (rows on both sides) is kept whole. 3 masked channels: 0 -> 3 deleted."""
    g = GraphBuilder()
    y, tokens = _masked_tokens(g)
    q = g.op("Reshape", [g.conv(y, 8, 4, k=1), g.const(np.array([0, 4, 36], np.int64))])
    scores = g.op("Softmax", [g.op("MatMul", [g.op("Transpose", [q], perm=[0, 2, 1]), q])], axis=-1)
    mixed = g.op("MatMul", [scores, g.op("Transpose", [tokens], perm=[0, 2, 1])])
    g.output(g.op("MatMul", [mixed, g.const(g.weights(8, 3))]))
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 3, report.format_table()
    assert conv_channels(slimmed) == [5, 4]


@pytest.mark.parametrize("equation", ["bchw,bc->bchw", "bc,bchw->bchw"])
def test_einsum_of_a_map_and_its_gate_couples_their_channels(equation):
    """An SE gate applied with ``torch.einsum("bchw,bc->bchw", y, sigmoid(mean(y)))``: channel c of the
    product reads channel c of both; 3 masked channels: 0 -> 3 deleted (before: a barrier)."""
    g = GraphBuilder()
    y = g.mask(g.op("Relu", [g.conv(g.input([1, 3, 6, 6]), 3, 8)]), 8, zeros=[1, 4, 6])
    gate = g.op("Sigmoid", [g.op("ReduceMean", [y], axes=[2, 3], keepdims=0)])
    head(g, g.op("Einsum", [y, gate] if equation.startswith("bchw") else [gate, y], equation=equation), 8)
    slimmed, report = slim_checked(g.model())
    assert report.masked_channels == report.deleted_masked_channels == 3, report.format_table()
    assert conv_channels(slimmed) == [5, 4]
