"""RuleSet (a value, keyed by domain and op type), module_rules, filter_scores."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxslim.graph.rules import RuleSet, default_rules, known_op_types, rule_for
from onnxslim.graph.rules import conv as conv_rules
from onnxslim.graph.rules import norm as norm_rules
from onnxslim.graph.rules.base import BarrierRule, Rule, filter_scores, module_rules


class _Custom(Rule):
    domain, op_types, passthrough = "com.example", ("Thing",), True


def test_keys_are_domain_qualified_and_ai_onnx_is_the_default_domain():
    rules = default_rules()
    relu = rules.rule_for(helper.make_node("Relu", ["x"], ["y"]))
    assert rules.rule_for(helper.make_node("Relu", ["x"], ["y"], domain="ai.onnx")) is relu
    assert isinstance(rules.rule_for(helper.make_node("Relu", ["x"], ["y"], domain="com.example")), BarrierRule)
    assert ("", "Conv") in rules and ("ai.onnx", "Conv") in rules and ("com.example", "Thing") not in rules


def test_with_rules_returns_a_new_set_and_leaves_the_default_alone():
    node = helper.make_node("Thing", ["x"], ["y"], domain="com.example")
    extended = default_rules().with_rules(_Custom())
    assert isinstance(extended.rule_for(node), _Custom)
    assert isinstance(default_rules().rule_for(node), BarrierRule)
    assert len(extended) == len(default_rules()) + 1
    assert default_rules() is default_rules()  # built once, immutable


def test_a_later_rule_replaces_an_earlier_one():
    class MyConv(Rule):
        op_types = ("Conv",)

    replaced = default_rules().with_rules(MyConv())
    assert isinstance(replaced.rule_for(helper.make_node("Conv", ["x", "w"], ["y"])), MyConv)
    assert "Conv" not in RuleSet([BarrierRule("no", ("Conv",))]).known_op_types()


def test_module_rules_and_the_compatibility_helpers():
    assert {type(r).__name__ for r in module_rules(conv_rules)} == {"ConvRule", "ConvTransposeRule"}
    barriers = [r for r in module_rules(norm_rules) if isinstance(r, BarrierRule)]
    assert {op for r in barriers for op in r.op_types} >= {"LRN", "MeanVarianceNormalization"}
    assert "Conv" in known_op_types() and "LRN" not in known_op_types()
    assert rule_for(helper.make_node("Conv", ["x", "w"], ["y"])) is default_rules().rule_for(
        helper.make_node("Conv", ["x", "w"], ["y"]))


def test_filter_scores_by_definition():
    filters = np.array([[1.0, 1, 1, 1], [3, 0, 0, 0], [0, 0, 0, 0.5]], np.float32)
    assert filter_scores(filters, "l1").tolist() == [4.0, 3.0, 0.5]
    assert np.allclose(filter_scores(filters, "l2"), [2.0, 3.0, 0.5])
    naive = [sum(np.linalg.norm(filters[i].astype(np.float64) - filters[j]) for j in range(3)) for i in range(3)]
    assert np.allclose(filter_scores(filters, "fpgm"), naive)
    with pytest.raises(ValueError, match="unknown filter criterion"):
        filter_scores(filters, "l3")
