"""onnxruntime's QOperator int8 format (``quantize_static(..., quant_format=QuantFormat.QOperator)``, the
ONNX model zoo's ``*-int8`` models): quantized ops that read and write integer tensors.

Sources: the ONNX operator spec (QLinearConv-10, QLinearMatMul-10/21) and onnxruntime's contrib ops
(docs/ContribOperators.md, domain com.microsoft: QGemm, QLinearAdd, QLinearMul, QLinearConcat,
QLinearGlobalAveragePool, QLinearAveragePool, QLinearLeakyRelu, QLinearSigmoid). With
``Q_y(v) = saturate(rint(v / y_s) + y_zp)`` and ``x~ = x - x_zp`` (exact in int32)::

    QLinearConv    y[o] = Q_y((sum_{i in group(o), k} x~[i] (W[o,i,k] - w_zp[o]) + B[o]) * x_s * w_s[o])
    QLinearMatMul  y[n] = Q_y((sum_k a~[k] (B[k,n] - b_zp[n])) * a_s * b_s[n])
    QGemm          y[n] = Q_y(alpha * (sum_k a~[k] (B'[k,n] - b_zp[n]) + C[n]) * a_s * b_s[n])
                   (float ``alpha * (...) * a_s * b_s[n]`` without y_scale)
    QLinearAdd     C = Q_c(A_s * A~ + B_s * B~);      QLinearMul  C = Q_c(A_s * A~ * B_s * B~)
    QLinearConcat  each input requantized, y = Q_y(x~ * x_s), then concatenated
    QLinearGlobalAveragePool / QLinearAveragePool   y = Q_y(mean(x~) * x_s)
    QLinearLeakyRelu / QLinearSigmoid               y = Q_y(f(x~ * x_s))

Channel values of an integer tensor are its integers, as :mod:`onnxslim.graph.rules.quant` writes them
for QuantizeLinear. A channel that is the constant ``zp`` of its tensor stands for the real 0 (it
dequantizes to ``(zp - zp) * s = 0``): it is the zero of the quantized domain, and every rule here reads
an input "at its zero point" as zero.

**Exactness.** ``x~ = 0`` exactly on such a channel, so it adds nothing to the exact int32 sums of
QLinearConv, QLinearMatMul and QGemm, nor does a channel whose weights all equal the weight zero point:
both are deleted; the scales are constants, so every kept channel computes the same integers (unlike
DynamicQuantizeLinear's run-time scale). An output channel whose centred weights are 0 on every live
input and whose int32 bias is 0 is ``Q_y(0) = rint(0) + y_zp = y_zp``: at its zero point. QLinearAdd of
two channels at their zero points, QLinearMul with one, QLinearConcat, the pools and QLinearLeakyRelu of
one give ``Q(0) = y_zp`` too. QLinearSigmoid does not (``sigmoid(0) = 1/2``, like float Sigmoid): its
output channel is left unknown. Other constants become unknown: their requantized values are
onnxruntime's float arithmetic, not reproduced here (nothing absorbs a constant into a bias).
Measured with onnxruntime 1.32 (CPU): y_zp exactly for each contrib op above, 200 random scale and zero
point draws per op, uint8 and int8 (``tests/rules/test_qoperator.py`` keeps a sample of it).

Parameters: activation scales and zero points per tensor (one value); weight scales and zero points per
tensor or per output channel (QLinearConv's axis 0, B's columns), sliced with the channels; a bias is
sliced too. Anything else (a computed parameter, per-channel activations) makes the op a barrier.

**Prune** cannot put a float ``Mul`` mask on an integer tensor: :meth:`~QLinearConvRule.mask_output_channels`
sets a chosen output channel's weights to the weight zero point and its bias to 0, which makes it
``y_zp`` exactly (the masked reference), and slim then deletes it.
"""

from __future__ import annotations

import numpy as np

from onnxslim.graph.model import get_attr
from onnxslim.graph.rules.base import (
    Rule,
    aligned_axis,
    block_reduced_channels,
    feature_or_barrier,
    keep_all,
    normalize_axis,
    register,
    slice_bias,
)
from onnxslim.graph.rules.conv import conv_channels
from onnxslim.graph.rules.dynquant import ConvIntegerRule, MatMulIntegerRule, saturation_notes
from onnxslim.graph.rules.linear import matrix_output_channels
from onnxslim.graph.values import BARRIER, ChannelInfo

CONTRIB = "com.microsoft"


def _present(node, slot: int) -> bool:
    return len(node.input) > slot and bool(node.input[slot])


def _zero_point(index, node, slot: int) -> int | None:
    """The per-tensor zero point at input ``slot`` (absent: 0); None when computed or not one value."""
    if not _present(node, slot):
        return 0
    value = index.constant(node.input[slot])
    return int(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _per_tensor(node, index, scales: tuple[int, ...], zero_points: tuple[int, ...]) -> list[int] | None:
    """The zero points at ``zero_points`` when they and the scales at ``scales`` are constants of one
    value each (per tensor); None otherwise."""
    for slot in scales:
        value = index.constant(node.input[slot]) if _present(node, slot) else None
        if value is None or value.size != 1:
            return None
    found = [_zero_point(index, node, slot) for slot in zero_points]
    return None if any(z is None for z in found) else found


def _channel_scale(index, node, slot: int, channels: int) -> np.ndarray | None:
    """The weight scale at input ``slot`` as one float64 per output channel (per tensor or per channel)."""
    value = index.constant(node.input[slot]) if _present(node, slot) else None
    if value is None or value.size not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))


def _int_bias(index, node, slot: int, channels: int) -> np.ndarray | None:
    """The int32 bias at input ``slot`` as one value per output channel (absent: 0), None when computed
    or not one per channel (a scalar is broadcast)."""
    if not _present(node, slot):
        return np.zeros(channels, np.int64)
    value = index.constant(node.input[slot])
    if value is None or value.size not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.int64), (channels,))


def _centred(x: ChannelInfo, zero_point: int) -> ChannelInfo:
    """``x`` with the values ``x - zero_point``: a channel at its zero point reads as zero."""
    return x.with_values(x.const, x.value - zero_point)


def _at_zero_point(x: ChannelInfo, zero_point: int) -> np.ndarray:
    return x.const & (x.value == zero_point)


def _set_requantized(analysis, name: str, x: ChannelInfo, zero: np.ndarray, y_zero_point: float) -> None:
    """Tensor ``name`` carries ``x``'s ids; the channels where ``zero`` are the constant ``y_zero_point``,
    the others unknown. The analysis records the zero point (``ChannelAnalysis.zero_points``: what inspect
    counts as a zero channel of this tensor)."""
    analysis.set(name, x.with_values(zero, np.full(x.size, float(y_zero_point))))
    analysis.zero_points[name] = float(y_zero_point)


def _mark_output(analysis, name: str, zero: np.ndarray, y_zero_point: float) -> None:
    """The output of a layer: a dead channel (constant) is at ``y_zero_point`` where ``zero`` (its bias
    is 0), unknown elsewhere."""
    out = analysis.info.get(name)
    if out is not None:
        _set_requantized(analysis, name, out, out.const & zero, y_zero_point)


def _weight_masks(index, node, zero: np.ndarray, axis: int, weight_slot: int, bias_slot: int | None):
    """The weight at ``weight_slot`` with the output channels ``zero`` (along ``axis``) set to their
    weight zero point (input ``weight_slot + 2``), and the bias at ``bias_slot`` with them 0."""
    weight = index.constant(node.input[weight_slot])
    zero_point = index.constant(node.input[weight_slot + 2]) if _present(node, weight_slot + 2) else None
    if weight is None or (_present(node, weight_slot + 2) and zero_point is None):
        return None
    moved = np.moveaxis(weight.copy(), axis, 0)
    points = np.zeros(1, weight.dtype) if zero_point is None else zero_point.reshape(-1)
    moved[zero] = np.broadcast_to(points, (len(zero),))[zero].reshape(-1, *([1] * (moved.ndim - 1)))
    masks = {weight_slot: np.moveaxis(moved, 0, axis)}
    bias = index.constant(node.input[bias_slot]) if bias_slot is not None and _present(node, bias_slot) else None
    if bias is not None and bias.size == len(zero):
        masks[bias_slot] = np.where(zero.reshape(bias.shape), 0, bias).astype(bias.dtype)
    return masks


@register
class QLinearConvRule(ConvIntegerRule):
    """QLinearConv: :class:`~onnxslim.graph.rules.conv.ConvRule` on ``W - w_zp`` with the input read
    against ``x_zp`` (see the module docstring); groups as Conv; w_scale, w_zero_point and the bias are
    sliced with the filters."""

    op_types = ("QLinearConv",)
    weight_slot, channel_vector_slots, bias_slot = 3, (4, 5), 8

    def propagate(self, node, analysis):
        index = analysis.index
        x = analysis.feature(node.input[0])
        weight = self.centred(node, index)
        zero_points = _per_tensor(node, index, (1, 6), (2, 7))
        channels = weight.shape[0] if weight is not None else 0
        bias = _int_bias(index, node, 8, channels)
        if x is None or weight is None or zero_points is None or bias is None or x.axis != 1 \
                or _channel_scale(index, node, 4, channels) is None:
            analysis.barrier(node, "needs a feature input, constant weights and per-tensor activation parameters")
            return
        x_zero_point, y_zero_point = zero_points
        conv_channels(node, analysis, _centred(x, x_zero_point), weight != 0, np.zeros(channels), absorbs=False,
                      weight_slot=3)
        _mark_output(analysis, node.output[0], bias == 0, y_zero_point)

    def filters(self, node, index):
        """The real filters ``(W - w_zp) * w_s``, shape (C_out, n)."""
        weight = self.centred(node, index)
        scale = _channel_scale(index, node, 4, weight.shape[0])
        return weight.reshape(weight.shape[0], -1) * scale[:, None]

    def mask_output_channels(self, node, index, zero):
        return _weight_masks(index, node, zero, 0, 3, 8)

    def plan_notes(self, analysis, plan):
        return saturation_notes(analysis, plan, lambda rule: rule is self)

    def rewrite(self, node, rewriter):
        super().rewrite(node, rewriter)
        keep = rewriter.keep(node.output[0])
        if keep is not None:
            slice_bias(node, rewriter, keep, slot=8)


@register
class QLinearMatMulRule(MatMulIntegerRule):
    """QLinearMatMul ``(..., K) @ (K, N)`` with a constant B (per-tensor or per-column b_scale and
    b_zero_point): N output channels from B's columns; an input channel at a_zp, or one that B's rows
    ignore, goes (see the module docstring)."""

    op_types = ("QLinearMatMul",)
    weight_slot, channel_vector_slots = 3, (4, 5)
    #: (a_scale, y_scale), (a_zero_point, y_zero_point), the int32 bias
    scale_slots, zero_point_slots, bias_slot = (1, 6), (2, 7), None

    def _output_zero_point(self, node, index) -> float | None:
        """The value of an output channel at its zero point (per-tensor y parameters), else None."""
        found = _per_tensor(node, index, self.scale_slots, self.zero_point_slots)
        return None if found is None else float(found[1])

    def _fits(self, node, a) -> bool:
        return a.axis == a.rank - 1

    def propagate(self, node, analysis):
        index = analysis.index
        a = analysis.feature(node.input[0])
        matrix = self.centred(node, index)
        y_zero_point = self._output_zero_point(node, index)
        a_zero_point = _zero_point(index, node, 2)
        columns = matrix.shape[-1] if matrix is not None else 0
        bias = _int_bias(index, node, self.bias_slot, columns) if self.bias_slot else np.zeros(columns, np.int64)
        if a is None or matrix is None or matrix.ndim != 2 or matrix.shape[0] != a.size or not self._fits(node, a) \
                or y_zero_point is None or a_zero_point is None or bias is None \
                or _channel_scale(index, node, 4, columns) is None:
            analysis.barrier(node, "needs a quantized input with channels last, a constant 2-D B and per-tensor "
                                   "activation parameters")
            return
        a = _centred(a, a_zero_point)
        nonzero = matrix_output_channels(node, analysis, a, matrix, weight_slot=3)
        _mark_output(analysis, node.output[0], bias == 0, y_zero_point)
        block_reduced_channels(analysis, node, node.input[0], a, nonzero.any(axis=1), False, " (no bias absorbs it)")

    def filters(self, node, index):
        """The real columns ``(B - b_zp) * b_s``, one row per output channel."""
        matrix = self.centred(node, index)
        return (matrix * _channel_scale(index, node, 4, matrix.shape[1])[None, :]).T

    def mask_output_channels(self, node, index, zero):
        return _weight_masks(index, node, zero, 0 if self.transposed(node) else 1, 3, self.bias_slot)

    def plan_notes(self, analysis, plan):
        return saturation_notes(analysis, plan, lambda rule: rule is self)


@register
class QGemmRule(QLinearMatMulRule):
    """com.microsoft QGemm ``alpha * A @ B' + C`` (transA = 0, B' = B or B^T) on an (M, K) feature with
    an int32 bias C per column; the output is integer with y_scale, float without (then a dead column
    is the float 0)."""

    domain, op_types = CONTRIB, ("QGemm",)
    scale_slots, zero_point_slots, bias_slot, channel_vector_slots = (1, 7), (2, 8), 6, (4, 5, 6)

    def transposed(self, node) -> bool:
        return bool(get_attr(node, "transB", 0))

    def _output_zero_point(self, node, index):
        if not _present(node, 7):  # float output: no requantization
            return 0.0 if _per_tensor(node, index, (1,), (2,)) is not None else None
        return super()._output_zero_point(node, index)

    def _fits(self, node, a) -> bool:
        return a.rank == 2 and a.axis == 1 and not get_attr(node, "transA", 0)


def _binary_operand(analysis, node, slot: int, zero_point: int, axis: int, rank: int, channels: int):
    """(at zero point per output channel, feature info or None) of QLinearAdd / QLinearMul's operand at
    ``slot``: a feature spanning the channels, a feature or constant broadcast along them, or a constant
    with one slice per channel (at its zero point where the whole slice is)."""
    info = analysis.feature(node.input[slot])
    if info is not None:
        zero = _at_zero_point(info, zero_point)
        return (zero if info.size == channels else np.repeat(zero[:1], channels)), info
    constant = analysis.index.constant(node.input[slot])
    caxis = axis - (rank - constant.ndim)
    if caxis < 0 or constant.shape[caxis] == 1:
        return np.full(channels, bool(np.all(constant == zero_point))), None
    slices = np.moveaxis(constant, caxis, 0).reshape(channels, -1)
    return (slices == zero_point).all(axis=1), None


@register
class QLinearBinaryRule(Rule):
    """com.microsoft QLinearAdd / QLinearMul with numpy broadcasting: feature operands spanning the
    channels are coupled (a residual add, SE gating); a feature with one channel broadcast over them (a
    spatial gate) is kept; a constant operand with one slice per channel is sliced. An output channel is
    at its zero point when both operands' are (Add) or one is (Mul)."""

    domain, op_types, passthrough = CONTRIB, ("QLinearAdd", "QLinearMul"), True

    def _layout(self, node, analysis):
        """(features, channel axis, output rank, channels) or None when the operands do not line up."""
        index = analysis.index
        features = [info for info in (analysis.feature(node.input[s]) for s in (0, 3)) if info is not None]
        constants = [index.constant(node.input[s]) for s in (0, 3) if analysis.feature(node.input[s]) is None]
        if not features or any(c is None for c in constants):
            return None
        rank = max([f.rank for f in features] + [c.ndim for c in constants])
        axes = {aligned_axis(f.axis, f.rank, rank) for f in features}
        if len(axes) != 1 or any(f.rank != rank for f in features):
            return None
        axis = axes.pop()
        channels = max(f.size for f in features)
        sizes = [f.size for f in features] + [c.shape[axis - (rank - c.ndim)] for c in constants if axis - (rank - c.ndim) >= 0]
        return (features, axis, rank, channels) if all(s in (1, channels) for s in sizes) else None

    def propagate(self, node, analysis):
        zero_points = _per_tensor(node, analysis.index, (1, 4, 6), (2, 5, 7))
        layout = self._layout(node, analysis)
        if zero_points is None or layout is None:
            analysis.barrier(node, "needs per-tensor parameters and operands that line up on the channel axis")
            return
        features, axis, rank, channels = layout
        zeros, full = [], []
        for slot, zero_point in ((0, zero_points[0]), (3, zero_points[1])):
            zero, info = _binary_operand(analysis, node, slot, zero_point, axis, rank, channels)
            zeros.append(zero)
            if info is not None and info.size == channels:
                full.append(info)
            elif info is not None:
                analysis.keep(info.ids, BARRIER, f"{node.op_type} '{analysis.index.node_name(node)}' broadcasts "
                                                 f"'{node.input[slot]}' over {channels} channels")
        if not full:
            keep_all(analysis, node, features[0], "only a constant spans the channel axis")
            return
        for other in full[1:]:
            analysis.couple(full[0].ids, other.ids)
        zero = zeros[0] & zeros[1] if node.op_type == "QLinearAdd" else zeros[0] | zeros[1]
        base = ChannelInfo(full[0].ids, axis, rank, zero, np.zeros(channels))
        _set_requantized(analysis, node.output[0], base, zero, zero_points[2])

    def rewrite(self, node, rewriter):
        keep, out = rewriter.keep(node.output[0]), rewriter.info(node.output[0])
        if keep is None or keep.all():
            return
        for slot in (0, 3):
            constant = rewriter.index.constant(node.input[slot])
            caxis = out.axis - (out.rank - constant.ndim) if constant is not None else -1
            if caxis >= 0 and constant.shape[caxis] == len(keep):
                rewriter.weights.write(node, slot, np.compress(keep, constant, axis=caxis),
                                       key=("take", caxis, keep.tobytes()))


@register
class QLinearConcatRule(Rule):
    """com.microsoft QLinearConcat(Y_scale, Y_zp, (X, X_scale, X_zp)...): Concat of requantized feature
    inputs; on the channel axis an input that loses every channel is dropped with its parameters, on
    another axis the inputs' channels are coupled. A channel at its input's zero point is at Y_zp."""

    domain, op_types, passthrough = CONTRIB, ("QLinearConcat",), True

    def propagate(self, node, analysis):
        index = analysis.index
        count = (len(node.input) - 2) // 3
        zero_points = _per_tensor(node, index, tuple(range(0, 3 * count + 2, 3)), tuple(range(1, 3 * count + 2, 3)))
        infos = [analysis.feature(name) for name in node.input[2::3]]
        if zero_points is None or not infos or any(i is None for i in infos) \
                or any(i.axis != infos[0].axis or i.rank != infos[0].rank for i in infos):
            analysis.barrier(node, "needs feature inputs on one channel axis and per-tensor parameters")
            return
        y_zero_point, first = zero_points[0], infos[0]
        zeros = [_at_zero_point(info, zp) for info, zp in zip(infos, zero_points[1:])]
        if normalize_axis(get_attr(node, "axis", 0), first.rank) == first.axis:
            out = first.with_values(np.concatenate(zeros), np.zeros(sum(i.size for i in infos)))
            out.ids = np.concatenate([i.ids for i in infos])
            _set_requantized(analysis, node.output[0], out, out.const, y_zero_point)
            return
        if any(i.size != first.size for i in infos):
            analysis.barrier(node, "inputs have different channel counts")
            return
        for info in infos[1:]:
            analysis.couple(first.ids, info.ids)
        _set_requantized(analysis, node.output[0], first, np.logical_and.reduce(zeros), y_zero_point)

    def allows_empty_input(self, node, slot, plan):
        return True

    def rewrite(self, node, rewriter):
        kept = [i for i in range(2, len(node.input), 3) if not rewriter.plan.is_empty(node.input[i])]
        if len(kept) * 3 + 2 != len(node.input):
            inputs = list(node.input[:2]) + [name for i in kept for name in node.input[i:i + 3]]
            del node.input[:]
            node.input.extend(inputs)


@register
class QLinearUnaryRule(Rule):
    """com.microsoft QLinearGlobalAveragePool, QLinearAveragePool (channels on axis 1, or last with
    ``channels_last=1``), QLinearLeakyRelu and QLinearSigmoid (X, X_scale, X_zp, Y_scale, Y_zp): channels
    pass; one at X_zp is at Y_zp, except through QLinearSigmoid (``sigmoid(0) = 1/2``)."""

    domain, passthrough = CONTRIB, True
    op_types = ("QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearSigmoid")

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        zero_points = _per_tensor(node, analysis.index, (1, 3), (2, 4))
        pools = node.op_type.endswith("Pool")
        if zero_points is None or (pools and x.axis != (x.rank - 1 if get_attr(node, "channels_last", 0) else 1)):
            analysis.barrier(node, "needs per-tensor parameters (pools: channels on the axis channels_last names)")
            return
        zero = _at_zero_point(x, zero_points[0]) if node.op_type != "QLinearSigmoid" else np.zeros(x.size, bool)
        _set_requantized(analysis, node.output[0], x, zero, zero_points[1])
