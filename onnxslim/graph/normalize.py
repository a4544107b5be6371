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

3. a dim that shape inference proves static is a constant too (:func:`fold_static_dims`): legacy
   TorchScript exports compute ``chunk`` bounds and ``view`` targets from ``Gather(Shape(x), k)`` with a
   *scalar* index, which onnxscript's folder (1-D indices only) leaves; once folded, the ``Slice`` and
   ``Reshape`` read constants as in dynamo exports, and the rules rewrite them when channels shrink.

First, :func:`inline_functions` replaces calls of model-local functions (``FunctionProto``: the legacy
exporter's ``export_modules_as_functions``, onnxscript-authored models) by their bodies with onnx's
inliner, so the convolutions inside a function are layers like any other (a call was a barrier);
functions that the rule set has a rule for stay calls, read by that rule.
Then :func:`alias_constant_identities` lets readers of ``Identity(initializer)`` read the
initializer itself, so that a shared weight stays one tensor.

A ``ConstantOfShape`` folds only when its result is small (at most ``_SMALL_FILL`` elements): legacy
TorchScript exports spell the ``pads`` of ``F.pad`` / ``nn.ZeroPad2d`` / ``nn.ReflectionPad2d`` as
``ConstantOfShape([4]) -> Concat -> Reshape -> Slice -> Transpose -> Reshape -> Cast``; once folded, the
Pad reads constant pads (onnxscript keeps every ``ConstantOfShape``, so that a large fill does not grow
the model).

Left alone: ``QuantizeLinear`` / ``DequantizeLinear`` (int8 weights stay int8; the QDQ rule reads them)
except in index arithmetic (:func:`index_only_quantizers`: a static quantizer quantizes every float
tensor, including TF "same" pads computed in float and a Pad's fill value, whose Q/DQ then feed only
``Cast`` / ``Concat`` / ... into parameter inputs such as a Pad's ``pads``; those fold like the float
graph's) and the QuantizeLinear of a QOperator layer's constant weight (:func:`weight_quantizers`),
larger ``ConstantOfShape`` fills, random generators, control flow, and results much larger than the constants they
replace — except where the results only compute a layer's weights (:func:`weight_only_nodes`: timm's
``StdConv2d`` in BiT and NFNet standardises each filter at run time, ``Sub`` / ``Mul`` / ``ReduceMean`` /
``BatchNormalization`` on the weight, whose intermediate results are as large as the weight; once folded
the Conv reads a constant weight again). The model's semantics, opset and IR version do not change; exported ``value_info`` is not used
(it is recomputed after slimming).

Memory: the folder runs on an onnx-ir view of the working model whose tensors wrap the existing
TensorProtos (placeholders wrap the input's tensor that holds the data), so no weight is copied; only the
node list and the *new* initializers are written back into the ModelProto.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import numpy as np
import onnx
import onnx.inliner
import onnx.numpy_helper
import onnx.reference.ops
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveInitializersFromInputsPass
from onnxscript.optimizer import fold_constants

# results may be at most this many elements larger than the single-use constants they replace
_GROWTH_LIMIT = 1 << 20
# weights computed from constants (Cast of fp16 weights, Transpose of a MatMul weight) of any size fold
_INPUT_LIMIT = 1 << 40
_MAX_PASSES = 64  # folding passes while something folds (a multi-output or Q/DQ fold makes more nodes all-constant)
_KEPT = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: a ConstantOfShape with at most this many elements is folded (index arithmetic such as legacy pads)
_SMALL_FILL = 4096


def inline_functions(model: onnx.ModelProto, keep: Iterable[tuple[str, str]] = ()) -> int:
    """Inline in place every call of a model-local function except those whose ``(domain, name)`` is in
    ``keep`` (the ops a rule set has a rule for: the rule reads the call); returns the number inlined.

    Uses ``onnx.inliner.inline_selected_functions``. When the inliner fails (a function whose opset differs
    from the model's would need a version conversion), nothing is inlined: the calls stay barriers, which
    is safe. Initializers and opset imports are kept; the kept functions stay in ``model.functions``.
    """
    kept = {(domain or "", name) for domain, name in keep}
    excluded = [(f.domain, f.name) for f in model.functions if (f.domain or "", f.name) in kept]
    count = len(model.functions) - len(excluded)
    if not count:
        return 0
    try:
        inlined = onnx.inliner.inline_selected_functions(model, excluded, exclude=True)
    except Exception:  # noqa: BLE001 -- any failure of the inliner leaves the calls as barriers
        return 0
    model.graph.CopyFrom(inlined.graph)
    del model.functions[:]
    model.functions.extend(inlined.functions)
    return count


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
        for _ in range(_MAX_PASSES):
            changed = fold_constants(view, onnx_shape_inference=False, input_size_limit=_INPUT_LIMIT,
                                     output_size_limit=_GROWTH_LIMIT, should_fold=_should_fold).modified
            multi_output = [node for node in graph if len(node.outputs) > 1 and _should_fold(node) is not False]
            changed |= _fold_by_reference(view, multi_output)
            # every Q/DQ is kept from onnxscript's folder (weights stay int8); those of index arithmetic fold
            changed |= _fold_by_reference(view, index_only_quantizers(graph))
            changed |= _fold_by_reference(view, weight_quantizers(graph))
            # a weight computed from weights (weight standardization) folds whatever its size
            changed |= _fold_by_reference(view, weight_only_nodes(graph))
            modified |= changed
            if not changed:
                break
    # the folder writes a folded Shape as Constant(value_ints), an attribute from Constant-12 on: lifted
    # to an initializer, it stays valid in opset 9-11 models (BlazePose, torch 1.6 at opset 10)
    modified |= LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(view).modified
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


#: inputs that are parameters of an op, not data (ONNX operator specs: a Pad's pads / constant_value / axes,
#: a Reshape's shape, a Slice's starts / ends / axes / steps, a Resize's roi / scales / sizes ...)
_PARAMETER_INPUTS = {"Pad": {1, 2, 3}, "Reshape": {1}, "Slice": {1, 2, 3, 4}, "Resize": {1, 2, 3},
                     "Upsample": {1}, "Expand": {1}, "Tile": {1}, "ConstantOfShape": {0}, "Squeeze": {1},
                     "Unsqueeze": {1}, "Range": {0, 1, 2}, "Split": {1}, "TopK": {1}, "OneHot": {1},
                     "CumSum": {1}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1}}
#: ops through which index arithmetic flows (every input of theirs may carry it)
_INDEX_ARITHMETIC = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast", "Concat", "Reshape", "Slice",
                               "Transpose", "Gather", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand",
                               "Tile", "Split", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Ceil",
                               "Floor", "Round", "Max", "Min", "Clip", "Relu", "Sqrt", "Pow", "Reciprocal",
                               "Sign", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not",
                               "And", "Or", "Where"})


def index_only_quantizers(graph: ir.Graph) -> list[ir.Node]:
    """The Q/DQ nodes of ``graph`` whose outputs reach only parameter inputs (``_PARAMETER_INPUTS``),
    through index arithmetic (``_INDEX_ARITHMETIC``) and never a graph output: folding them changes no
    layer's data or weights (those reach a Conv's or MatMul's data input and stay quantized)."""
    memo: dict[ir.Value, bool] = {}

    def index_only(value: ir.Value) -> bool:
        if value not in memo:
            memo[value] = False  # a cycle (never in a valid graph) counts as data
            uses = list(value.uses())
            memo[value] = not value.is_graph_output() and all(  # an unused (dead) value changes nothing
                slot in _PARAMETER_INPUTS.get(use.op_type, ()) or
                (use.op_type in _INDEX_ARITHMETIC and all(index_only(out) for out in use.outputs))
                for use, slot in uses)
        return memo[value]

    return [node for node in graph if node.op_type in ("QuantizeLinear", "DequantizeLinear")
            and node.domain in ("", "ai.onnx") and all(index_only(out) for out in node.outputs)]


#: the integer weight and bias inputs of QOperator layers (ONNX QLinearConv / QLinearMatMul, com.microsoft
#: QGemm) and the operands of QLinearAdd / QLinearMul (a constant one: HardSwish's ``x + 3``)
_QUANTIZED_WEIGHT_INPUTS = {"QLinearConv": {3, 8}, "QLinearMatMul": {3}, "QGemm": {3, 6}, "QLinearAdd": {0, 3},
                            "QLinearMul": {0, 3}}


def weight_quantizers(graph: ir.Graph) -> list[ir.Node]:
    """The QuantizeLinear nodes of ``graph`` whose outputs reach only the integer weights of QOperator
    layers (or the operands of QLinearAdd / QLinearMul): onnxruntime's quantizer quantizes a weight it
    cannot read as an initializer (a ``Constant`` node, as Paddle2ONNX writes them) at run time; folded
    (ONNX QuantizeLinear, which onnxruntime's constant folding computes too) when its inputs are
    constants, the layer reads int8 data, which its rule slices."""
    def weight_only(value: ir.Value) -> bool:
        uses = list(value.uses())
        return bool(uses) and not value.is_graph_output() and all(
            slot in _QUANTIZED_WEIGHT_INPUTS.get(use.op_type, ()) for use, slot in uses)

    return [node for node in graph if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx")
            and all(weight_only(out) for out in node.outputs)]


#: inputs that hold a layer's weights or per-channel parameters (ONNX operator specs)
_WEIGHT_INPUTS = {"Conv": {1, 2}, "ConvTranspose": {1, 2}, "Gemm": {1, 2}, "BatchNormalization": {1, 2, 3, 4},
                  "InstanceNormalization": {1, 2}, "LayerNormalization": {1, 2}, "GroupNormalization": {1, 2},
                  "PRelu": {1}}


def weight_only_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The nodes of ``graph`` (default domain, not Q/DQ) whose outputs reach only weight inputs
    (``_WEIGHT_INPUTS``), directly or through other such nodes, never a graph output. Folding one
    replaces data that only ever becomes a weight, so the folded model is no larger than the weights it
    ends in (the intermediate results die once the chain is folded)."""
    def foldable(node: ir.Node) -> bool:
        return node.domain in ("", "ai.onnx") and node.op_type not in _KEPT and not any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())

    # consumers come after producers in a valid graph: in reverse order a value's readers are decided
    # before it (a loop, not recursion: exported chains are thousands of nodes deep)
    weight_only: dict[ir.Value, bool] = {}
    for node in reversed(list(graph)):
        for value in node.outputs:
            uses = list(value.uses())
            weight_only[value] = bool(uses) and not value.is_graph_output() and all(
                (use.domain in ("", "ai.onnx") and slot in _WEIGHT_INPUTS.get(use.op_type, ())) or
                (foldable(use) and all(weight_only.get(out, False) for out in use.outputs))
                for use, slot in uses)
    return [node for node in graph if foldable(node) and node.outputs and all(weight_only[o] for o in node.outputs)]


def _should_fold(node: ir.Node) -> bool | None:
    """False for the ops kept as they are; True for a small ``ConstantOfShape`` of a constant shape
    (which the folder would keep); None lets the folder apply its own limits."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in _KEPT:
        return False
    if node.op_type == "ConstantOfShape":
        shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
        return shape is not None and 0 <= int(np.prod(shape.numpy(), dtype=np.int64)) <= _SMALL_FILL
    return None


def _fold_by_reference(view: ir.Model, nodes: Iterable[ir.Node]) -> bool:
    """Evaluate those of ``nodes`` whose inputs are all constant with onnx's reference op of the model's
    opset and replace their outputs by initializers; returns whether any was folded. For what
    onnxscript's folder leaves: nodes with several outputs (``Split`` of a constant: legacy exports of
    ``for s in buffer``) and the Q/DQ of index arithmetic."""
    graph, version = view.graph, view.opset_imports.get("", 1)
    changed = False
    for node in list(nodes):
        if node.domain not in ("", "ai.onnx"):
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
            folded = ir.Value(name=output.name, const_value=ir.tensor(np.asarray(result), name=output.name))
            graph.register_initializer(folded)
            output.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        changed = True
    return changed


def _evaluate(node: ir.Node, version: int, inputs: list) -> list:
    attributes = {name: ir.serde.serialize_tensor(a.value) if a.type == ir.AttributeType.TENSOR else a.value
                  for name, a in node.attributes.items()}
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        # onnx's reference has no Q/DQ before opset 19; versions 19+ only add types (float8, int4) and
        # attributes whose defaults keep the earlier semantics (ONNX operator changelog)
        version = max(version, 19)
    operator = onnx.reference.ops.load_op("", node.op_type, version)
    results = operator.eval(*inputs, n_outputs=len(node.outputs), **attributes)
    return list(results) if isinstance(results, (tuple, list)) else [results]  # one output: not a tuple


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


def fold_static_dims(model: onnx.ModelProto) -> int:
    """Spell shape arithmetic whose value is known as constants, in place; returns the count of rewrites.

    * ``Shape(x)`` and ``Gather(Shape(x), k)`` (axis 0, constant ``k``) become initializers when shape
      inference gives the dims they return as numbers (ONNX ``Shape-15`` returns ``x.shape[start:end]``; a
      static dim has that value in every run of this model); a symbolic dim (a dynamic batch) keeps its node.
    * a ``Reshape`` target, ``Slice`` bounds or an ``Expand`` shape computed from shapes
      (:func:`onnxslim.graph.shape_values.shape_value`; ``torch.chunk`` bounds, ``expand_as``) become
      constants: static dims as numbers, an Expand's batch as 1 (broadcast to the input's own batch), and a
      Reshape's batch of the reshaped tensor as ``0``, which ONNX
      ``Reshape`` (``allowzero=0``) copies from the input's dim. That is TorchScript's
      ``x.view(x.size(0), C // g, ...)`` with a dynamic batch; onnx's shape inference, which stops at the
      computed target, then reaches the nodes below, and the rules rewrite the constant when channels shrink.

    One call rewrites what the current shapes allow; callers repeat it (a legacy ShuffleNet block's shapes
    follow from the previous block's). Shape-inference failures leave the model unchanged.
    """
    from onnxslim.errors import OnnxSlimError
    from onnxslim.graph.model import Graph
    from onnxslim.graph.shapes import infer_model, shapes_of, symbols_of

    try:
        inferred = infer_model(model)
    except OnnxSlimError:
        return 0
    index = Graph(model, shapes_of(inferred), None, symbols_of(inferred))
    shapes = [(node, value) for node in index.nodes
              if node.output[0] not in index.outputs and (value := _static_shape(node, index)) is not None]
    targets = [(node, slot, value) for node in index.nodes for slot, value in _constant_targets(node, index)]
    for node, value in shapes:
        model.graph.node.remove(node)
        _add_initializer(model, node.output[0], value)
    taken: set[str] = set()
    for node, slot, value in targets:
        name, k = index.fresh_name(f"{node.input[slot]}_static"), 0
        while name in taken:  # two nodes may read one computed shape
            k += 1
            name = index.fresh_name(f"{node.input[slot]}_static{k}")
        taken.add(name)
        _add_initializer(model, name, value)
        node.input[slot] = name
    return len(shapes) + len(targets)


def _static_shape(node, index) -> np.ndarray | None:
    """The value of ``Shape(x)`` or ``Gather(Shape(x), k)`` when the dims it gives are static, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Shape", "Gather"):
        return None
    if node.op_type == "Shape":
        dims = _shape_dims(node, index)
        static = dims is not None and all(isinstance(d, int) and d >= 0 for d in dims)
        return np.asarray(dims, np.int64) if static else None
    source = index.producer.get(node.input[0])
    k = index.constant(node.input[1]) if len(node.input) > 1 else None
    if k is None or k.dtype.kind not in "iu" or any(a.name == "axis" and a.i != 0 for a in node.attribute):
        return None
    dims = _shape_dims(source, index) if source is not None and source.op_type == "Shape" else None
    if not dims:
        return None
    picked = [dims[int(i)] if -len(dims) <= int(i) < len(dims) else None for i in k.reshape(-1)]
    if any(not isinstance(d, int) or d < 0 for d in picked):
        return None
    return np.asarray(picked, np.int64).reshape(k.shape)


def _shape_dims(shape_node, index) -> list | None:
    """The dims a ``Shape`` node returns (``start``/``end`` of Shape-15 applied), None when unknown."""
    shape = index.shape(shape_node.input[0])
    if shape is None:
        return None
    attributes = {a.name: a.i for a in shape_node.attribute}
    return list(shape)[attributes.get("start", 0):attributes.get("end")]


_SHAPE_SLOTS = {"Reshape": (1,), "Slice": (1, 2, 3, 4), "Expand": (1,)}  # inputs that are shapes or bounds


def _constant_targets(node, index) -> list[tuple[int, np.ndarray]]:
    """(slot, constant) for each computed shape input of a Reshape (target), Slice (bounds) or Expand
    (shape) whose value is known: static dims as numbers, the batch of the node's own input as a number
    that means "the input's dim" (:func:`_batch_entry`); empty when none."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _SHAPE_SLOTS:
        return []
    if node.op_type == "Reshape" and any(a.name == "allowzero" and a.i for a in node.attribute):
        return []
    found = []
    for slot in _SHAPE_SLOTS[node.op_type]:
        if slot < len(node.input) and node.input[slot] and index.constant(node.input[slot]) is None:
            value = _known_entries(node, slot, index)
            if value is not None:
                found.append((slot, value))
    return found


def _known_entries(node, slot: int, index) -> np.ndarray | None:
    from onnxslim.graph.shape_values import UNKNOWN, Dim, shape_value

    value = shape_value(index, node.input[slot])
    if value is None or UNKNOWN in value:  # a -1 for it could not be told from an empty batch's 0
        return None
    entries = []
    for position, entry in enumerate(value):
        if isinstance(entry, Dim) and entry.static is not None:
            entry = entry.static
        elif isinstance(entry, Dim):
            entry = _batch_entry(node, index, entry, position, len(value))
            if entry is None:
                return None
        entries.append(int(entry))
    return np.asarray(entries, np.int64)


def _batch_entry(node, index, entry, position: int, length: int) -> int | None:
    """The constant that stands for a dynamic batch ``entry`` (axis 0 of a tensor with the same run-time
    batch as the node's input): ``Reshape`` copies a 0 from the input's dim (``allowzero=0``); ``Expand``
    broadcasts a 1 to the input's dim (numpy rules), and the input's batch is that same dim. None otherwise."""
    from onnxslim.graph.shape_values import same_batch

    if entry.axis != 0 or not same_batch(index, entry.tensor, node.input[0]):
        return None
    if node.op_type == "Reshape" and position == 0:
        return 0
    rank = len(index.shape(node.input[0]) or ())
    if node.op_type == "Expand" and rank and position - (length - rank) == 0:
        return 1
    return None


def _add_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    if model.ir_version < 4:  # IR 3 lists every initializer as an input
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, value.shape))
