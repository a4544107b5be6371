"""Values of small integer shape tensors, computed symbolically.

Exporters spell ``x.view(x.size(0), -1)`` as ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` and
``torch.chunk`` as ``Slice`` with bounds computed from ``Shape``; ONNX data propagation does not always
follow these. This evaluator does, for the ops such subgraphs use. An entry is an ``int``, or a
:class:`Dim` — "axis ``axis`` of ``tensor`` at run time" — carrying its static value when known.

The distinction matters after slimming: a ``Dim`` of the channel axis *follows* the new channel count
at run time, while a number computed from it at export time (a chunk boundary) must be rewritten.

Arithmetic on dims that are not known before run time (``h * w`` of a map with a dynamic size) gives
:data:`UNKNOWN` entries: the other entries still count (``view(b, c, h * w)`` keeps its batch and its
channels whatever ``h * w`` is).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxslim.graph.model import Graph, get_attr


@dataclasses.dataclass(frozen=True)
class Dim:
    tensor: str
    axis: int
    static: int | None = None  # the value in the analysed model, when known


@dataclasses.dataclass(frozen=True)
class Unknown:
    """An entry computed at run time from dims that are not known before (``h * w`` of a dynamic map)."""


UNKNOWN = Unknown()

Value = list  # list[int | Dim | Unknown]


def is_dim_of(entry, tensor: str, axis: int) -> bool:
    return isinstance(entry, Dim) and entry.tensor == tensor and entry.axis == axis


def as_int(entry) -> int | None:
    if isinstance(entry, Unknown):
        return None
    return entry.static if isinstance(entry, Dim) else entry


def static_values(value: Value | None) -> list[int] | None:
    """All entries as numbers (the values in the analysed model), or None when one is unknown."""
    if value is None:
        return None
    numbers = [as_int(v) for v in value]
    return None if any(v is None for v in numbers) else numbers


def shape_value(index: Graph, name: str, depth: int = 0) -> Value | None:
    """The entries of the 1-D (or scalar) int tensor ``name``, or None when not computable."""
    constant = index.constant(name)
    if constant is not None:
        if constant.dtype.kind not in "iu" or constant.ndim > 1 or constant.size > 16:
            return None
        return [int(v) for v in constant.reshape(-1)]
    node = index.producer.get(name)
    if node is None or depth > 32:
        return None
    op = node.op_type

    def arg(slot: int) -> Value | None:
        return shape_value(index, node.input[slot], depth + 1) if len(node.input) > slot and node.input[slot] else None

    if op == "Shape":
        shape = index.shape(node.input[0])
        if shape is None:
            return None
        dims = [Dim(node.input[0], axis, d) for axis, d in enumerate(shape)]
        start, end = get_attr(node, "start", 0), get_attr(node, "end")
        return dims[start:end]
    if op in ("Identity", "Cast", "Unsqueeze", "Squeeze"):
        return arg(0)
    if op == "Reshape":  # to one dim (dynamo's [-1] of a scalar product): the entries stay in order
        target = index.constant(node.input[1]) if len(node.input) > 1 else None
        return arg(0) if target is not None and target.size == 1 and target.ndim == 1 else None
    if op == "Concat":
        parts = [shape_value(index, n, depth + 1) for n in node.input]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if op == "Gather":
        data, indices = arg(0), index.constant(node.input[1])
        if data is None or indices is None or get_attr(node, "axis", 0) != 0:
            return None
        try:
            return [data[int(i)] for i in np.reshape(indices, -1)]
        except IndexError:
            return None
    if op == "Slice":
        data = arg(0)
        starts, ends = static_values(arg(1)), static_values(arg(2))
        axes, steps = static_values(arg(3)), static_values(arg(4))
        if data is None or starts is None or ends is None:
            return None
        if (axes is not None and axes != [0]) or (steps is not None and steps != [1]):
            return None
        return data[starts[0]:ends[0]]
    if op in ("Mul", "Add", "Sub", "Div"):
        return _arithmetic(op, arg(0), arg(1))
    if op == "ReduceProd":
        data = arg(0)
        if data is None:
            return None
        numbers = static_values(data)
        return [UNKNOWN] if numbers is None else [int(np.prod(numbers))]
    return None


_ARITHMETIC = {"Mul": lambda p, q: p * q, "Add": lambda p, q: p + q, "Sub": lambda p, q: p - q,
               "Div": lambda p, q: int(p / q) if q else 0}  # integer Div truncates toward zero


def _arithmetic(op: str, a: Value | None, b: Value | None) -> Value | None:
    """Entry-wise ``a op b`` (numpy broadcasting of a one-entry side); an entry with an operand not
    known before run time is :data:`UNKNOWN`."""
    if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
        return None
    if len(a) == 1:
        a = a * len(b)
    if len(b) == 1:
        b = b * len(a)
    pairs = [(as_int(p), as_int(q)) for p, q in zip(a, b)]
    return [UNKNOWN if p is None or q is None else _ARITHMETIC[op](p, q) for p, q in pairs]


def reshape_target(index: Graph, node) -> list | None:
    """Reshape's output dims: ints, ``Dim("in", axis)`` for dims that are the input's at run time (the
    batch), or :data:`UNKNOWN` for dims not known before run time (``h * w``, or a -1 that merges them).
    0 (copy) and -1 (infer) are resolved. None when the target is not computable."""
    target = shape_value(index, node.input[1])
    in_shape = index.shape(node.input[0])
    if target is None or in_shape is None:
        return None
    allow_zero = get_attr(node, "allowzero", 0)
    dims: list = []
    for position, entry in enumerate(target):
        if entry == 0 and not isinstance(entry, Dim) and not allow_zero:
            entry = Dim(node.input[0], position, in_shape[position])
        if isinstance(entry, Dim):
            if entry.axis == 0 and same_batch(index, entry.tensor, node.input[0]):
                entry = Dim("in", 0, in_shape[0])  # the batch stays the batch
            elif entry.tensor == node.input[0] and in_shape[entry.axis] is not None:
                entry = in_shape[entry.axis]
            elif entry.static is not None:
                entry = entry.static
            else:
                entry = UNKNOWN
        dims.append(entry)
    if dims.count(-1) > 1:
        return None
    return _inferred(dims, in_shape) if -1 in dims else dims


def _inferred(dims: list, in_shape) -> list | None:
    """``dims`` with its -1 resolved: a number when the elements it stands for are known, the batch
    (``Dim("in", 0)``) for a constant ``[-1, C*H*W]`` of a dynamic batch, else :data:`UNKNOWN`."""
    where = dims.index(-1)
    symbolic = [d for d in dims if isinstance(d, Dim)]
    if UNKNOWN in dims:
        total_dims, known_dims = [None], []
    elif symbolic:
        # only "the batch stays the batch": dim 0 copied from the input, everything else static
        if where == 0 or len(symbolic) != 1 or not is_dim_of(dims[0], "in", 0):
            return None
        total_dims, known_dims = in_shape[1:], [d for d in dims[1:] if d != -1]
    elif where == 0 and len(in_shape) and in_shape[0] is None:
        # a constant target [-1, C*H*W] (torch's default exporter) with a dynamic batch: when the other
        # dims hold exactly the input's non-batch elements, the -1 is the batch
        rest = in_shape[1:]
        if any(d is None for d in rest) or np.prod(dims[1:], dtype=np.int64) != np.prod(rest, dtype=np.int64):
            return None
        return [Dim("in", 0, None), *dims[1:]]
    else:
        total_dims, known_dims = in_shape, [d for d in dims if d != -1]
    if any(d is None for d in total_dims):
        return [*dims[:where], UNKNOWN, *dims[where + 1:]]  # a run-time count, whatever it is
    total, known = int(np.prod(total_dims, dtype=np.int64)), int(np.prod(known_dims, dtype=np.int64))
    if known == 0 or total % known:
        return None
    return [*dims[:where], total // known, *dims[where + 1:]]


def same_batch(index: Graph, a: str, b: str) -> bool:
    """Axis 0 of ``a`` and of ``b`` are one dim at run time (the same tensor, or the same symbol)."""
    if a == b:
        return True
    symbol_a, symbol_b = index.symbols.get(a, (None,))[:1], index.symbols.get(b, (None,))[:1]
    return bool(symbol_a) and symbol_a[0] is not None and symbol_a == symbol_b
