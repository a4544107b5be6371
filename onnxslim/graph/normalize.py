"""Bring exported graphs into the one form the analysis reads: every constant is an initializer.

Rule: a node whose inputs are all constants computes a constant; it is replaced by an initializer holding
its value. Old exporters spell weights and scales as ``Constant`` nodes, ``Identity`` of a shared weight,
``Unsqueeze(scale)`` (BN's affine in ONNX-zoo opset-9 / Caffe2 graphs: ``Mul(x, Unsqueeze(gamma))``),
``Reshape(mask, [1,C,1,1])`` or ``Cast``; after this pass a mask or a weight is recognised however it was
spelled. The work is done by well-kept libraries, not by an evaluator of our own:

1. onnx-ir's ``LiftConstantsToInitializersPass`` turns ``Constant`` nodes into initializers;
2. onnxscript's constant folder (``onnxscript.optimizer.fold_constants``) evaluates every all-constant node with onnx's
   reference implementation *of the model's opset version* (``Unsqueeze-1`` with its ``axes`` attribute at
   opset 9 ...) and applies its exact simplifications (``Identity`` and inference ``Dropout`` removed,
   ``Cast`` to the same type dropped ...).

Before that, :func:`alias_constant_identities` lets readers of ``Identity(initializer)`` read the
initializer itself, so that a shared weight stays one tensor.

Left alone: ``QuantizeLinear`` / ``DequantizeLinear`` (int8 weights stay int8; the QDQ rule reads them),
``ConstantOfShape``, random generators, control flow, and results much larger than the constants they
replace. The model's semantics, opset and IR version do not change; exported ``value_info`` is not used
(it is recomputed after slimming).

Memory: the folder runs on an onnx-ir view of the working model whose tensors wrap the existing
TensorProtos (placeholders wrap the input's tensor that holds the data), so no weight is copied; only the
node list and the *new* initializers are written back into the ModelProto.
"""

from __future__ import annotations

import contextlib
import logging

import onnx
import onnx.reference.ops
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveInitializersFromInputsPass
from onnxscript.optimizer import fold_constants

# results may be at most this many elements larger than the single-use constants they replace
_GROWTH_LIMIT = 1 << 20
# weights computed from constants (Cast of fp16 weights, Transpose of a MatMul weight) of any size fold
_INPUT_LIMIT = 1 << 40
_KEPT = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConstantOfShape"})


def constants_to_initializers(model: onnx.ModelProto, sources: dict[str, onnx.TensorProto] | None = None) -> int:
    """Fold every all-constant node of ``model`` into initializers, in place; returns the number of nodes
    removed.

    ``sources`` holds the data of placeholder initializers (see :func:`onnxslim.graph.model.detach_weights`).
    """
    view = ir.serde.deserialize_model(model)
    graph = view.graph
    for name, tensor in (sources or {}).items():
        if name in graph.initializers:
            graph.initializers[name].const_value = ir.serde.TensorProtoTensor(tensor)
    original = {name: value.const_value for name, value in graph.initializers.items()}
    node_names = {node: node.name for node in graph}
    RemoveInitializersFromInputsPass()(view)  # IR 3 lists initializers as inputs: they are constants
    for node in graph:
        for value in node.outputs:
            value.shape = None  # exported value_info is not trusted
    modified = LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(view).modified
    with _quiet_folder():
        while True:
            modified |= fold_constants(view, onnx_shape_inference=False, input_size_limit=_INPUT_LIMIT,
                                       output_size_limit=_GROWTH_LIMIT, should_fold=_should_fold).modified
            if not _fold_multi_output(view):
                break
            modified = True
    if not modified:
        return 0
    for node in graph:
        node.name = node_names.get(node, node.name)  # the folder names unnamed nodes; reports use outputs
    before = len(model.graph.node)
    _write_back(model, graph, original)
    return before - len(model.graph.node)


@contextlib.contextmanager
def _quiet_folder():
    """The folder logs what it skips (multi-output ops, large results) as warnings: not news to a user."""
    logger = logging.getLogger("onnxscript.optimizer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _should_fold(node: ir.Node) -> bool | None:
    """False for the ops kept as they are; None lets the folder apply its own limits."""
    if node.domain in ("", "ai.onnx") and node.op_type in _KEPT:
        return False
    return None


def _fold_multi_output(view: ir.Model) -> bool:
    """Evaluate the all-constant nodes with several outputs (``Split`` of a constant: legacy exports of
    ``for s in buffer``), which onnxscript's folder leaves, with onnx's reference op of the model's opset."""
    graph, version = view.graph, view.opset_imports.get("", 1)
    changed = False
    for node in list(graph):
        if len(node.outputs) < 2 or node.domain not in ("", "ai.onnx") or _should_fold(node) is False:
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            continue
        values = [None if v is None else v.const_value for v in node.inputs]
        if any(v is not None and (t is None or v.is_graph_input()) for v, t in zip(node.inputs, values)):
            continue
        if any(out.is_graph_output() for out in node.outputs):
            continue
        try:
            results = _evaluate(node, version, [None if t is None else t.numpy() for t in values])
        except Exception:  # the reference ops lack this op or version: the node stays
            continue
        for output, result in zip(node.outputs, results):
            folded = ir.Value(name=output.name, const_value=ir.tensor(result, name=output.name))
            graph.register_initializer(folded)
            output.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        changed = True
    return changed


def _evaluate(node: ir.Node, version: int, inputs: list) -> list:
    attributes = {name: ir.serde.serialize_tensor(a.value) if a.type == ir.AttributeType.TENSOR else a.value
                  for name, a in node.attributes.items()}
    operator = onnx.reference.ops.load_op("", node.op_type, version)
    return list(operator.eval(*inputs, n_outputs=len(node.outputs), **attributes))


def _write_back(model: onnx.ModelProto, graph: ir.Graph, original: dict) -> None:
    """Replace the node list and add the initializers the passes created (unchanged ones stay as they are;
    unused ones are left to dead-code removal)."""
    del model.graph.node[:]
    model.graph.node.extend(ir.serde.serialize_node(node) for node in graph)
    listed = {i.name for i in model.graph.input}
    for name, value in graph.initializers.items():
        if original.get(name) is value.const_value:
            continue
        tensor = ir.serde.serialize_tensor(value.const_value)
        tensor.name = name
        model.graph.initializer.append(tensor)
        if model.ir_version < 4 and name not in listed:
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    names = [o.name for o in model.graph.output]
    assert names == [v.name for v in graph.outputs], "constant folding renamed a graph output"


def alias_constant_identities(model: onnx.ModelProto) -> int:
    """Let readers of ``Identity(initializer)`` read the initializer itself; returns how many went.

    The legacy torch exporter shares a weight between two uses of one module that way. Folding the
    Identity into a new initializer would be a second copy of the weight (a larger model); an alias keeps
    the one copy, which the analysis then couples (both readers slice it alike). Identities whose output
    is a graph output or is read inside a control-flow body stay.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    keep_names = {o.name for o in graph.output}
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                keep_names.update(n for inner in body.node for n in inner.input)
    alias = {node.output[0]: node.input[0] for node in graph.node
             if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in initializers
             and node.output[0] not in keep_names}
    if not alias:
        return 0
    survivors = [node for node in graph.node if not (node.op_type == "Identity" and node.output[0] in alias)]
    for node in survivors:
        for slot, name in enumerate(node.input):
            if name in alias:
                node.input[slot] = alias[name]
    del graph.node[:]
    graph.node.extend(survivors)
    return len(alias)
