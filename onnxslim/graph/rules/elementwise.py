"""Elementwise ops: channels pass one-to-one; channel values pass through the op's function.

Unary ``y = f(x)``: a channel that is the constant ``v`` becomes ``f(v)``. Zero therefore stays zero
exactly when ``f(0) = 0`` (Relu, LeakyRelu, Tanh, HardSwish, Clip with 0 in range ...) and becomes a
non-zero constant otherwise (Sigmoid: 0.5, HardSigmoid: beta).

N-ary ``y = f(a, b, ...)`` with numpy broadcasting: inputs that span the channel axis are either
feature maps, whose channels are **coupled** (a residual Add, SE gating ``x * s`` with s of shape
N×C×1×1), or constants, which are sliced along the channel axis. A channel of ``y`` is constant when
every operand's channel is (``Mul``: when any operand's channel is zero; ``Where(cond, x, y)``: when a
constant condition picks a constant channel, or x and y hold the same constant, so
``torch.where(y > t, y, 0)`` and ``masked_fill`` keep a zero channel zero). A ``Mul`` by a constant that
varies only along the channel axis is a **mask**: its zero entries are the channels to delete.
A feature operand whose channel dim is 1 (a spatial gate ``x * g[N,1,H,W]``, or ``x + g``) is read by
every output channel: its one channel is kept, and the output carries the ids of the full operands.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxslim.graph.channels import BARRIER, ChannelAnalysis, ChannelInfo
from onnxslim.graph.model import get_attr
from onnxslim.graph.rules.base import (
    Rule,
    aligned_axis,
    inputs_nonnegative,
    inputs_positive,
    keep_extra_outputs,
    pass_through,
    register,
)

_erf = np.vectorize(math.erf, otypes=[np.float64])


def clip_bounds(node: onnx.NodeProto, constant_inputs: list[np.ndarray | None]) -> tuple[float, float] | None:
    """(min, max) of a Clip (attributes before opset 11, inputs from 11; absent: -inf, inf), or None when
    a bound is computed."""
    if len(constant_inputs) > 1:  # opset 11+: min and max are inputs
        lo = constant_inputs[1]
        hi = constant_inputs[2] if len(constant_inputs) > 2 else None
        if (node.input[1] and lo is None) or (len(node.input) > 2 and node.input[2] and hi is None):
            return None  # a computed bound
    else:
        lo, hi = get_attr(node, "min"), get_attr(node, "max")
    low = -np.inf if lo is None else float(np.asarray(lo).reshape(-1)[0])
    high = np.inf if hi is None else float(np.asarray(hi).reshape(-1)[0])
    return low, high


def unary_function(node: onnx.NodeProto, constant_inputs: list[np.ndarray | None]):
    """``f`` as a numpy function of float64 values, or None when values cannot be computed."""
    op = node.op_type
    alpha = get_attr(node, "alpha")
    if op in ("Relu",):
        return lambda v: np.maximum(v, 0.0)
    if op == "LeakyRelu":
        a = 0.01 if alpha is None else alpha
        return lambda v: np.where(v >= 0, v, a * v)
    if op == "Elu":
        a = 1.0 if alpha is None else alpha
        return lambda v: np.where(v > 0, v, a * (np.exp(v) - 1.0))
    if op == "Selu":
        a = 1.67326319217681884765625 if alpha is None else alpha
        g = get_attr(node, "gamma", 1.05070102214813232421875)
        return lambda v: g * np.where(v > 0, v, a * (np.exp(v) - 1.0))
    if op == "Celu":
        a = 1.0 if alpha is None else alpha
        return lambda v: np.maximum(v, 0) + np.minimum(0, a * (np.exp(v / a) - 1.0))
    if op == "ThresholdedRelu":
        a = 1.0 if alpha is None else alpha
        return lambda v: np.where(v > a, v, 0.0)
    if op == "Sigmoid":
        return lambda v: 1.0 / (1.0 + np.exp(-v))
    if op == "HardSigmoid":
        a = 0.2 if alpha is None else alpha
        b = get_attr(node, "beta", 0.5)
        return lambda v: np.clip(a * v + b, 0.0, 1.0)
    if op == "HardSwish":
        return lambda v: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0)
    if op == "Shrink":
        bias, lambd = get_attr(node, "bias", 0.0), get_attr(node, "lambd", 0.5)
        return lambda v: np.where(v < -lambd, v + bias, np.where(v > lambd, v - bias, 0.0))
    if op == "Gelu":
        if get_attr(node, "approximate", b"none") in (b"tanh", "tanh"):
            return lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
        return lambda v: 0.5 * v * (1 + _erf(v / np.sqrt(2)))
    if op == "Clip":
        bounds = clip_bounds(node, constant_inputs)
        return None if bounds is None else lambda v: np.clip(v, *bounds)
    simple = {
        "Tanh": np.tanh, "Abs": np.abs, "Neg": np.negative, "Exp": np.exp, "Floor": np.floor, "Ceil": np.ceil,
        "Round": np.round, "Sign": np.sign, "Sin": np.sin, "Cos": np.cos, "Erf": _erf,
        "Softsign": lambda v: v / (1.0 + np.abs(v)), "Softplus": lambda v: np.logaddexp(0.0, v),
        "Mish": lambda v: v * np.tanh(np.logaddexp(0.0, v)),
        "Identity": lambda v: v, "Dropout": lambda v: v, "Sqrt": np.sqrt, "Reciprocal": lambda v: 1.0 / v,
        "Log": np.log, "Relu6": lambda v: np.clip(v, 0, 6), "Not": lambda v: (v == 0).astype(np.float64),
    }
    if op in simple:
        return simple[op]
    if op == "Cast":
        to = get_attr(node, "to")
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(to)
        except Exception:
            return None
        return lambda v: np.asarray(v).astype(dtype).astype(np.float64)
    return None


def apply_to_constants(function, info: ChannelInfo) -> ChannelInfo:
    if function is None:
        return info.unknown_values()
    with np.errstate(all="ignore"):
        value = np.asarray(function(info.value), np.float64)
    const = info.const & np.isfinite(value)
    return info.with_values(const, value)


#: unary ops whose output is >= 0 for every input (ONNX operator spec): Relu ``max(0, x)``, Sigmoid
#: ``1 / (1 + exp(-x))``, HardSigmoid ``max(0, min(1, alpha x + beta))``, Softplus ``ln(exp(x) + 1)``,
#: Abs ``|x|``, Exp ``exp(x)``, Not (a boolean)
_NONNEGATIVE = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softplus", "Abs", "Exp", "Not"})
#: unary ops with ``f(x) >= 0`` for ``x >= 0`` (spec formulas): ``f(x) = x`` there (Identity, Dropout in
#: inference; LeakyRelu, Elu, Celu), odd increasing functions (Tanh, Erf, Softsign, Sign), ``x`` times a
#: factor >= 0 (Gelu, Mish, HardSwish), Sqrt, and rounding (Floor, Ceil, Round)
_NONNEGATIVE_IF_INPUT = frozenset({"Identity", "Dropout", "LeakyRelu", "Elu", "Celu", "Tanh", "Erf", "Softsign",
                                   "Sign", "Gelu", "Mish", "HardSwish", "Sqrt", "Floor", "Ceil", "Round"})
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def unary_sign(node: onnx.NodeProto, analysis: ChannelAnalysis) -> str:
    """When ``f(x) >= 0`` holds: "always", "input" (for ``x >= 0``) or "never" (not provable).

    Besides the two tables: ThresholdedRelu ``x if x > alpha else 0`` is always >= 0 when ``alpha >= 0``;
    Clip (Relu6 is ``Clip(x, 0, 6)``) always when ``min >= 0`` and ``max >= 0`` (min > max gives max),
    for ``x >= 0`` when ``max >= 0``; Selu ``gamma x`` on ``x >= 0`` when ``gamma >= 0``; Cast to a float
    type keeps the sign (to an integer type an out-of-range value is undefined behaviour).
    """
    op = node.op_type
    if op in _NONNEGATIVE or (op == "ThresholdedRelu" and get_attr(node, "alpha", 1.0) >= 0):
        return "always"
    if op == "Clip":
        bounds = clip_bounds(node, [analysis.index.constant(name) for name in node.input])
        if bounds is None or not bounds[1] >= 0:
            return "never"
        return "always" if bounds[0] >= 0 else "input"
    if op in _NONNEGATIVE_IF_INPUT or op == "ThresholdedRelu" or (op == "Selu" and get_attr(node, "gamma", 1.0) >= 0) \
            or (op == "Cast" and get_attr(node, "to") in _FLOAT_TYPES):
        return "input"
    return "never"


@register
class UnaryRule(Rule):
    """``y = f(x)`` elementwise; extra outputs (Dropout's mask) make the op a barrier when read."""

    op_types = (
        "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid", "HardSwish",
        "Shrink", "Gelu", "Clip", "Tanh", "Abs", "Neg", "Exp", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
        "Erf", "Softsign", "Softplus", "Mish", "Identity", "Dropout", "Sqrt", "Reciprocal", "Log", "Cast", "Not",
    )
    passthrough = True

    def propagate(self, node, analysis):
        info = analysis.feature(node.input[0])
        if info is None:
            if analysis.index.is_const(node.input[0]):
                return  # a constant-only node that normalisation left (e.g. too large): not a feature
            analysis.barrier(node, "input has no known channel axis")
            return
        if keep_extra_outputs(node, analysis, 1, "its mask output is read"):
            return
        constants = [analysis.index.constant(name) for name in node.input]
        pass_through(node, analysis, apply_to_constants(unary_function(node, constants), info))

    def is_identity(self, node):
        return node.op_type == "Identity"

    def nonnegative(self, node, analysis):
        """See :func:`unary_sign` (Dropout's mask output is boolean, so >= 0 too)."""
        sign = unary_sign(node, analysis)
        return sign == "always" or (sign == "input" and inputs_nonnegative(node, analysis))

    def positive(self, node, analysis):
        """Clip with constant bounds both > 0 (min > max gives max); Identity, Relu, Abs, Sqrt of an
        input > 0 (``sqrt`` of the least positive float is > 0), Dropout too unless its mask is read."""
        if node.op_type == "Clip":
            bounds = clip_bounds(node, [analysis.index.constant(name) for name in node.input])
            return bounds is not None and bounds[0] > 0 and bounds[1] > 0
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            return False
        return node.op_type in ("Identity", "Dropout", "Relu", "Abs", "Sqrt") and inputs_positive(node, analysis)

    def commutes_with_positive_scale(self, node):
        return node.op_type in ("Relu", "LeakyRelu", "Identity", "Dropout")


# -- n-ary ops -----------------------------------------------------------------------------------

_NARY = {
    "Add": lambda vs: vs[0] + vs[1],
    "Sub": lambda vs: vs[0] - vs[1],
    "Mul": lambda vs: vs[0] * vs[1],
    "Div": lambda vs: vs[0] / vs[1],
    "Pow": lambda vs: np.power(vs[0], vs[1]),
    "Max": lambda vs: np.maximum.reduce(vs),
    "Min": lambda vs: np.minimum.reduce(vs),
    "Sum": lambda vs: np.add.reduce(vs),
    "Mean": lambda vs: np.add.reduce(vs) / len(vs),
    "PRelu": lambda vs: np.where(vs[0] >= 0, vs[0], vs[1] * vs[0]),
    # comparisons and logic give booleans (here 0.0 / 1.0); Where(cond, x, y) selects per element
    "Greater": lambda vs: np.greater(vs[0], vs[1]).astype(np.float64),
    "Less": lambda vs: np.less(vs[0], vs[1]).astype(np.float64),
    "GreaterOrEqual": lambda vs: np.greater_equal(vs[0], vs[1]).astype(np.float64),
    "LessOrEqual": lambda vs: np.less_equal(vs[0], vs[1]).astype(np.float64),
    "Equal": lambda vs: np.equal(vs[0], vs[1]).astype(np.float64),
    "And": lambda vs: np.logical_and(vs[0] != 0, vs[1] != 0).astype(np.float64),
    "Or": lambda vs: np.logical_or(vs[0] != 0, vs[1] != 0).astype(np.float64),
    "Xor": lambda vs: np.logical_xor(vs[0] != 0, vs[1] != 0).astype(np.float64),
    "Where": lambda vs: np.where(vs[0] != 0, vs[1], vs[2]),
}
#: n-ary ops whose output is boolean, so >= 0
_BOOLEAN = frozenset({"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "And", "Or", "Xor"})


class _Operand:
    """One input of an n-ary op, seen from the output's channel axis."""

    def __init__(self, name: str, info: ChannelInfo | None, constant: np.ndarray | None, out_rank: int,
                 rank: int | None = None):
        self.name, self.info, self.constant = name, info, constant
        self.rank = info.rank if info is not None else (constant.ndim if constant is not None else rank)
        self.out_rank = out_rank
        #: a computed operand of one element (a dynamic quantization scale): broadcast, value unknown
        self.scalar = info is None and constant is None

    def channel_dim(self, out_axis: int) -> int | None:
        """Size of this operand along the output's channel axis (1 when broadcast), None if unknown."""
        axis = out_axis - (self.out_rank - self.rank)
        if axis < 0:
            return 1
        if self.info is not None:
            return self.info.size if axis == self.info.axis else None
        return 1 if self.scalar else self.constant.shape[axis]

    def constant_axis(self, out_axis: int) -> int:
        return out_axis - (self.out_rank - self.rank)


def _per_channel(constant: np.ndarray, axis: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(const, value) per channel of a constant operand: constant where it does not vary off the channel axis."""
    if axis < 0 or constant.shape[axis] == 1:
        flat = constant.reshape(-1).astype(np.float64)
        uniform = flat.size > 0 and bool((flat == flat[0]).all())
        value = flat[0] if flat.size else 0.0
        return np.full(channels, uniform), np.full(channels, value)
    moved = np.moveaxis(constant, axis, 0).reshape(channels, -1).astype(np.float64)
    uniform = (moved == moved[:, :1]).all(axis=1)
    return uniform, moved[:, 0]


def _scalar_rank(index, name: str) -> int | None:
    """Rank of a computed tensor of statically one element (every dim 1, or rank 0), else None."""
    shape = index.shape(name)
    return len(shape) if shape is not None and all(d == 1 for d in shape) else None


def _keep_broadcast_gates(node, analysis, operands, dims, channels) -> None:
    """A feature operand with one channel broadcast over ``channels`` > 1 (a spatial gate
    ``x[N,C,H,W] * g[N,1,H,W]``) is read by every output channel: its channel is kept, like a barrier
    holding only what it reads. (Its value still flows: a zero gate makes every output channel zero.)"""
    for op, d in zip(operands, dims):
        if op.info is not None and d == 1 < channels:
            analysis.keep(op.info.ids, BARRIER, f"{node.op_type} '{analysis.index.node_name(node)}' broadcasts "
                                                f"'{op.name}' over {channels} channels")


def _drop_zero_operands(node, rewriter) -> None:
    """``Add(x, 0) = x``: a feature operand that is zero in every channel is dropped from Add / Sum;
    ``Sub(x, 0) = x`` and ``Sub(0, y) = Neg(y)``. With one operand left the node becomes an Identity
    (which cleanup removes) or a Neg; the zero branch then has no reader and goes as dead code (a pruned
    residual branch). Nothing is dropped when the zero operand carries the broadcast output shape."""
    if node.op_type not in ("Add", "Sum", "Sub"):
        return
    index = rewriter.index
    out_shape = index.shape(node.output[0])
    zero = [bool(info is not None and info.size and info.zero.all())
            for info in (rewriter.info(name) if not index.is_const(name) else None for name in node.input)]
    survivors = [name for name, z in zip(node.input, zero) if not z]
    if not any(zero) or not survivors or out_shape is None:
        return
    if not any(index.same_shape(name, node.output[0]) for name in survivors):
        return  # a zero operand may carry the broadcast shape (dynamic dims compare by their symbol)
    if node.op_type == "Sub" and zero[0]:
        node.op_type = "Neg"
    elif len(survivors) == 1:
        node.op_type = "Identity"
    elif node.op_type == "Sum" and len(survivors) == 2:
        node.op_type = "Add"
    del node.input[:]
    node.input.extend(survivors)


def _where_constant(consts: list[np.ndarray], values: list[np.ndarray]) -> np.ndarray:
    """Channels of ``Where(cond, x, y)`` that are constant: a constant condition picking a constant
    channel, or x and y the same constant (a zero channel masked either way: ``masked_fill(y < t, 0)``
    of a zero channel, ``torch.where(y > t, y, 0)``, Hardshrink)."""
    picked = consts[0] & np.where(values[0] != 0, consts[1], consts[2])
    return picked | (consts[1] & consts[2] & (values[1] == values[2]))


@register
class NaryRule(Rule):
    """Add, Sub, Mul, Div, Pow, Max, Min, Sum, Mean, PRelu, comparisons (Greater, Less, Equal ...),
    And, Or, Xor and Where with broadcasting."""

    op_types = tuple(_NARY)
    passthrough = True

    def _operands(self, node: onnx.NodeProto, analysis: ChannelAnalysis):
        index = analysis.index
        infos = [analysis.feature(name) for name in node.input]
        constants = [index.constant(name) for name in node.input]
        ranks = [i.rank if i is not None else (c.ndim if c is not None else _scalar_rank(index, n))
                 for n, i, c in zip(node.input, infos, constants)]
        out_shape = index.shape(node.output[0])
        if any(r is None for r in ranks):
            return None, "an operand has no known channel axis"
        out_rank = len(out_shape) if out_shape is not None else max(ranks)
        operands = [_Operand(n, i, c, out_rank, r) for n, i, c, r in zip(node.input, infos, constants, ranks)]
        features = [op for op in operands if op.info is not None]
        if not features:
            return None, "no feature-map operand"
        out_axes = {aligned_axis(op.info.axis, op.rank, out_rank) for op in features if op.rank == out_rank or op.info.size > 1}
        if len(out_axes) != 1:
            return None, "operands disagree on the channel axis"
        return (operands, out_axes.pop(), out_rank), ""

    def propagate(self, node, analysis):
        parsed, why = self._operands(node, analysis)
        if parsed is None:
            analysis.barrier(node, why)
            return
        operands, axis, rank = parsed
        dims = [op.channel_dim(axis) for op in operands]
        if any(d is None for d in dims):
            analysis.barrier(node, "an operand's channel axis does not line up with the output's")
            return
        channels = max(dims)
        if any(d not in (1, channels) for d in dims):
            analysis.barrier(node, "operands have incompatible channel counts")
            return
        full = [op for op, d in zip(operands, dims) if op.info is not None and d == channels]
        if not full:
            analysis.barrier(node, "only a constant spans the channel axis")
            return
        for other in full[1:]:
            analysis.couple(full[0].info.ids, other.info.ids)
        _keep_broadcast_gates(node, analysis, operands, dims, channels)
        # channel values: every operand as (const, value) per output channel
        consts, values = [], []
        for op, d in zip(operands, dims):
            if op.info is not None:
                if d == channels:
                    consts.append(op.info.const)
                    values.append(op.info.value)
                else:
                    consts.append(np.repeat(op.info.const[:1], channels))
                    values.append(np.repeat(op.info.value[:1], channels))
            elif op.scalar:
                consts.append(np.zeros(channels, bool))
                values.append(np.full(channels, np.nan))
            else:
                c, v = _per_channel(op.constant, op.constant_axis(axis), channels)
                consts.append(c)
                values.append(v)
        const = np.logical_and.reduce(consts)
        with np.errstate(all="ignore"):
            value = np.asarray(_NARY[node.op_type](values), np.float64)
        const &= np.isfinite(value)
        zero = None
        if node.op_type == "Mul":  # 0 * anything = 0
            zero = np.logical_or.reduce([c & (v == 0) for c, v in zip(consts, values)])
        elif node.op_type == "Div" and analysis.positive(node.input[1]):  # 0 / d = 0 when d is never 0
            zero = consts[0] & (values[0] == 0)
        elif node.op_type == "Where" and len(consts) == 3:
            const = _where_constant(consts, values)
        if zero is not None:
            const |= zero
            value = np.where(zero, 0.0, value)
        base = full[0].info
        info = ChannelInfo(base.ids, axis, rank, const, np.where(const, value, 0.0))
        analysis.set(node.output[0], info)
        if node.op_type == "Mul" and len(operands) == 2:
            self._note_mask(node, analysis, operands, axis, channels)

    def multiplies(self, node):
        return node.op_type == "Mul" and len(node.input) == 2

    def nonnegative(self, node, analysis):
        """Output >= 0 for every input (ONNX operator spec formulas; a constant operand, such as a mask,
        counts only when all its values are >= 0):

        * Add, Mul, Sum, Mean, Min: every operand >= 0; Max: some operand >= 0; PRelu: ``x >= 0`` gives x;
        * Div: numerator >= 0 and denominator a constant > 0 (a computed ``-0.0`` divisor gives -inf);
        * Pow: base >= 0 and exponent a constant >= 0, or any base and an even integer exponent
          (``x.pow(2)`` of an L2 norm); Sub: never;
        * comparisons, And, Or, Xor: booleans, always; Where: both branches >= 0.
        """
        op, index = node.op_type, analysis.index
        if op in _BOOLEAN:
            return True
        if op == "Where":
            return inputs_nonnegative(node, analysis, (1, 2))
        if op == "Pow" and len(node.input) == 2:
            exponent = index.constant(node.input[1])
            if exponent is not None and exponent.size and np.all(np.mod(exponent, 2) == 0):
                return True
        if op in ("Add", "Mul", "Sum", "Mean", "Min"):
            return inputs_nonnegative(node, analysis, range(len(node.input)))
        if op == "Max":
            return any(inputs_nonnegative(node, analysis, (slot,)) for slot in range(len(node.input)))
        if op in ("Div", "Pow") and len(node.input) == 2:
            other = index.constant(node.input[1])
            if other is None or not (np.all(other > 0) if op == "Div" else np.all(other >= 0)):
                return False
        elif op != "PRelu":
            return False
        return inputs_nonnegative(node, analysis)

    def positive(self, node, analysis):
        """Add, Sum: every operand >= 0 and one > 0 (rounding is monotonic: ``fl(x + c) >= c``); Max: one
        operand > 0; Min: every operand > 0. Products and quotients can underflow to 0."""
        op, slots = node.op_type, range(len(node.input))
        if op in ("Add", "Sum"):
            return inputs_nonnegative(node, analysis, slots) and any(inputs_positive(node, analysis, (s,)) for s in slots)
        if op == "Max":
            return any(inputs_positive(node, analysis, (s,)) for s in slots)
        return op == "Min" and inputs_positive(node, analysis, slots)

    def commutes_with_positive_scale(self, node):
        return node.op_type == "PRelu"

    def _note_mask(self, node, analysis, operands, axis, channels):
        feature = [op for op in operands if op.info is not None]
        constant = [op for op in operands if op.constant is not None]
        if len(feature) != 1 or len(constant) != 1 or channels < 1:
            return
        mask = constant[0].constant
        caxis = constant[0].constant_axis(axis)
        if caxis < 0 or mask.shape[caxis] != channels or mask.size != channels:
            return  # a mask varies along the channel axis only
        zero = np.flatnonzero(mask.reshape(-1) == 0)
        analysis.note_mask(node, node.output[0], channels, zero)

    def rewrite(self, node, rewriter):
        _drop_zero_operands(node, rewriter)
        keep = rewriter.keep(node.output[0])
        if keep is None or keep.all():
            return
        info = rewriter.info(node.output[0])
        for slot, name in enumerate(node.input):
            constant = rewriter.index.constant(name)
            if constant is None:
                continue
            caxis = info.axis - (info.rank - constant.ndim)
            if caxis >= 0 and constant.shape[caxis] == len(keep):
                rewriter.weights.write(node, slot, np.compress(keep, constant, axis=caxis),
                                       key=("take", caxis, keep.tobytes()))
