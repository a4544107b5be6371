"""Output shapes of onnxruntime's com.microsoft quantized ops, which onnx's shape inference does not define.

onnx knows nothing of the com.microsoft domain, so it leaves the outputs of ``QLinearAdd`` and the like
without a shape, and every op after them too (a Flatten after ``QLinearGlobalAveragePool`` would then
hide its channels). :func:`with_proxies` replaces each such op, in the weight-free skeleton that shape
inference runs on, by default-domain ops whose output has the same shape and element type, so that one
inference pass reaches through a whole chain of them. After onnxruntime's contrib op definitions
(docs/ContribOperators.md, onnxruntime 1.16-1.32):

* ``QLinearAdd`` / ``QLinearMul`` (A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp): numpy broadcast
  of A and B, A's type — ``Where(true, A, B)``;
* ``QLinearLeakyRelu`` / ``QLinearSigmoid`` / ``QLinearSoftmax`` (X, ...): X's shape and type — ``Identity``;
* ``QLinearGlobalAveragePool`` / ``QLinearAveragePool`` (X, X_scale, X_zp, Y_scale, Y_zp; channels
  first): ``GlobalAveragePool`` / ``AveragePool`` (same pooling attributes) of X cast to float, cast to
  Y_zp's type;
* ``QLinearConcat`` (Y_scale, Y_zp, then (X, X_scale, X_zp) triples, ``axis``): ``Concat`` of the X;
* ``QGemm`` (A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp, ``transA``, ``transB``): ``Gemm`` of
  A and B cast to float, cast to y_zp's type (float without y_scale).

The skeleton is only ever inferred, never run nor written: the proxies' outputs keep the original names,
their helper tensors get names of their own (``<output>__proxy...``). An op whose proxy needs a type that
the skeleton does not state (an absent zero point), a channels-last pool, or a ``QLinearAveragePool`` with
``ceil_mode`` (onnxruntime drops a last window that would start in the end padding; onnx's AveragePool
inference counts it) keeps no shape.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONTRIB = "com.microsoft"
_POOL_ATTRIBUTES = ("kernel_shape", "strides", "pads", "auto_pad", "count_include_pad")


def with_proxies(skel: onnx.ModelProto) -> onnx.ModelProto:
    """``skel`` (a skeleton of :func:`onnxslim.graph.shapes.skeleton`) with the com.microsoft quantized ops
    replaced by their proxies, in place; returns it."""
    graph = skel.graph
    types = {t.name: t.data_type for t in graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in graph.input})
    nodes, added, replaced = [], [], False
    for node in graph.node:
        proxy = _PROXIES.get(node.op_type) if node.domain == CONTRIB else None
        made = proxy(node, types, added) if proxy is not None else None
        nodes.extend(made if made is not None else [node])
        replaced |= made is not None
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(added)
    return skel


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _present(node: onnx.NodeProto, slot: int) -> bool:
    return len(node.input) > slot and bool(node.input[slot])


def _binary(node, types, added):
    """``Where(true, A, B)``: the broadcast shape, A's type."""
    condition = f"{node.output[0]}__proxy_true"
    added.append(numpy_helper.from_array(np.array(True), condition))
    return [helper.make_node("Where", [condition, node.input[0], node.input[3]], [node.output[0]])]


def _same(node, types, added):
    return [helper.make_node("Identity", [node.input[0]], [node.output[0]])]


def _through_float(node, types, added, inputs: list[str], op: str, zero_point_slot: int, **attrs):
    """Cast ``inputs`` to float, ``op`` them, cast the result to the type of the zero point at
    ``zero_point_slot`` (float when the node has no scale before it, as QGemm without y_scale)."""
    scale_present = _present(node, zero_point_slot - 1)
    elem_type = types.get(node.input[zero_point_slot]) if _present(node, zero_point_slot) else None
    if scale_present and elem_type is None:
        return None
    out = node.output[0]
    floats = [f"{out}__proxy_in{i}" for i in range(len(inputs))]
    made = [helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT) for name, cast in zip(inputs, floats)]
    if not scale_present:
        return [*made, helper.make_node(op, floats, [out], **attrs)]
    result = f"{out}__proxy_float"
    return [*made, helper.make_node(op, floats, [result], **attrs), helper.make_node("Cast", [result], [out], to=elem_type)]


def _global_pool(node, types, added):
    if _attr(node, "channels_last", 0):
        return None
    return _through_float(node, types, added, [node.input[0]], "GlobalAveragePool", 4)


def _average_pool(node, types, added):
    if _attr(node, "channels_last", 0) or _attr(node, "ceil_mode", 0):
        return None  # ceil_mode: onnxruntime drops a last window that starts in the end padding, onnx's inference does not
    attrs = {name: _attr(node, name, None) for name in _POOL_ATTRIBUTES}
    return _through_float(node, types, added, [node.input[0]], "AveragePool",
                          4, **{k: v for k, v in attrs.items() if v is not None})


def _concat(node, types, added):
    return [helper.make_node("Concat", list(node.input[2::3]), [node.output[0]], axis=_attr(node, "axis", 0))]


def _qgemm(node, types, added):
    attrs = {"transA": _attr(node, "transA", 0), "transB": _attr(node, "transB", 0)}
    return _through_float(node, types, added, [node.input[0], node.input[3]], "Gemm", 8, **attrs)


_PROXIES: dict[str, Callable] = {
    "QLinearAdd": _binary, "QLinearMul": _binary,
    "QLinearLeakyRelu": _same, "QLinearSigmoid": _same, "QLinearSoftmax": _same,
    "QLinearGlobalAveragePool": _global_pool, "QLinearAveragePool": _average_pool,
    "QLinearConcat": _concat, "QGemm": _qgemm,
}
