"""Bring exported graphs into the one form the analysis reads: every constant is an initializer.

Rule: a node whose inputs are all constants computes a constant; replace it by an initializer holding
its value. This covers ``Constant`` nodes (old exporters emit weights that way), ``Identity`` of a shared
weight, and small weight-side subgraphs (``Reshape(mask, [1,C,1,1])``, ``Cast``, ``Unsqueeze`` ...),
so a mask or a weight is recognised however the exporter spelled it. Values are computed with
``onnx.reference``; random generators, control flow and results much larger than their inputs are left
alone. The model's semantics do not change.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim.graph.model import Graph

_NOT_FOLDED = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "Optional",
}
_GROWTH_LIMIT = 1 << 20  # a folded result may be at most this many elements larger than its inputs


def constants_to_initializers(model: onnx.ModelProto, sources: dict[str, onnx.TensorProto] | None = None) -> int:
    """Fold every all-constant node into initializers, in place; returns the number of nodes folded.

    ``sources`` holds the data of placeholder initializers (see :func:`onnxslim.graph.model.detach_weights`).
    """
    graph = model.graph
    known = {t.name: None for t in graph.initializer}
    values: dict[str, np.ndarray] = {}
    graph_outputs = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    folded = 0
    index = None  # lazily built to read initializer values
    for node in graph.node:
        if _foldable(node, known, graph_outputs):
            if index is None:
                index = Graph(model, sources=sources)
            inputs = []
            for name in node.input:
                if not name:
                    inputs.append(None)
                elif name in values:
                    inputs.append(values[name])
                else:
                    inputs.append(index.constant(name))
            results = _evaluate(node, inputs, model)
            if results is not None and _small_enough(results, inputs):
                for name, value in zip(node.output, results):
                    values[name] = value
                    known[name] = None
                folded += 1
                continue
        keep.append(node)
    if not folded:
        return 0
    # only the folded values that something still reads become initializers
    read = {n for node in keep for n in node.input} | graph_outputs
    for node in keep:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                read.update(_all_reads(attr))
    del graph.node[:]
    graph.node.extend(keep)
    for name, value in values.items():
        if name in read:
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            if model.ir_version < 4:
                graph.input.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype), list(np.shape(value))))
    return folded


def _foldable(node: onnx.NodeProto, known: dict, graph_outputs: set[str]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED:
        return False
    if any(out in graph_outputs for out in node.output):
        return False
    if node.op_type == "Constant":
        return not any(a.name in ("sparse_value",) for a in node.attribute)
    return bool(node.input) and all((not name) or name in known for name in node.input)


def _evaluate(node: onnx.NodeProto, inputs: list, model: onnx.ModelProto) -> list[np.ndarray] | None:
    if node.op_type == "Constant":
        attr = node.attribute[0]
        if attr.name == "value":
            return [numpy_helper.to_array(attr.t)]
        value = helper.get_attribute_value(attr)
        dtype = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                 "value_ints": np.int64}.get(attr.name)
        if dtype is None:
            return None
        return [np.asarray(value, dtype=dtype)]
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if name else "" for i, name in enumerate(node.input)]
    single = helper.make_node(node.op_type, names, list(node.output), domain=node.domain)
    single.attribute.extend(node.attribute)
    feeds = {n: v for n, v in zip(names, inputs) if n}
    try:
        evaluator = ReferenceEvaluator(single, opsets={"": _opset(model)})
        results = evaluator.run(None, feeds)
    except Exception:  # the reference runtime lacks an op or rejects it: leave the node to onnxruntime
        return None
    return [np.asarray(r) for r in results]


def _small_enough(results: list[np.ndarray], inputs: list) -> bool:
    in_size = sum(int(np.size(v)) for v in inputs if v is not None)
    return sum(int(np.size(r)) for r in results) <= in_size + _GROWTH_LIMIT


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return onnx.defs.onnx_opset_version()


def _all_reads(attr: onnx.AttributeProto) -> set[str]:
    graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    reads: set[str] = set()
    for body in graphs:
        for node in body.node:
            reads.update(node.input)
            for inner in node.attribute:
                if inner.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    reads.update(_all_reads(inner))
    return reads


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
