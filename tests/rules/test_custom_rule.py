"""An outside rule for a custom-domain op, registered through a rule set value, slims through the op.

The op is ``com.example.ScaleShift(x, s, b) = x * s + b``, defined as a model-local function
(``ModelProto.functions``, a FunctionProto of Mul and Add) so that onnxruntime can run the masked and the
slimmed model and compare them. The rule is the README's worked example ("Adding an op"): this test
executes that code block, so the README stays true.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from graphs import GraphBuilder, assert_equivalent
from onnx import TensorProto, helper

from onnxslim.graph.inspect import inspect_model
from onnxslim.graph.prune import prune
from onnxslim.graph.slim import slim

README = Path(__file__).resolve().parents[2] / "README.md"


def scale_shift_model() -> onnx.ModelProto:
    """conv(3->6) -> ScaleShift -> Relu -> mask zeroing channels 1, 4 -> conv(6->4, padded)."""
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.conv(x, 3, 6)
    s = g.const(g.rng.uniform(0.5, 2.0, (6, 1, 1)).astype(np.float32), "s")
    b = g.const(g.rng.uniform(-1.0, 1.0, (6, 1, 1)).astype(np.float32), "b")
    shifted = g.name("shifted")
    g.nodes.append(helper.make_node("ScaleShift", [y, s, b], [shifted], name="scale_shift", domain="com.example"))
    out = g.conv(g.mask(g.op("Relu", [shifted]), 6, zeros=[1, 4]), 6, 4)
    function = helper.make_function(
        "com.example", "ScaleShift", ["x", "s", "b"], ["y"],
        [helper.make_node("Mul", ["x", "s"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
        opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph(g.nodes, "custom_domain", g.inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4, 8, 8])], g.initializers)
    model = helper.make_model(graph, functions=[function], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def readme_rule_example() -> str:
    section = README.read_text().split("### Adding an op", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_readme_example(model: onnx.ModelProto) -> dict:
    namespace = {"model": model}
    exec(compile(readme_rule_example(), str(README), "exec"), namespace)
    return namespace


def _channels(report) -> list[tuple[int, int]]:
    return [(layer.channels_before, layer.channels_after) for layer in report.layers]


def test_without_the_rule_the_function_is_inlined_and_slims_like_its_body():
    # a model-local function without a rule is inlined (its Mul and Add have rules): no barrier is left
    model = scale_shift_model()
    slimmed, report = slim(model)
    assert _channels(report) == [(6, 4), (4, 4)]
    assert not report.kept and not slimmed.functions
    assert all(n.op_type != "ScaleShift" for n in slimmed.graph.node)
    assert_equivalent(model, slimmed)


def test_the_readme_rule_slims_through_the_custom_op_and_onnxruntime_agrees():
    model = scale_shift_model()
    namespace = run_readme_example(model)
    slimmed, report = namespace["slimmed"], namespace["report"]
    assert _channels(report) == [(6, 4), (4, 4)]
    assert report.deleted_masked_channels == 2 and report.folded_masks == 1
    node = next(n for n in slimmed.graph.node if n.op_type == "ScaleShift")
    weights = {t.name: t for t in slimmed.graph.initializer}
    assert [list(weights[name].dims) for name in node.input[1:]] == [[4, 1, 1], [4, 1, 1]]
    assert slimmed.functions[0].name == "ScaleShift"
    assert_equivalent(model, slimmed)  # onnxruntime runs the model-local function


def test_prune_and_inspect_take_the_same_rule_set():
    model = scale_shift_model()
    rules = run_readme_example(model)["rules"]
    opaque = onnx.ModelProto()
    opaque.CopyFrom(model)
    del opaque.functions[:]  # an op of a runtime's custom-op library: no function to inline, no rule
    assert inspect_model(opaque).barriers[0].op_type == "ScaleShift"
    assert inspect_model(model, rules=rules).barriers == []
    slimmed, report, masked = prune(model, ratio=0.5, rules=rules)
    assert _channels(report)[0][1] <= 3  # half of the six channels chosen, plus the masked ones
    assert slimmed.functions[0].name == "ScaleShift"  # the rule read the call: not inlined
    assert_equivalent(masked, slimmed)
    assert _channels(prune(opaque, ratio=0.5)[1])[0] == (6, 6)  # held by the barrier
