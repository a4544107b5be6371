"""Layout rules: the module's BARRIERS are barriers in the default rules; Flatten -> Gemm deletes feature blocks."""

from __future__ import annotations

from graphs import GraphBuilder, assert_equivalent
from onnx import helper

from onnxslim.graph.rules import default_rules, module_rules
from onnxslim.graph.rules import layout as layout_rules
from onnxslim.graph.rules.base import BarrierRule
from onnxslim.graph.slim import slim


def test_barriers_of_the_module_are_barriers_in_the_default_rules():
    barriers = [rule for rule in module_rules(layout_rules) if isinstance(rule, BarrierRule)]
    for op in (op for rule in barriers for op in rule.op_types):
        assert isinstance(default_rules().rule_for(helper.make_node(op, ["x"], ["y"])), BarrierRule)


def test_a_mask_before_flatten_and_gemm_deletes_blocks_of_features():
    g = GraphBuilder()
    x = g.input([1, 3, 4, 4])
    y = g.mask(g.op("Relu", [g.conv(x, 3, 5)]), 5, zeros=[1, 3])
    g.output(g.gemm(g.op("Flatten", [y], axis=1), 5 * 16, 2))
    model = g.model()
    slimmed, report = slim(model)
    assert [(layer.channels_before, layer.channels_after) for layer in report.layers] == [(5, 3), (2, 2)]
    assert_equivalent(model, slimmed)
