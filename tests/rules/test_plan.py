"""Direct tests of the removal plan (onnxslim.graph.plan): what goes, restoring, empty tensors, rounding."""

from __future__ import annotations

import numpy as np
from graphs import GraphBuilder

from onnxslim.graph.plan import plan_removal
from onnxslim.graph.slim import analyse
from onnxslim.graph.values import STRUCTURAL


def _masked_conv_chain(zeros, channels=8):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.mask(g.conv(x, 3, channels), channels, zeros=zeros)
    head = g.conv(y, channels, 4)
    g.output(head)
    analysis = analyse(g.model())
    return analysis, y


def test_unkept_classes_are_removed_and_keep_masks_follow():
    analysis, y = _masked_conv_chain(zeros=[1, 5])
    plan = plan_removal(analysis)
    assert np.flatnonzero(~plan.keep(y)).tolist() == [1, 5]
    assert plan.anything_removed and not plan.is_empty(y)
    assert plan.keep("no such tensor") is None
    # the graph input and output are barriers: nothing of theirs goes
    assert plan.keep("x").all()


def test_restore_keeps_a_whole_class_with_a_structural_reason():
    analysis, y = _masked_conv_chain(zeros=[1, 5])
    plan = plan_removal(analysis)
    plan.restore(analysis.info[y].ids[[1]], "kept for the test")
    assert np.flatnonzero(~plan.keep(y)).tolist() == [5]
    reason = analysis.reasons[plan.reason[analysis.info[y].ids[1]]]
    assert (reason.kind, reason.text) == (STRUCTURAL, "kept for the test")


def test_a_tensor_read_by_a_conv_keeps_one_channel():
    analysis, y = _masked_conv_chain(zeros=range(8))
    plan = plan_removal(analysis)
    assert int(plan.keep(y).sum()) == 1  # a Conv input may not become empty
    assert "does not become empty" in analysis.reasons[plan.reason[analysis.info[y].ids[0]]].text


def test_rounding_restores_the_largest_l1_filters():
    analysis, y = _masked_conv_chain(zeros=[0, 1, 2, 3, 4])  # 3 left, rounded up to 4
    conv = analysis.creators[analysis.index.producer[y].input[0]]
    l1 = analysis.rule_for(conv).channel_scores(conv, analysis, "l1")
    plan = plan_removal(analysis, round_to=4)
    kept = np.flatnonzero(plan.keep(y)).tolist()
    assert len(kept) == 4 and {5, 6, 7} < set(kept)
    assert kept[0] == int(np.argmax(l1[:5]))


def test_rounding_a_grouped_conv_restores_whole_groups_and_slim_is_a_fixed_point():
    """A grouped conv of two channels per group (a face-quality net's 7x7 GDC, 100 channels in 50 groups)
    after a 1x1 conv, masks that leave one channel in 9 groups and none in 15: 9 kept, rounded to 16 by
    bringing back 7 dead groups (one channel each). Restoring 7 channels at once put a second channel in
    some group, and keeping the groups equal then gave back most (before: 34 kept of 48, not a multiple)."""
    from graphs import assert_equivalent

    from onnxslim.graph.slim import slim

    g = GraphBuilder()
    x = g.input([1, 3, 7, 7])
    zeros = [c for c in range(48) if c < 30 or c % 2]  # groups 0-14 dead, 15-23 keep their even channel
    y = g.op("Relu", [g.mask(g.conv(x, 3, 48, k=1, pad=0), 48, zeros=zeros)])
    z = g.op("Relu", [g.mask(g.conv(y, 48, 48, k=7, pad=0, groups=24), 48, zeros=zeros)])
    g.output(g.conv(z, 48, 4, k=1, pad=0))
    model = g.model()
    slimmed, report = slim(model, round_to=8)
    assert_equivalent(model, slimmed)
    assert [layer.channels_after for layer in report.layers] == [16, 16, 4], report.format_table()
    again, second = slim(slimmed, round_to=8)
    assert [layer.channels_after for layer in second.layers] == [16, 16, 4]
    assert again.SerializeToString() == slimmed.SerializeToString()
