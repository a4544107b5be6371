"""Passes that run after the rewrite, one per function, each stating its rule.

* :func:`fold_channel_scales` — a per-channel ``Mul`` by constant ``s`` (a mask whose zeros are gone)
  disappears into neighbouring weights.
* :func:`remove_identities` — ``Identity`` nodes are bypassed (Dropout in inference, dropped operands).
* :func:`remove_dead_code` — nodes no output depends on, and initializers nothing reads, are dropped.
* :func:`refresh_shapes` — stale ``value_info`` is cleared and shapes re-inferred.
* :func:`sync_ir3_inputs` — IR < 4 models list every initializer as a graph input too; keep that true.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxslim.graph.model import Graph, WeightStore, get_attr, iter_nodes_with_subgraphs
from onnxslim.graph.plan import RemovalPlan
from onnxslim.graph.shapes import infer_model, shapes_of


def fold_channel_scales(index: Graph, plan: RemovalPlan) -> tuple[int, list[str]]:
    """Fold ``y = x * s`` (s constant, varying only along the channel axis) into weights.

    Into the producer of ``x`` when ``x`` feeds only this Mul (Conv, ConvTranspose, Gemm:
    ``W[o] *= s[o], b[o] *= s[o]``; BatchNormalization, InstanceNormalization: ``scale *= s, B *= s``) —
    for a positive ``s`` also through Relu, LeakyRelu, PRelu and pooling, since ``f(s x) = s f(x)``;
    else into every consumer of ``y`` when all are Conv / Gemm / MatMul reading it as their feature input
    (``W[:, i] *= s[i]``; exact with zero padding since ``pad(s x) = s pad(x)``). A scale of all ones is
    simply bypassed. Returns (number of Mul nodes removed, names of per-channel Mul nodes kept).
    """
    weights = WeightStore(index)
    folded, kept, removed = 0, [], set()
    for node in list(index.nodes):
        scale = _channel_scale(node, index, plan)
        if scale is None:
            continue
        factors, constant_slot = scale
        x, y = node.input[1 - constant_slot], node.output[0]
        if y in index.outputs and (x in index.outputs or len(index.uses(x)) != 1 or x not in index.producer):
            kept.append(index.node_name(node))  # the graph output name must survive
            continue
        if np.all(factors == 1) or _scale_producer(index, weights, x, factors) \
                or _scale_consumers(index, weights, y, factors):
            _bypass(index, node, x, y)
            removed.add(y)
            folded += 1
        else:
            kept.append(index.node_name(node))
    if removed:
        survivors = [n for n in index.graph.node if not (n.op_type == "Mul" and n.output[0] in removed)]
        del index.graph.node[:]
        index.graph.node.extend(survivors)
        index.reindex()
    return folded, kept


def _channel_scale(node, index: Graph, plan: RemovalPlan):
    """(factors, constant slot) when ``node`` is ``Mul(feature, c)`` with ``c`` per channel on axis 1
    (a mask) or a single number (a structure mask: one scale for the whole tensor)."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    info = plan.analysis.info.get(node.output[0])
    if info is None or info.axis != 1:
        return None
    channels = int(plan.keep(node.output[0]).sum())  # after the rewrite
    for slot in (0, 1):
        constant = index.constant(node.input[slot])
        other = node.input[1 - slot]
        if constant is None or index.is_const(other) or other not in plan.analysis.info:
            continue
        if tuple(index.shape(other) or ()) != tuple(index.shape(node.output[0]) or (None,)):
            return None  # the constant broadcasts the feature to a larger shape
        if constant.size == 1:
            return np.full(channels, float(constant.reshape(-1)[0])), slot
        caxis = info.axis - (info.rank - constant.ndim)
        if caxis < 0 or constant.size != channels or constant.shape[caxis] != channels:
            return None
        return constant.reshape(-1).astype(np.float64), slot
    return None


def _bypass(index: Graph, node, x: str, y: str) -> None:
    """Let readers of ``y`` read ``x`` (or rename ``x`` to the graph output ``y``); the Mul is dropped
    by the caller. The index is updated in place so that later decisions see the new readers."""
    mul_use = [u for u in index.uses(x) if u.node is node]
    if y in index.outputs:
        producer = index.producer[x]
        for position, name in enumerate(producer.output):
            if name == x:
                producer.output[position] = y
        index.producer[y] = producer
        index.producer.pop(x, None)
        index.consumers.pop(x, None)
        return
    readers = index.uses(y)
    for use in readers:
        use.node.input[use.slot] = x
    index.consumers[x] = [u for u in index.uses(x) if u not in mul_use] + readers
    index.consumers.pop(y, None)
    index.producer.pop(y, None)


# ops with f(s x) = s f(x) for s > 0, channel by channel: a positive scale moves through them
_POSITIVELY_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                           "GlobalMaxPool", "Identity", "Dropout"}


def _scale_producer(index: Graph, weights: WeightStore, x: str, s: np.ndarray) -> bool:
    producer = index.producer.get(x)
    if producer is None or x in index.outputs or len(index.uses(x)) != 1 or producer.output[0] != x:
        return False
    op = producer.op_type
    if op in _POSITIVELY_HOMOGENEOUS and np.all(s > 0):
        if any(name and (index.uses(name) or name in index.outputs) for name in producer.output[1:]):
            return False  # e.g. MaxPool indices are read
        return _scale_producer(index, weights, producer.input[0], s)
    if op == "Conv":
        weight = index.constant(producer.input[1])
        if weight is None or weight.shape[0] != len(s):
            return False
        _write_scaled(weights, producer, 1, weight, s.reshape(-1, *([1] * (weight.ndim - 1))))
        _scale_vector(index, weights, producer, 2, s)
        return True
    if op == "ConvTranspose":
        weight = index.constant(producer.input[1])
        groups = get_attr(producer, "group", 1)
        if weight is None or weight.shape[1] * groups != len(s):
            return False
        per = s.reshape(groups, 1, weight.shape[1], *([1] * (weight.ndim - 2)))
        grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        weights.write(producer, 1, (grouped * per).reshape(weight.shape).astype(weight.dtype))
        _scale_vector(index, weights, producer, 2, s)
        return True
    if op == "Gemm":
        weight = index.constant(producer.input[1])
        trans_b = get_attr(producer, "transB", 0)
        if weight is None or get_attr(producer, "transA", 0) or weight.shape[0 if trans_b else 1] != len(s):
            return False
        bias = index.constant(producer.input[2]) if len(producer.input) > 2 and producer.input[2] else None
        if len(producer.input) > 2 and producer.input[2] and bias is None:
            return False
        _write_scaled(weights, producer, 1, weight, s[:, None] if trans_b else s[None, :])
        if bias is not None:
            full = np.broadcast_to(bias, np.broadcast_shapes(bias.shape, (len(s),)))
            _write_scaled(weights, producer, 2, full, s)
        return True
    if op in ("BatchNormalization", "InstanceNormalization"):
        if any(index.constant(name) is None for name in producer.input[1:3]):
            return False
        _scale_vector(index, weights, producer, 1, s)
        _scale_vector(index, weights, producer, 2, s)
        return True
    return False


def _scale_consumers(index: Graph, weights: WeightStore, y: str, s: np.ndarray) -> bool:
    uses = index.uses(y)
    if not uses or y in index.outputs:
        return False
    plans = []
    for use in uses:
        node, slot = use.node, use.slot
        weight = index.constant(node.input[1]) if len(node.input) > 1 else None
        if slot != 0 or weight is None:
            return False
        if node.op_type == "Conv":
            groups = get_attr(node, "group", 1)
            if weight.shape[1] * groups != len(s):
                return False
            per = weight.shape[1]
            factor = s.reshape(groups, 1, per, *([1] * (weight.ndim - 2)))
            plans.append((node, weight, lambda w, f=factor, g=groups: (w.reshape(g, w.shape[0] // g, *w.shape[1:]) * f).reshape(w.shape)))
        elif node.op_type == "Gemm" and not get_attr(node, "transA", 0):
            trans_b = get_attr(node, "transB", 0)
            if weight.shape[1 if trans_b else 0] != len(s):
                return False
            factor = s[None, :] if trans_b else s[:, None]
            plans.append((node, weight, lambda w, f=factor: w * f))
        elif node.op_type == "MatMul" and weight.ndim == 2 and weight.shape[0] == len(s) and len(index.shape(y) or ()) == 2:
            plans.append((node, weight, lambda w, f=s[:, None]: w * f))
        else:
            return False
    for node, weight, scale in plans:
        weights.write(node, 1, scale(weight.astype(np.float64)).astype(weight.dtype))
    return True


def _write_scaled(weights: WeightStore, node, slot: int, value: np.ndarray, factor: np.ndarray) -> None:
    weights.write(node, slot, (value.astype(np.float64) * factor).astype(value.dtype))


def _scale_vector(index: Graph, weights: WeightStore, node, slot: int, s: np.ndarray) -> None:
    if len(node.input) > slot and node.input[slot]:
        value = index.constant(node.input[slot])
        _write_scaled(weights, node, slot, value, s.reshape(value.shape) if value.size == len(s) else s)


def remove_identities(index: Graph) -> int:
    """Bypass every ``Identity`` whose output is not a graph output; returns how many went."""
    removed = set()
    for node in list(index.nodes):
        if node.op_type != "Identity" or node.output[0] in index.outputs or node.output[0] in index.subgraph_reads:
            continue
        source, target = node.input[0], node.output[0]
        for use in index.uses(target):
            use.node.input[use.slot] = source
        index.consumers.setdefault(source, []).extend(index.uses(target))
        index.consumers.pop(target, None)
        removed.add(target)
    if removed:
        survivors = [n for n in index.graph.node if not (n.op_type == "Identity" and n.output[0] in removed)]
        del index.graph.node[:]
        index.graph.node.extend(survivors)
        index.reindex()
    return len(removed)


def remove_dead_code(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nothing reads (and that are not graph outputs), then unread initializers.

    Returns the number of nodes removed.
    """
    graph = model.graph
    needed = {o.name for o in graph.output}
    # names read from inside control-flow bodies count as read
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for body in bodies:
                    for inner in iter_nodes_with_subgraphs(body):
                        needed.update(inner.input)
    keep = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output if name):
            keep.append(node)
            needed.update(name for name in node.input if name)
    removed = len(graph.node) - len(keep)
    if removed:
        keep.reverse()
        del graph.node[:]
        graph.node.extend(keep)
    unread = [t.name for t in graph.initializer if t.name not in needed]
    if unread:
        unread_set = set(unread)
        survivors = [t for t in graph.initializer if t.name not in unread_set]
        del graph.initializer[:]
        graph.initializer.extend(survivors)
        inputs = [i for i in graph.input if i.name not in unread_set]
        del graph.input[:]
        graph.input.extend(inputs)
    return removed


def sync_ir3_inputs(model: onnx.ModelProto, original_inputs: list[str]) -> None:
    """IR < 4: every initializer is also a graph input, with its current type and shape."""
    if model.ir_version >= 4:
        return
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    real = [i for i in graph.input if i.name not in initializers]
    order = {name: position for position, name in enumerate(original_inputs)}
    constant_inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    constant_inputs.sort(key=lambda v: order.get(v.name, len(order)))
    del graph.input[:]
    graph.input.extend(real + constant_inputs)


def refresh_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, tuple]:
    """Clear stale value_info and re-infer it from the graph inputs; returns the inferred shapes."""
    graph = model.graph
    del graph.value_info[:]
    inferred = infer_model(model, input_shapes)
    names = {n for node in graph.node for n in node.output}
    graph.value_info.extend(v for v in inferred.graph.value_info if v.name in names)
    return shapes_of(inferred)
