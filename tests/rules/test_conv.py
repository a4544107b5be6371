"""Conv and ConvTranspose rules: filters and criteria, MACs, reduction, mask-scale folding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from graphs import GraphBuilder, assert_equivalent, conv_channels, head, slim_checked
from onnx import helper, numpy_helper

from onnxslim.graph.prune import channel_scores, prune
from onnxslim.graph.slim import analyse, slim
from onnxslim.graph.stats import model_stats
from rules.rankings import FILTERS, KEPT


def _conv_transpose_model(weight: np.ndarray, groups: int = 1):
    """x (1, Cin, 4, 4) -> ConvTranspose (kernel 2, stride 2) -> Relu -> Conv 1x1 (-> 2) -> output."""
    g = GraphBuilder()
    x = g.input([1, weight.shape[0], 4, 4])
    y = g.op("ConvTranspose", [x, g.const(weight, "w")], kernel_shape=[2, 2], strides=[2, 2], group=groups)
    g.output(g.conv(g.op("Relu", [y]), weight.shape[1] * groups, 2, k=1, pad=0))
    return g.model()


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_conv_transpose_l1_and_l2_rank_filters_differently(criterion):
    # ConvTranspose W is (Cin, Cout, k, k): output j's filter is W[:, j] (here Cin = 1, 2x2 kernels)
    model = _conv_transpose_model(FILTERS.reshape(1, 4, 2, 2))
    analysis = analyse(model)
    scores = next(iter(channel_scores(analysis, criterion).values()))
    assert np.allclose(scores, np.abs(FILTERS).sum(1) if criterion == "l1" else np.linalg.norm(FILTERS, axis=1))
    slimmed, _, masked = prune(model, ratio=0.5, criterion=criterion)
    weights = {t.name: t for t in slimmed.graph.initializer}
    node = next(n for n in slimmed.graph.node if n.op_type == "ConvTranspose")
    kept = np.frombuffer(weights[node.input[1]].raw_data, np.float32).reshape(1, 2, 4)[0]
    assert np.array_equal(kept, FILTERS[KEPT[criterion]])
    assert_equivalent(masked, slimmed)


def test_grouped_conv_transpose_filters_gather_each_groups_inputs():
    weight = np.arange(4 * 3 * 2 * 2, dtype=np.float32).reshape(4, 3, 2, 2)  # 2 groups of 2 inputs, 6 outputs
    model = _conv_transpose_model(weight, groups=2)
    analysis = analyse(model)
    node = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
    filters = analysis.rule_for(node).filters(node, analysis.index)
    assert filters.shape == (6, 8)
    assert np.array_equal(filters[4], weight[2:4, 1].reshape(-1))  # output 4 = group 1, column 1


def test_conv_filters_fpgm_and_reduction():
    g = GraphBuilder()
    x = g.input([1, 4, 6, 6])
    y = g.conv(x, 4, 6)
    g.output(g.conv(g.op("Relu", [y]), 6, 6, groups=3))
    model = g.model()
    analysis = analyse(model)
    first, grouped = model.graph.node[0], model.graph.node[-1]
    rule = analysis.rule_for(first)
    filters = rule.filters(first, analysis.index)
    naive = [sum(np.linalg.norm(filters[i].astype(np.float64) - filters[j]) for j in range(6)) for i in range(6)]
    assert np.allclose(rule.channel_scores(first, analysis, "fpgm"), naive)
    assert (rule.reduction(first, 0), rule.reduction(grouped, 0), rule.reduction(first, 1)) == ("full", "grouped", "none")


def test_macs_of_conv_and_conv_transpose():
    model = _conv_transpose_model(np.ones((3, 5, 2, 2), np.float32))
    convt, conv = (n for n in model.graph.node if n.op_type in ("ConvTranspose", "Conv"))
    # ConvTranspose: Cin * prod(in spatial) * Cout/g * prod(kernel); Conv: Cout * prod(out spatial) * Cin/g * k*k
    assert model_stats(model).layer_macs == {convt.name: 3 * 16 * 5 * 4, conv.name: 2 * 64 * 5}


def test_a_positive_mask_scale_after_conv_transpose_folds_into_it():
    g = GraphBuilder()
    x = g.input([1, 3, 4, 4])
    w = g.weights(3, 4, 2, 2)
    y = g.op("ConvTranspose", [x, g.const(w, "w"), g.const(g.weights(4, scale=0.1), "b")],
             kernel_shape=[2, 2], strides=[2, 2])
    g.output(g.conv(g.mask(y, 4, zeros=[3]), 4, 2))
    model = g.model()
    slimmed, report = slim(model)
    assert report.folded_masks == 1 and "Mul" not in [n.op_type for n in slimmed.graph.node]
    assert [(layer.channels_before, layer.channels_after) for layer in report.layers] == [(4, 3), (2, 2)]
    assert_equivalent(model, slimmed)


def _dead_weights_positive_bias(g: GraphBuilder, conv_node, channels) -> None:
    """Zero the filters of ``channels`` but give them a positive bias: the channel is the constant b."""
    for slot, value in ((1, 0.0), (2, 0.3)):
        t = next(t for t in g.initializers if t.name == conv_node.input[slot])
        arr = numpy_helper.to_array(t).copy()
        arr[list(channels)] = value
        t.CopyFrom(numpy_helper.from_array(arr, t.name))


def test_dead_filter_with_bias_is_kept_before_a_padded_conv_and_absorbed_by_an_unpadded_one():
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    c = g.conv(x, 3, 6)
    _dead_weights_positive_bias(g, g.nodes[-1], [1, 2])
    y = g.op("Relu", [c])
    g.output(g.conv(y, 6, 4, k=3, pad=1), g.conv(y, 6, 4, k=1, pad=0))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 4, 4]  # the padded conv cannot absorb the constant

    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    c = g.conv(x, 3, 6)
    _dead_weights_positive_bias(g, g.nodes[-1], [1, 2])
    g.output(g.conv(g.op("Relu", [c]), 6, 4, k=1, pad=0), g.conv(g.op("Relu", [c]), 6, 4, k=3, pad=0))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [4, 4, 4]  # absorbed into both unpadded convs' biases


def test_depthwise_conv_ties_input_and_output_channels():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    expand = g.op("Relu", [g.mask(g.conv(x, 4, 12, k=1, pad=0), 12, zeros=[0, 5, 7])])
    dw = g.op("Relu", [g.conv(expand, 12, 12, groups=12)])
    g.output(g.conv(dw, 12, 4, k=1, pad=0))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [9, 9, 4]
    dw_node = [n for n in slimmed.graph.node if n.op_type == "Conv"][1]
    assert helper.get_attribute_value(next(a for a in dw_node.attribute if a.name == "group")) == 9


def test_mask_after_depthwise_deletes_its_input_channel_too():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    expand = g.op("Relu", [g.conv(x, 4, 8, k=1, pad=0)])
    dw = g.op("Relu", [g.mask(g.conv(expand, 8, 8, groups=8), 8, zeros=[1, 2])])
    g.output(g.conv(dw, 8, 4, k=1, pad=0))
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed) == [6, 6, 4]


def _ghost_module(cheap_zeros, multiplier: int = 1, primary_zeros=()):
    """GhostNet's Ghost module: a = relu(bn(conv1x1(x))), c = mask(relu(bn(dwconv(a)))), then
    conv1x1(Concat(a, c)[:, :oup]) (a: 6 channels, c: 6 * ``multiplier``, oup: all but the last)."""
    g = GraphBuilder(seed=1)
    x = g.input([1, 3, 8, 8])
    stem = g.op("Relu", [g.conv(x, 3, 8)])
    a = g.op("Relu", [g.mask(g.bn(g.conv(stem, 8, 6, k=1, pad=0, bias=False), 6), 6, zeros=primary_zeros)])
    cheap = 6 * multiplier
    c = g.mask(g.op("Relu", [g.bn(g.conv(a, 6, cheap, groups=6, bias=False), cheap)]), cheap, zeros=cheap_zeros)
    cat = g.op("Concat", [a, c], axis=1)
    oup = 6 + cheap - 1
    bounds = [g.const(np.array([v], np.int64)) for v in (0, oup, 1)]
    g.output(g.conv(g.op("Slice", [cat, *bounds]), oup, 4, k=1, pad=0))
    return g.model()


@pytest.mark.parametrize("multiplier, cheap_zeros, primary_zeros, kept", [
    (1, [1, 4], (), [8, 6, 3, 4]),  # the depthwise conv reads a Gather of primary channels 0, 2, 3
    (2, [2, 3, 8, 9], (), [8, 6, 8, 4]),  # groups 1 and 4 go whole (group 5 keeps its unread channel 11)
    (1, [1, 4], [1], [8, 5, 3, 4]),  # primary channel 1 (zero) goes too
])
def test_ghost_cheap_channel_goes_while_its_primary_channel_stays(multiplier, cheap_zeros, primary_zeros, kept):
    """A masked channel of the cheap (depthwise) branch is deleted although its primary channel, which
    the Concat reads, stays: the depthwise conv reads a Gather of the primary channels it still uses
    (before, the depthwise conv tied its output to its live input and no cheap channel went). The last
    cheap channel, which ``[:, :oup]`` drops, goes the same way."""
    model = _ghost_module(cheap_zeros, multiplier, primary_zeros)
    slimmed, report = slim_checked(model)
    assert report.deleted_masked_channels == report.masked_channels, report.format_table()
    assert conv_channels(slimmed) == kept
    gathered = {n.output[0] for n in slimmed.graph.node if n.op_type == "Gather"}
    dw = next(n for n in slimmed.graph.node if n.op_type == "Conv" and n.input[0] in gathered)
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == kept[2] // multiplier


def test_grouped_conv_deletes_a_dead_group_and_balances_the_others():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 4, 8, k=1, pad=0), 8, zeros=[0, 1, 2, 3, 5])])
    grouped = g.op("Relu", [g.conv(y, 8, 6, groups=2)])
    g.output(g.conv(grouped, 6, 4, k=1, pad=0))
    slimmed, report = slim_checked(g.model())
    assert conv_channels(slimmed) == [3, 3, 4]  # group 0 goes (its outputs are absorbed constants)
    assert report.deleted_masked_channels == 5  # channel 5 too: group 1 is the only group left


def test_conv_transpose_as_consumer_and_producer():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 4, 6), 6, zeros=[1, 4])])
    w = g.weights(6, 5, 2, 2)
    up = g.op("ConvTranspose", [y, g.const(w), g.const(g.weights(5, scale=0.1))], kernel_shape=[2, 2], strides=[2, 2])
    up = g.op("Relu", [g.mask(up, 5, zeros=[0])])
    head(g, up, 5)
    slimmed, _ = slim_checked(g.model())
    convt = next(n for n in slimmed.graph.node if n.op_type == "ConvTranspose")
    dims = next(t.dims for t in slimmed.graph.initializer if t.name == convt.input[1])
    assert list(dims) == [4, 4, 2, 2]


def test_grouped_conv_transpose():
    g = GraphBuilder()
    x = g.input([1, 4, 8, 8])
    y = g.op("Relu", [g.mask(g.conv(x, 4, 6), 6, zeros=[0, 1, 2])])
    up = g.op("ConvTranspose", [y, g.const(g.weights(6, 2, 2, 2))], kernel_shape=[2, 2], strides=[2, 2], group=2)
    head(g, g.op("Relu", [up]), 4)
    slimmed, _ = slim_checked(g.model())
    assert conv_channels(slimmed)[0] == 3


def _ghost_behind_a_mask():
    g = GraphBuilder(seed=1)
    stem = g.op("Relu", [g.conv(g.input([1, 3, 8, 8]), 3, 8)])
    a = g.op("Relu", [g.bn(g.conv(stem, 8, 6, k=1, pad=0, bias=False), 6)])
    read = g.mask(a, 6, zeros=[1])  # the conv's input mask; channel 1 stays in the Concat
    c = g.mask(g.op("Relu", [g.bn(g.conv(read, 6, 6, groups=6, bias=False), 6)]), 6, zeros=[1, 4])
    g.output(g.conv(g.op("Concat", [a, c], axis=1), 12, 4, k=1, pad=0))
    return g.model()


def test_a_mask_that_hid_a_ghost_conv_is_slimmed_in_a_second_pass():
    """prune puts a mask between the tensor a Concat reads and a depthwise conv (Yolo-FastestV2's
    shuffle blocks): the conv reads Mul(a, mask), the Concat reads a. Until the mask folds into the
    conv's weights the conv is not a Ghost conv (it does not read what the Concat reads), so its cheap
    channels stay coupled to their inputs, which the Concat keeps: channel 4 (masked at the output) and
    channel 1 (masked at the input). slim's second pass, after the fold, gathers the conv's input and
    deletes both, so slimming the output again finds nothing (before: 2 more channels, a Gather added)."""
    slimmed, report = slim_checked(_ghost_behind_a_mask())
    assert conv_channels(slimmed) == [8, 6, 4, 4]  # cheap channels 1 (input masked) and 4 (input live) gone
    assert [n.op_type for n in slimmed.graph.node].count("Gather") == 1
    assert any("second slim pass" in note and "2 more channel" in note for note in report.notes), report.notes
    again, more = slim(slimmed)
    assert again.SerializeToString() == slimmed.SerializeToString() and not more.deleted_any


def test_the_report_of_two_passes_counts_the_masked_channels_the_second_deleted():
    """The ghost conv's output mask (channels 1 and 4) stays unfolded in the first pass, which keeps both;
    the second pass deletes them and folds the mask. The merged report says so (before: 'masked channels
    deleted: 0 / 3', both still listed as kept, and the folded mask counted as kept in the output)."""
    slimmed, report = slim_checked(_ghost_behind_a_mask())
    assert (report.masked_channels, report.deleted_masked_channels) == (3, 2), report.format_table()
    assert [(k.channels, k.kind) for k in report.kept] == [((1,), "live")]  # the Concat reads channel 1 of a
    assert report.folded_masks == 2 and report.remaining_masks == []
    assert "Mul" not in [n.op_type for n in slimmed.graph.node]
    assert json.loads(json.dumps(report.to_dict()))["deleted_masked_channels"] == 2
