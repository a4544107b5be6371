"""Elementwise rules: which ops multiply, are identities, and let a positive scale pass (mask folding)."""

from __future__ import annotations

import pytest
from graphs import GraphBuilder, assert_equivalent
from onnx import helper

from onnxslim.graph.rules import default_rules
from onnxslim.graph.slim import slim


@pytest.mark.parametrize("op, multiplies, identity, commutes", [
    ("Mul", True, False, False), ("Add", False, False, False), ("PRelu", False, False, True),
    ("Relu", False, False, True), ("Identity", False, True, True), ("Sigmoid", False, False, False),
])
def test_facts_the_cleanup_asks(op, multiplies, identity, commutes):
    node = helper.make_node(op, ["a", "b"] if op in ("Mul", "Add", "PRelu") else ["a"], ["y"])
    rule = default_rules().rule_for(node)
    assert (rule.multiplies(node), rule.is_identity(node), rule.commutes_with_positive_scale(node)) == \
        (multiplies, identity, commutes)


@pytest.mark.parametrize("act, folds_into_producer", [("PRelu", True), ("Sigmoid", False)])
def test_a_positive_mask_scale_moves_through_prelu_but_not_sigmoid(act, folds_into_producer):
    g = GraphBuilder()
    x = g.input([1, 3, 6, 6])
    y = g.conv(x, 3, 4)
    y = g.op("PRelu", [y, g.const(g.weights(4, 1, 1), "slope")]) if act == "PRelu" else g.op(act, [y])
    g.output(g.op("Relu", [g.mask(y, 4, zeros=[])]))  # no consumer with weights: only the producer can fold
    model = g.model()
    slimmed, report = slim(model)
    assert report.folded_masks == int(folds_into_producer)
    assert_equivalent(model, slimmed)
