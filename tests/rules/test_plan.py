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
