"""Output shapes of onnxruntime's com.microsoft quantized ops, which onnx's shape inference does not define.

onnx knows nothing of the com.microsoft domain, so it leaves the outputs of ``QLinearAdd`` and the like
without a shape, and every op after them too (a Flatten after ``QLinearGlobalAveragePool`` would then
hide its channels). :func:`contrib_outputs` gives those outputs their shape and element type from the
operator definitions of onnxruntime's contrib ops (docs/ContribOperators.md, onnxruntime 1.16-1.32):

* ``QLinearAdd`` / ``QLinearMul`` (A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp): numpy broadcast of
  A and B, A's type;
* ``QLinearLeakyRelu`` / ``QLinearSigmoid`` (X, X_scale, X_zp, Y_scale, Y_zp): X's shape and type;
* ``QLinearGlobalAveragePool``: X's shape with every spatial dim 1 (axes 2.. or, ``channels_last=1``,
  axes 1..r-2);
* ``QLinearAveragePool``: the AveragePool output size per spatial axis (``kernel_shape``, ``strides``,
  ``pads``, ``dilations``, ``ceil_mode``, ``auto_pad``; ONNX AveragePool-19);
* ``QLinearConcat`` (Y_scale, Y_zp, then (X, X_scale, X_zp) triples, ``axis``): the inputs' dims with
  the sizes along ``axis`` added, Y_zp's type;
* ``QGemm`` (A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp, ``transA``, ``transB``): (M, N),
  y_zp's type, float32 without y_scale.

Dims are ``int`` (static), ``str`` (a symbol, carried from the inputs) or None (unknown). Each call
answers the outputs whose inputs already have shapes; :func:`onnxslim.graph.shapes.infer_model` calls
it once per inference round, so a chain of such ops is reached one op per round.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx
from onnx import helper

Dim = int | str | None
Shape = list[Dim]
_CONTRIB = "com.microsoft"


def contrib_outputs(inferred: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """value_info for the outputs of com.microsoft quantized ops whose shapes ``inferred`` lacks and whose
    inputs have one."""
    graph = inferred.graph
    values = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    shapes: dict[str, Shape] = {t.name: list(t.dims) for t in graph.initializer}
    shapes.update({name: _dims(value) for name, value in values.items()})
    types = {t.name: t.data_type for t in graph.initializer}
    types.update({name: v.type.tensor_type.elem_type for name, v in values.items()})
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        rule = _SHAPES.get(node.op_type) if node.domain == _CONTRIB else None
        if rule is None or not node.output or node.output[0] in values or node.output[0] in outputs:
            continue
        result = rule(node, shapes.get, types.get)
        if result is not None:
            shape, elem_type = result
            found.append(helper.make_tensor_value_info(node.output[0], elem_type, shape))
    return found


def _dims(value: onnx.ValueInfoProto) -> Shape:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _broadcast(node, dims, types):
    a, b = dims(node.input[0]), dims(node.input[3]) if len(node.input) > 3 else None
    if a is None or b is None or types(node.input[0]) is None:
        return None
    rank = max(len(a), len(b))
    a, b = [1] * (rank - len(a)) + a, [1] * (rank - len(b)) + b
    shape = []
    for x, y in zip(a, b):
        if x == 1 or x == y:
            shape.append(y)
        elif y == 1:
            shape.append(x)
        else:  # unknown against a size other than 1: the size it must have, when one is static
            shape.append(x if isinstance(x, int) else y if isinstance(y, int) else None)
    return shape, types(node.input[0])


def _same(node, dims, types):
    x = dims(node.input[0])
    return None if x is None or types(node.input[0]) is None else (x, types(node.input[0]))


def _spatial_axes(node, rank: int) -> range:
    return range(1, rank - 1) if _attr(node, "channels_last", 0) else range(2, rank)


def _global_pool(node, dims, types):
    found = _same(node, dims, types)
    if found is None:
        return None
    x, elem_type = found
    return [1 if axis in _spatial_axes(node, len(x)) else d for axis, d in enumerate(x)], elem_type


def _pooled(size: Dim, kernel: int, stride: int, begin: int, end: int, dilation: int, ceil: bool, auto: str) -> Dim:
    if not isinstance(size, int):
        return None
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return -(-size // stride)
    span = (kernel - 1) * dilation + 1
    if auto == "VALID":
        return -(-(size - span + 1) // stride)
    rounding = math.ceil if ceil else math.floor
    out = rounding((size + begin + end - span) / stride) + 1
    if ceil and (out - 1) * stride >= size + begin:  # the last window must start inside the input or its begin pad
        out -= 1
    return out


def _average_pool(node, dims, types):
    found = _same(node, dims, types)
    kernel = _attr(node, "kernel_shape", None)
    if found is None or kernel is None:
        return None
    x, elem_type = found
    axes = list(_spatial_axes(node, len(x)))
    n = len(axes)
    strides = _attr(node, "strides", None) or [1] * n
    pads = _attr(node, "pads", None) or [0] * (2 * n)
    dilations = _attr(node, "dilations", None) or [1] * n
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    ceil = bool(_attr(node, "ceil_mode", 0))
    shape = list(x)
    for i, axis in enumerate(axes):
        shape[axis] = _pooled(x[axis], kernel[i], strides[i], pads[i], pads[i + n], dilations[i], ceil, auto)
    return shape, elem_type


def _concat(node, dims, types):
    inputs = [dims(name) for name in node.input[2::3]]
    if not inputs or any(x is None for x in inputs) or types(node.input[1]) is None:
        return None
    rank = len(inputs[0])
    axis = _attr(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    if any(len(x) != rank for x in inputs) or not 0 <= axis < rank:
        return None
    sizes = [x[axis] for x in inputs]
    shape = list(inputs[0])
    shape[axis] = sum(sizes) if all(isinstance(s, int) for s in sizes) else None
    return shape, types(node.input[1])


def _qgemm(node, dims, types):
    a, b = dims(node.input[0]), dims(node.input[3])
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    rows = a[1] if _attr(node, "transA", 0) else a[0]
    columns = b[0] if _attr(node, "transB", 0) else b[1]
    has_scale = len(node.input) > 7 and node.input[7]
    zero_point = node.input[8] if len(node.input) > 8 and node.input[8] else None
    elem_type = (types(zero_point) if zero_point else onnx.TensorProto.UINT8) if has_scale else onnx.TensorProto.FLOAT
    return None if elem_type is None else ([rows, columns], elem_type)


_SHAPES: dict[str, Callable] = {
    "QLinearAdd": _broadcast, "QLinearMul": _broadcast,
    "QLinearLeakyRelu": _same, "QLinearSigmoid": _same, "QLinearSoftmax": _same,
    "QLinearGlobalAveragePool": _global_pool, "QLinearAveragePool": _average_pool,
    "QLinearConcat": _concat, "QGemm": _qgemm,
}
