"""Passes that run after the rewrite, one per function, each stating its rule.

* :func:`fold_channel_scales` — a per-channel ``Mul`` by constant ``s`` (a mask whose zeros are gone)
  disappears into neighbouring weights.
* :func:`remove_identities` — ``Identity`` nodes are bypassed (Dropout in inference, dropped operands).
* :func:`remove_dead_code` — nodes no output depends on, and initializers nothing reads, are dropped.
* :func:`share_equal_constants` — a constant that normalisation folded into several equal copies (a
  bias through two ``Reshape`` nodes) is stored once, as the input stored it.
* :func:`refresh_shapes` — stale ``value_info`` is cleared and shapes re-inferred.
* :func:`sync_initializer_inputs` — initializers stop being graph inputs (IR >= 4; below IR 4 they keep
  their declarations, with their sliced shapes).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim.graph.analysis import RuleLookup
from onnxslim.graph.model import Graph, WeightStore, iter_nodes_with_subgraphs
from onnxslim.graph.plan import RemovalPlan
from onnxslim.graph.shapes import infer_model, shapes_of


def fold_channel_scales(index: Graph, plan: RemovalPlan) -> tuple[int, list[str]]:
    """Fold ``y = x * s`` (s constant, varying only along the channel axis) into weights.

    Into the producer of ``x`` when ``x`` feeds only this Mul (its rule's ``fold_output_scale``: Conv,
    ConvTranspose, Gemm ``W[o] *= s[o], b[o] *= s[o]``; BatchNormalization, InstanceNormalization
    ``scale *= s, B *= s``) — for a positive ``s`` also through ops whose rule says
    ``commutes_with_positive_scale`` (Relu, LeakyRelu, PRelu, pooling: ``f(s x) = s f(x)``); else into
    every consumer of ``y`` when each one's rule gives a ``scaled_input_weight`` (Conv, Gemm, MatMul
    reading it as their feature input: ``W[:, i] *= s[i]``; exact with zero padding since
    ``pad(s x) = s pad(x)``); never into a quantized weight (see :func:`_reads_quantized`). A scale of
    all ones is simply bypassed. The rules are those of the plan's
    analysis. Passes repeat while one folds something: a Mul whose consumer was a Mul folded in the
    same pass (LDC's ``0.5 * (a + b)`` before a mask that prune put in front of a conv) folds in the
    next, so a second ``slim`` finds nothing left. Returns (number of Mul nodes removed, names of
    per-channel Mul nodes kept, number of folds after which ``x``'s other readers and ``y``'s read one tensor:
    a structure the analysis did not see, where another slim pass may find more).
    """
    total = joined = 0
    while True:
        folded, kept, shared = _fold_pass(index, plan)
        total, joined = total + folded, joined + shared
        if not folded:
            return total, kept, joined


def _fold_pass(index: Graph, plan: RemovalPlan) -> tuple[int, list[str], int]:
    """One pass of :func:`fold_channel_scales` over the nodes in graph order."""
    rules = plan.analysis.rules
    weights = WeightStore(index)
    folded, kept, removed, joined = 0, [], set(), 0
    foldable = _folds_that_keep_sharing(index, plan)
    for node in list(index.nodes):
        scale = _channel_scale(node, index, plan)
        if scale is None:
            continue
        factors, constant_slot = scale
        x, y = node.input[1 - constant_slot], node.output[0]
        if y in index.outputs and (x in index.outputs or len(index.uses(x)) != 1 or x not in index.producer):
            kept.append(index.node_name(node))  # the graph output name must survive
            continue
        if id(node) not in foldable:
            kept.append(index.node_name(node))  # folding would split a shared weight (a larger model)
            continue
        if np.all(factors == 1) or _scale_producer(index, rules, weights, x, factors) \
                or _scale_consumers(index, rules, weights, y, factors):
            joined += len(index.uses(x)) > 1  # before the bypass: readers other than this Mul
            _bypass(index, node, x, y)
            removed.add(id(node))
            folded += 1
        else:
            kept.append(index.node_name(node))
    _drop_nodes(index, removed)
    return folded, kept, joined


class _RecordingStore(WeightStore):
    """A WeightStore that only records the writes a fold would make: (initializer, node, key)."""

    def __init__(self, index: Graph):
        super().__init__(index)
        self.writes: list[tuple[str, int, object]] = []

    def write(self, node, slot, value, key=None) -> None:
        self.writes.append((node.input[slot], id(node), key))


def _folds_that_keep_sharing(index: Graph, plan: RemovalPlan) -> set[int]:
    """ids of the scale Muls whose fold does not make the model larger.

    A fold writes scaled copies of weights; an initializer read by several nodes (a head shared by the
    levels of an FPN) stays one tensor only when *every* reader gets the same scaled value — each level's
    mask folds with the same factors. A dry run records every fold's writes; a fold that would split
    shared initializers by more elements than the Mul's own constant frees is dropped (an exporter that
    merged equal biases of two layers still lets a mask fold: the copy replaces the mask), until the
    remaining folds agree; a weight that is also a graph output is never replaced, so a fold into it is a
    copy too. The model never grows."""
    rules = plan.analysis.rules
    writes: dict[int, tuple[list[tuple[str, int, object]], int]] = {}
    for node in index.nodes:
        scale = _channel_scale(node, index, plan)
        if scale is None:
            continue
        factors, constant_slot = scale
        store = _RecordingStore(index)
        x, y, constant = node.input[1 - constant_slot], node.output[0], node.input[constant_slot]
        if not np.all(factors == 1) and not _scale_producer(index, rules, store, x, factors):
            _scale_consumers(index, rules, store, y, factors)
        freed = _elements(index, constant) if len(index.uses(constant)) == 1 else 0
        writes[id(node)] = (store.writes, freed)
    changed = True
    while changed:
        changed = False
        written: dict[tuple[str, object], set[int]] = {}
        for entries, _ in writes.values():
            for name, reader, key in entries:
                written.setdefault((name, key), set()).add(reader)
        for mul, (entries, freed) in list(writes.items()):
            split = sum(_elements(index, name) for name, _, key in entries  # a graph output is a reader too
                        if name in index.outputs or {id(u.node) for u in index.uses(name)} - written[(name, key)])
            if split > freed:
                del writes[mul]
                changed = True
    return set(writes)


def _elements(index: Graph, name: str) -> int:
    return int(np.prod(index.shape(name) or (), dtype=np.int64))


def _drop_nodes(index: Graph, doomed: set[int]) -> None:
    """Remove the nodes whose ``id()`` is in ``doomed`` from the graph and reindex."""
    if doomed:
        survivors = [n for n in index.graph.node if id(n) not in doomed]
        del index.graph.node[:]
        index.graph.node.extend(survivors)
        index.reindex()


def _channel_scale(node, index: Graph, plan: RemovalPlan):
    """(factors, constant slot) when ``node`` is ``Mul(feature, c)`` with ``c`` per channel on axis 1
    (a mask) or a single number (a structure mask: one scale for the whole tensor)."""
    if not plan.analysis.rule_for(node).multiplies(node):
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


def _scale_producer(index: Graph, rules: RuleLookup, weights: WeightStore, x: str, s: np.ndarray) -> bool:
    producer = index.producer.get(x)
    if producer is None or x in index.outputs or len(index.uses(x)) != 1 or producer.output[0] != x:
        return False
    rule = rules.rule_for(producer)
    if rule.commutes_with_positive_scale(producer) and np.all(s > 0):
        if any(name and (index.uses(name) or name in index.outputs) for name in producer.output[1:]):
            return False  # e.g. MaxPool indices are read
        return _scale_producer(index, rules, weights, producer.input[0], s)
    if _reads_quantized(index, producer):
        return False
    return rule.fold_output_scale(producer, index, weights, s)


def _reads_quantized(index: Graph, node) -> bool:
    """``node`` reads a quantized or fake-quantized constant: a scaled copy would no longer be a selection
    of its int8 values and would be stored dequantized (float), which undoes the quantization of that
    layer (onnxruntime's QDQ fusion, TensorRT's int8 kernels); the scale stays a Mul instead."""
    return any(name in index.quantized for name in node.input)


def _scale_consumers(index: Graph, rules: RuleLookup, weights: WeightStore, y: str, s: np.ndarray) -> bool:
    uses = index.uses(y)
    if not uses or y in index.outputs:
        return False
    plans = []
    for use in uses:
        scaled = None if _reads_quantized(index, use.node) else \
            rules.rule_for(use.node).scaled_input_weight(use.node, use.slot, index, s)
        if scaled is None:
            return False
        plans.append((use.node, scaled))
    for node, scaled in plans:
        weights.write(node, 1, scaled.astype(index.constant(node.input[1]).dtype),
                      key=("scaled input", node.op_type, s.tobytes()))
    return True


def remove_identities(index: Graph, rules: RuleLookup) -> int:
    """Bypass every node whose rule says ``is_identity`` (``Identity``) and whose output is not a graph
    output; returns how many went."""
    removed = set()
    for node in list(index.nodes):
        if not rules.rule_for(node).is_identity(node) or node.output[0] in index.outputs \
                or node.output[0] in index.subgraph_reads:
            continue
        source, target = node.input[0], node.output[0]
        for use in index.uses(target):
            use.node.input[use.slot] = source
        index.consumers.setdefault(source, []).extend(index.uses(target))
        index.consumers.pop(target, None)
        removed.add(id(node))
    _drop_nodes(index, removed)
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


def share_equal_constants(model: onnx.ModelProto, original: set[str]) -> int:
    """Drop every initializer created by normalisation (its name is not in ``original``, the input's
    initializers) that equals another one (element type, dims and values); its readers, inside
    control-flow bodies too, read that one. Graph inputs and outputs and external data are left alone.
    Returns how many initializers went."""
    graph = model.graph
    fixed = {value.name for value in [*graph.input, *graph.output]}
    candidates = [t for t in graph.initializer if t.name not in original and t.name not in fixed
                  and t.data_location != onnx.TensorProto.EXTERNAL]
    signatures = {(t.data_type, tuple(t.dims)) for t in candidates}
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    ordered = sorted(graph.initializer, key=lambda t: t.name not in original)  # the input's own names first
    for tensor in ordered:
        signature = (tensor.data_type, tuple(tensor.dims))
        if signature not in signatures or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        key = (*signature, numpy_helper.to_array(tensor).tobytes())
        if key in first and tensor.name not in original and tensor.name not in fixed:
            alias[tensor.name] = first[key]
        else:
            first.setdefault(key, tensor.name)
    if not alias:
        return 0
    for node in iter_nodes_with_subgraphs(graph):
        for slot, name in enumerate(node.input):
            if name in alias:
                node.input[slot] = alias[name]
    survivors = [t for t in graph.initializer if t.name not in alias]
    del graph.initializer[:]
    graph.initializer.extend(survivors)
    return len(alias)


def sync_initializer_inputs(model: onnx.ModelProto, original_inputs: list[str]) -> int:
    """Initializers stop being graph inputs where the IR allows it; returns how many were dropped.

    IR < 4 requires every initializer to be a graph input: they stay declared, in their original order,
    with their sliced shapes. At IR >= 4 an exporter may still list them
    (``keep_initializers_as_inputs=True``, PyTorch 1.x, older converters and zoo models), which makes them
    defaults a caller could override; onnxruntime then does not treat them as constants, so it skips
    constant folding and fusions such as Conv+BatchNormalization (a legacy face detector ran 2.4x faster
    with only this change, docs/latency.md). A slimmed weight has another shape, so overriding it with the
    original's value could not work anyway: they are dropped from the inputs (what
    ``onnxruntime.tools.remove_initializer_from_input`` does; not imported, since ``onnxruntime.tools``
    imports torch, seconds on every slim).
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    if model.ir_version >= 4:
        real = [value for value in graph.input if value.name not in initializers]
        listed = len(graph.input) - len(real)
        del graph.input[:]
        graph.input.extend(real)
        return listed
    real = [i for i in graph.input if i.name not in initializers]
    order = {name: position for position, name in enumerate(original_inputs)}
    constant_inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    constant_inputs.sort(key=lambda v: order.get(v.name, len(order)))
    del graph.input[:]
    graph.input.extend(real + constant_inputs)
    return 0


def refresh_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, tuple]:
    """Clear stale value_info and re-infer it from the graph inputs; returns the inferred shapes."""
    graph = model.graph
    del graph.value_info[:]
    inferred = infer_model(model, input_shapes)
    names = {n for node in graph.node for n in node.output}
    graph.value_info.extend(v for v in inferred.graph.value_info if v.name in names)
    return shapes_of(inferred)
