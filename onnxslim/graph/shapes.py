"""Static shapes for every tensor, inferred on a weight-free skeleton of the model.

ONNX shape inference only needs the *dims* of large weights, not their bytes, so the skeleton replaces
every initializer above a small size by a graph input of the same type and shape (small ones, such as
Reshape targets, Slice bounds or Resize scales, stay as data so that data propagation can use them).
That keeps inference fast and memory-flat on 100 MB models.

Exported ``value_info`` is never trusted: after channels shrink it is stale, so the skeleton drops it
and the result is recomputed from the graph inputs (optionally overridden by the user's shapes).
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

from onnxslim.errors import OnnxSlimError
from onnxslim.graph.contrib_shapes import with_proxies

_SMALL = 4096  # elements; constants up to this size keep their data for data propagation


def skeleton(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` without large weights' data and without value_info, for inference and checking."""
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name in initializer_names:
            continue
        value = _with_shape(value, input_shapes.get(value.name)) if input_shapes and value.name in input_shapes else value
        inputs.append(_named_dynamic_dims(value))
    if input_shapes:
        unknown = set(input_shapes) - {i.name for i in inputs}
        if unknown:
            names = ", ".join(i.name for i in inputs)
            raise OnnxSlimError(f"--input-shape names unknown input(s) {sorted(unknown)}; the model's inputs are: {names}")
    small = []
    for tensor in graph.initializer:
        size = 1
        for dim in tensor.dims:
            size *= dim
        if size <= _SMALL and tensor.data_location != onnx.TensorProto.EXTERNAL:
            small.append(tensor)
        else:
            inputs.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    if model.ir_version < 4:
        # IR 3 requires every initializer to be a graph input as well
        inputs.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in small)
    outputs = list(graph.output)  # their channels are never deleted, so their shapes stay valid
    skel_graph = helper.make_graph(list(graph.node), graph.name or "main", inputs, outputs, initializer=small)
    skel = helper.make_model(skel_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    skel.functions.extend(model.functions)
    return skel


def infer_model(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """The weight-free skeleton of ``model`` with inferred value_info."""
    skel = with_proxies(skeleton(model, input_shapes))  # com.microsoft quantized ops: their shapes too
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
        for _ in range(16):  # each round can reach one more shape-preserving op further down
            found = _same_shape_outputs(inferred) + _batch_through_reshapes(inferred) + _reshapes_to_shape_of(inferred)
            if not found:
                break
            named = {value.name for value in found}
            kept = [value for value in skel.graph.value_info if value.name not in named]
            del skel.graph.value_info[:]
            skel.graph.value_info.extend(kept + found)
            inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
        return inferred
    except Exception as exc:  # onnx raises several types; the message is what matters to the user
        raise OnnxSlimError(f"shape inference failed: {str(exc).splitlines()[0]}") from None


# ops whose output 0 has the shape and type of input 0, which onnx's inference does not always say
# (GroupNormalization-18/21 are functions that onnx 1.23 infers nothing for)
_SAME_SHAPE_OPS = {"GroupNormalization", "LRN", "MeanVarianceNormalization", "InstanceNormalization"}


def _same_shape_outputs(inferred: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """value_info for the outputs of shape-preserving ops that inference left without a shape."""
    graph = inferred.graph
    known = {v.name: v for v in list(graph.input) + list(graph.value_info) + list(graph.output)
             if value_shape(v) is not None}
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if node.op_type in _SAME_SHAPE_OPS and node.domain in ("", "ai.onnx") and node.input[0] in known \
                and node.output[0] not in known and node.output[0] not in outputs:
            value = onnx.ValueInfoProto()
            value.CopyFrom(known[node.input[0]])
            value.name = node.output[0]
            found.append(value)
    return found


def _reshapes_to_shape_of(inferred: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """value_info for ``Reshape(x, Shape(t))`` (back to another tensor's shape: the tail of a decomposed
    GroupNorm, ``x.view(N, G, -1) ... .view(t.shape)``) when onnx's inference left it without a shape:
    the output has ``t``'s shape (ONNX Reshape-14; skipped when a dim of ``t`` is 0, which Reshape would
    copy from ``x``) and ``x``'s element type."""
    graph = inferred.graph
    known = {v.name: v for v in list(graph.input) + list(graph.value_info) + list(graph.output)
             if value_shape(v) is not None}
    full_shape_of = {node.output[0]: node.input[0] for node in graph.node
                     if node.op_type == "Shape" and node.domain in ("", "ai.onnx")
                     and not any(a.name in ("start", "end") for a in node.attribute)}
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or node.output[0] in known \
                or node.output[0] in outputs or node.input[0] not in known:
            continue
        target = known.get(full_shape_of.get(node.input[1], ""))
        if target is None or 0 in value_shape(target):
            continue
        value = onnx.ValueInfoProto()
        value.CopyFrom(target)
        value.name = node.output[0]
        value.type.tensor_type.elem_type = known[node.input[0]].type.tensor_type.elem_type
        found.append(value)
    return found


def _batch_through_reshapes(inferred: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """value_info giving a Reshape's output the batch symbol of its input when the target is a constant
    ``[-1, d1, ...]`` whose other dims hold exactly the input's non-batch elements (static): the ``-1`` is
    then the batch (ONNX Reshape-14), but onnx's inference names it with a fresh symbol (``unk__0``), so
    that ``x.view(-1, C)`` seemed to change the batch and two tensors of one batch looked unrelated."""
    graph = inferred.graph
    values = {v.name: v for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    constants = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or node.input[1] not in constants:
            continue
        source, result = values.get(node.input[0]), values.get(node.output[0])
        if source is None or result is None or node.output[0] in outputs:
            continue
        target = onnx.numpy_helper.to_array(constants[node.input[1]]).reshape(-1).tolist()
        dims_in = source.type.tensor_type.shape.dim
        dims_out = result.type.tensor_type.shape.dim
        if not target or target[0] != -1 or len(dims_out) != len(target) or not dims_in or not dims_in[0].dim_param:
            continue
        rest_in = [d.dim_value if d.HasField("dim_value") else 0 for d in dims_in[1:]]
        rest = target[1:]
        if 0 in rest_in or any(v <= 0 for v in rest) or math.prod(rest) != math.prod(rest_in):
            continue
        if dims_out[0].dim_param == dims_in[0].dim_param:
            continue
        value = onnx.ValueInfoProto()
        value.CopyFrom(result)
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_param = dims_in[0].dim_param
        found.append(value)
    return found


def shapes_of(inferred: onnx.ModelProto) -> dict[str, tuple]:
    """Shapes of all tensors of an inferred graph; unknown dims are None, unknown shapes absent."""
    shapes: dict[str, tuple] = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        shape = value_shape(value)
        if shape is not None:
            shapes[value.name] = shape
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, tuple]:
    """Shapes of all tensors of the main graph; unknown dims are None, unknown shapes absent."""
    return shapes_of(infer_model(model, input_shapes))


def symbols_of(inferred: onnx.ModelProto) -> dict[str, tuple]:
    """Per tensor of an inferred graph, the symbolic name (``dim_param``) of each dim, None where it has none.

    Shape inference carries an input's symbol through the graph (``batch`` stays ``batch``), so two
    unknown dims with the same symbol are equal at run time.
    """
    graph = inferred.graph
    symbols: dict[str, tuple] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            symbols[value.name] = tuple(d.dim_param or None for d in value.type.tensor_type.shape.dim)
    return symbols


def value_shape(value: onnx.ValueInfoProto) -> tuple | None:
    """Static dims of a declared or inferred shape; None per unknown dim (a symbol, no value, or the -1
    that Paddle2ONNX writes for a dynamic dim)."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                 for d in value.type.tensor_type.shape.dim)


def _named_dynamic_dims(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """``value`` with a symbol on every unknown dim (``-1`` or nameless), so that inference can tell which
    unknown dims are equal."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return value
    dims = value.type.tensor_type.shape.dim
    if all(d.dim_param or (d.HasField("dim_value") and d.dim_value >= 0) for d in dims):
        return value
    named = onnx.ValueInfoProto()
    named.CopyFrom(value)
    for axis, dim in enumerate(named.type.tensor_type.shape.dim):
        if not dim.dim_param and not (dim.HasField("dim_value") and dim.dim_value >= 0):
            dim.dim_param = f"{value.name}__dim{axis}"  # setting dim_param clears dim_value (a oneof)
    return named


def input_signature(model: onnx.ModelProto) -> dict[str, tuple]:
    """Declared shapes of the real graph inputs (initializers excluded)."""
    initializer_names = {t.name for t in model.graph.initializer}
    return {i.name: value_shape(i) or () for i in model.graph.input if i.name not in initializer_names}


def _with_shape(value: onnx.ValueInfoProto, dims: list[int]) -> onnx.ValueInfoProto:
    tensor_type = value.type.tensor_type
    declared = value_shape(value)
    if declared is not None and len(declared) != len(dims):
        raise OnnxSlimError(f"input {value.name!r} has rank {len(declared)}, but --input-shape gives {len(dims)} dims")
    for axis, (declared_dim, dim) in enumerate(zip(declared or (), dims)):
        if declared_dim is not None and declared_dim != dim:
            shown = ",".join("?" if d is None else str(d) for d in declared)
            free = "only its ? dims can be given" if None in declared else "it has no dynamic dims: drop --input-shape"
            raise OnnxSlimError(f"input {value.name!r} is declared [{shown}]: dim {axis} is {declared_dim}, --input-shape "
                                f"gives {dim} ({free})")
    return helper.make_tensor_value_info(value.name, tensor_type.elem_type, dims)


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """``["x:1,3,224,224"]`` -> ``{"x": [1, 3, 224, 224]}``."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")  # the name may itself contain ':'
        try:
            values = [int(d) for d in dims.split(",")]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise OnnxSlimError(f"bad --input-shape {spec!r}; expected NAME:D0,D1,... with positive dims")
        shapes[name] = values
    return shapes
