"""Quantized constants: ``DequantizeLinear(q, scale, zero_point)`` whose inputs are all initializers, and
fake-quantized ones, ``DequantizeLinear(QuantizeLinear(w, scale, zero_point), scale, zero_point)`` of a
float initializer ``w`` (see :func:`fake_quantizer`).

QDQ models (onnxruntime.quantization, QDQ format) keep every weight as an int8 (or uint8 / int32 bias)
initializer ``q`` behind a ``DequantizeLinear``, with one scale and zero point per tensor or per output
channel (``axis``). The analysis reads such a weight by its value; a rewrite that *selects* entries of it
(channels deleted from a filter, a bias, a mask) is written back in the quantized form, so int8 stays int8.

ONNX DequantizeLinear (opset 10-21): ``y = (q - zero_point) * scale`` with ``scale`` / ``zero_point``
scalars (per tensor) or 1-D along ``axis`` (per axis, default axis 1); the subtraction is exact in int32
and the product is one float32 (scale's type) multiplication, which is what :func:`dequantize` computes.

Writing back (:func:`requantize`): the new value must be a selection of the old dequantized entries.
Along the quantization axis every new slice ``v_i`` is matched, in order, to the first original channel
``j`` whose parameters reproduce it *exactly*: ``q_i = clip(rint(v_i / s_j) + z_j)`` with
``(q_i - z_j) * s_j == v_i`` bit for bit. A selection in order always matches (greedy matching of a
subsequence is complete), and any exact match gives the same float weights. A value that no parameters
reproduce exactly (a bias that absorbed a constant, a weight scaled by a folded mask) is not a selection:
the caller stores it dequantized (float), which stays exact.
"""

from __future__ import annotations

import numpy as np
import onnx


def is_quantized_constant(node: onnx.NodeProto, initializers, producer=None, read=None) -> bool:
    """A DequantizeLinear of the default domain (not blocked quantization) reading only initializers,
    or, given the graph's ``producer`` map and an initializer reader ``read``, a fake-quantized one (see
    :func:`fake_quantizer`)."""
    if not (node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and len(node.output) == 1
            and not _attr(node, "block_size", 0)):
        return False
    if all(name in initializers for name in node.input if name):
        return True
    return producer is not None and fake_quantizer(node, initializers, producer, read) is not None


def fake_quantizer(node: onnx.NodeProto, initializers, producer, read) -> onnx.NodeProto | None:
    """The QuantizeLinear ``Q`` of ``DQ(Q(w))`` when the pair fake-quantizes a float initializer ``w``
    (quantization-aware training exports: ``torch.fake_quantize_per_channel_affine`` with either torch
    exporter, pytorch-quantization for TensorRT; onnxruntime's quantizer on a ``Constant`` node): ``Q``
    reads initializers only, and its scale, zero point (both present) and axis equal ``DQ``'s (the same
    tensors, or equal values by ``read(name)``). The constant's value is ``DQ(Q(w))``, with ``Q``
    computed as :func:`quantize`; None otherwise."""
    quantizer = producer.get(node.input[0])
    if quantizer is None or quantizer.op_type != "QuantizeLinear" or quantizer.domain not in ("", "ai.onnx") \
            or len(quantizer.input) < 3 or len(node.input) < 3 or not node.input[2] \
            or not all(name in initializers for name in [*quantizer.input, *node.input[1:]]) \
            or any(_attr(quantizer, a, d) != _attr(node, a, d) for a, d in (("axis", 1), ("block_size", 0))):
        return None
    for ours, theirs in zip(quantizer.input[1:3], node.input[1:3]):
        if ours != theirs:
            a, b = read(ours), read(theirs)
            if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                return None
    return quantizer


def check_parameters(graph: onnx.GraphProto) -> str | None:
    """What is wrong with the constant quantization parameters of ``graph``'s QuantizeLinear and
    DequantizeLinear nodes (default domain, not blocked), or None.

    For a node whose input, scale and zero point are initializers: the zero point has the scale's dims,
    and a per-axis scale (1-D, more than one value) has ``axis`` within the input's rank and one value
    per entry of that axis (ONNX QuantizeLinear/DequantizeLinear-13..21). Only dims are read.
    """
    dims = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx") \
                or _attr(node, "block_size", 0) or len(node.input) < 2:
            continue
        where = f"{node.op_type} {node.name or node.output[0]!r}"
        scale = dims.get(node.input[1])
        zero_point = dims.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            continue
        if zero_point is not None and int(np.prod(zero_point)) != int(np.prod(scale)):
            return f"{where}: zero point dims {zero_point} differ from the scale's {scale}"
        data = dims.get(node.input[0])
        if data is None or len(scale) != 1 or scale[0] == 1:
            continue
        axis = _attr(node, "axis", 1)
        if not -len(data) <= axis < len(data):
            return f"{where}: axis {axis} is outside the rank {len(data)} of its input"
        if data[axis] != scale[0]:
            return f"{where}: {scale[0]} scales for the {data[axis]} entries of axis {axis} of its input"
    return None


def quantize(value: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """``saturate(rint(value / scale) + zero_point)`` in zero_point's type, as QuantizeLinear computes it
    (a float32 quotient, rounded half to even; ONNX QuantizeLinear-13)."""
    if axis is not None:
        shape = [1] * value.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = integer_range(zero_point.dtype)
    if info is None:  # float8 QuantizeLinear casts (with saturation), it does not round
        with np.errstate(all="ignore"):
            return (value.astype(scale.dtype) / scale + zero_point.astype(scale.dtype)).astype(zero_point.dtype)
    with np.errstate(all="ignore"):
        ratio = np.rint(value.astype(scale.dtype) / scale)
    return np.clip(ratio + zero_point.astype(np.float64), info[0], info[1]).astype(zero_point.dtype)


def integer_range(dtype: np.dtype) -> tuple[int, int] | None:
    """(min, max) of an integer type, numpy's or ml_dtypes' 4-bit ones (``int4``, ``uint4``); None for
    other types (float8)."""
    try:
        info = np.iinfo(dtype)
    except ValueError:
        import ml_dtypes

        try:
            info = ml_dtypes.iinfo(dtype)
        except (ValueError, TypeError):
            return None
    return int(info.min), int(info.max)


def parameters(node: onnx.NodeProto, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None):
    """(scale, zero point, axis or None for per tensor) with the zero point defaulted to 0 of q's type."""
    zero_point = np.zeros_like(scale, dtype=q.dtype) if zero_point is None else zero_point
    if scale.size == 1 and scale.ndim <= 1:
        return scale.reshape(()), zero_point.reshape(()), None
    axis = _attr(node, "axis", 1)
    return scale, zero_point, (axis + q.ndim if axis < 0 else axis)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """``(q - zero_point) * scale`` as onnxruntime computes it (int32 difference, one float product)."""
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    difference = q.astype(np.int64) - zero_point.astype(np.int64)
    return difference.astype(scale.dtype) * scale


def requantize(value: np.ndarray, q_dtype: np.dtype, scale: np.ndarray, zero_point: np.ndarray,
               axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(q, scale, zero point) that dequantize exactly to ``value``, or None when no selection of the
    original channels does (see the module docstring)."""
    if axis is None:
        q = _quantize(value, scale, zero_point, q_dtype)
        return None if q is None else (q, scale, zero_point)
    moved = np.moveaxis(np.asarray(value), axis, 0)
    chosen, slices, j = [], [], 0
    for v in moved:
        q = None
        while j < len(scale) and q is None:
            q = _quantize(v, scale[j], zero_point[j], q_dtype)
            j += 1
        if q is None:
            return None
        chosen.append(j - 1)
        slices.append(q)
    q = np.moveaxis(np.stack(slices) if slices else np.zeros(moved.shape, q_dtype), 0, axis)
    return q, scale[chosen], zero_point[chosen]


def _quantize(value: np.ndarray, scale, zero_point, q_dtype: np.dtype) -> np.ndarray | None:
    """``clip(rint(value / scale) + zero_point)`` when it dequantizes to ``value`` bit for bit, else None."""
    value = np.asarray(value)
    if value.dtype != np.asarray(scale).dtype:
        return None
    info = integer_range(q_dtype)
    if info is None:  # float8: stored dequantized
        return None
    with np.errstate(all="ignore"):
        ratio = np.rint(value.astype(np.float64) / np.float64(scale))
    if not np.isfinite(ratio).all():
        return None
    q = np.clip(ratio + int(zero_point), info[0], info[1]).astype(q_dtype)
    if not np.array_equal(dequantize(q, np.asarray(scale), np.asarray(zero_point), None), value):
        return None
    return q


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
