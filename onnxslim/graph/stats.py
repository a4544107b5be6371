"""Parameter and MAC counts of an ONNX model.

* params: elements of all floating-point initializers (integer ones are shapes and indices) and
  floating-point ``Constant`` nodes (old exporters keep weights there), of quantized weights (the int8
  data behind a DequantizeLinear) and of the integer weights of ConvInteger / MatMulInteger
  (dynamically quantized models) and QLinearConv / QLinearMatMul / QGemm (QOperator models; their int32
  biases are not counted): each stored tensor once, however many nodes read it. ``slim`` and
  ``prune`` count the input as stored, before normalisation folds constants (a bias reshaped for two
  readers is then two initializers).
* MACs: multiply-accumulates of one sample (batch dimension taken as 1), from static shapes, of every
  op whose rule counts them (``Rule.counts_macs`` / ``Rule.macs``): Conv, ConvTranspose, Gemm and MatMul
  in the default rules — ``Cout * prod(out spatial) * Cin/g * prod(kernel)`` for Conv,
  ``Cin * prod(in spatial) * Cout/g * prod(kernel)`` for ConvTranspose, ``K * M`` per row for Gemm/MatMul.
  Elementwise ops, BN and pooling are not counted (they are not multiply-accumulates into weights).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from onnxslim.graph import quantized
from onnxslim.graph.rules import RuleSet, default_rules
from onnxslim.graph.shapes import infer_shapes

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclasses.dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int
    macs_complete: bool  # False when some layer's shapes were not static (its MACs are not counted)
    layer_macs: dict[str, int]


def count_params(model: onnx.ModelProto, rules: RuleSet | None = None) -> int:
    """Elements of the floating-point initializers and Constant nodes, of the quantized weights (the integer data of a
    DequantizeLinear of initializers, see :mod:`onnxslim.graph.quantized`) and of the integer weights
    (input ``Rule.weight_slot``) of MAC-counting ops (``Rule.counts_macs`` in ``rules``: ConvInteger,
    MatMulInteger, QLinearConv, QLinearMatMul, QGemm)."""
    rules = rules if rules is not None else default_rules()
    names = {t.name for t in model.graph.initializer}
    data = {node.input[0] for node in model.graph.node if quantized.is_quantized_constant(node, names)}
    for node in model.graph.node:
        rule = rules.rule_for(node)
        if rule.counts_macs and len(node.input) > rule.weight_slot and node.input[rule.weight_slot] in names:
            data.add(node.input[rule.weight_slot])
    stored = list(model.graph.initializer)
    stored += [attr.t for node in model.graph.node if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
               for attr in node.attribute if attr.name == "value"]
    total = 0
    for tensor in stored:
        if tensor.data_type in _FLOAT_TYPES or tensor.name in data:
            total += int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    total += sum(len(attr.floats) for node in model.graph.node if node.op_type == "Constant"
                 for attr in node.attribute if attr.name == "value_floats")
    return total


def count_macs(model: onnx.ModelProto, shapes: dict[str, tuple],
               rules: RuleSet | None = None) -> tuple[int, bool, dict[str, int]]:
    """(total MACs, whether every counted layer had static shapes, MACs per layer name).

    The ops counted and their formulas are their rules' (``counts_macs``, ``macs``) in ``rules``
    (default :func:`onnxslim.graph.rules.default_rules`).
    """
    rules = rules if rules is not None else default_rules()
    initializer_dims = {t.name: tuple(t.dims) for t in model.graph.initializer}

    def dims(name):
        return initializer_dims.get(name) or shapes.get(name)

    total, complete, per_layer = 0, True, {}
    for node in model.graph.node:
        rule = rules.rule_for(node)
        if not rule.counts_macs:
            continue
        macs = rule.macs(node, dims)
        if macs is None:
            complete = False
            continue
        per_layer[node.name or node.output[0]] = macs
        total += macs
    return total, complete, per_layer


def model_stats(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
                shapes: dict[str, tuple] | None = None, rules: RuleSet | None = None) -> ModelStats:
    """Params and per-sample MACs; ``input_shapes`` fixes dynamic input dims for the MAC count;
    ``rules`` says which ops count MACs and how (default: the default rule set)."""
    if shapes is None:
        shapes = infer_shapes(model, input_shapes)
    macs, complete, per_layer = count_macs(model, shapes, rules)
    return ModelStats(count_params(model, rules), macs, complete, per_layer)
