"""Ops that work on each channel's spatial plane separately: channels pass through one-to-one.

Constant channels: ``max``/``min``/``mean`` of a constant is that constant, so MaxPool, global pooling
and AveragePool that excludes padding keep them (reductions: see :mod:`onnxslim.graph.rules.reduce`).
AveragePool counting zero padding and LpPool keep only zero. Resize (nearest or linear) and
Upsample interpolate between equal values and keep constants; cubic keeps only zero; a
``tf_crop_and_resize`` box past the input keeps only the constant equal to its extrapolation value. Pad keeps a
constant ``v`` when it pads with ``v`` (or replicates edges); constant-mode padding of the channel axis adds
channels holding the fill (a Concat of constants), which may go like any other.

A pool whose channel axis is one of its pooled axes (channels last after a Transpose) with a window of
one channel there and stride s reads channels 0, s, 2s, ... each alone: those pass, the others are dead
(LPRNet's channel subsampling ``MaxPool3d((1, 3, 3), (2, 1, 2))``). The rewrite sets the stride that
picks the kept read channels, or reads them through a Gather with stride 1 where they are no longer
evenly spaced; a window of more than one channel is a barrier.

Softmax and the like over a spatial axis pass channels through; over the channel axis they are barriers.
CumSum along a spatial axis keeps only zero.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxslim.graph.model import get_attr, set_attr
from onnxslim.graph.rules.base import (
    Rule,
    feature_or_barrier,
    gather_input,
    inputs_nonnegative,
    keep_extra_outputs,
    normalize_axis,
    pass_through,
    register,
    write_int_operand,
)
from onnxslim.graph.shape_values import as_int, is_dim_of, shape_value


def _string(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


@register
class PoolRule(Rule):
    op_types = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        stride = 1
        if x.axis != 1:
            stride = _channel_stride(node, analysis, x)
            if stride is None:
                analysis.barrier(node, "pools across channels (the channel axis is a pooled axis, kernel > 1)")
                return
        if keep_extra_outputs(node, analysis, 1, "its indices output is read"):
            return
        keeps_constants = node.op_type in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool")
        if node.op_type == "AveragePool":
            padded = any(get_attr(node, "pads") or []) or _string(get_attr(node, "auto_pad", b"NOTSET")).startswith("SAME")
            keeps_constants = not (padded and get_attr(node, "count_include_pad", 0))
        const = x.const if keeps_constants else x.zero
        info = x.with_values(const, x.value)
        pass_through(node, analysis, info if stride == 1 else info.take(np.arange(0, x.size, stride)))

    def rewrite(self, node, rewriter):
        x = rewriter.info(node.input[0])
        keep = rewriter.keep(node.input[0])
        if x is None or x.axis == 1 or keep is None or keep.all():
            return
        stride = _channel_stride(node, rewriter.analysis, x)
        read = np.arange(0, x.size, stride)
        new = (np.cumsum(keep) - 1)[read[keep[read]]]
        count, slot = int(keep.sum()), x.axis - 2
        step = int(new[1] - new[0]) if len(new) > 1 else max(count, 1)
        strides = list(get_attr(node, "strides") or [1] * (x.rank - 2))
        exact = not get_attr(node, "ceil_mode", 0) or (count - 1) % step == 0
        if len(new) and (new == np.arange(len(new)) * step).all() and (count - 1) // step + 1 == len(new) and exact:
            strides[slot] = step  # the kept channels that are read are still every step-th one
        else:
            gather_input(node, rewriter, x.axis, new)
            strides[slot] = 1
        set_attr(node, "strides", [int(v) for v in strides])

    def commutes_with_positive_scale(self, node):
        return node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")

    def nonnegative(self, node, analysis):
        """LpPool and GlobalLpPool are p-norms ``(sum |x|^p)^(1/p)``: always >= 0 (ONNX LpPool-18). The
        max and average pools take a max or a mean of input elements (padding is ignored by MaxPool and
        is 0 for AveragePool; MaxPool's indices are >= 0): >= 0 when the input is."""
        return node.op_type in ("LpPool", "GlobalLpPool") or inputs_nonnegative(node, analysis)


def _channel_stride(node, analysis, x) -> int | None:
    """The stride along the channel axis of a MaxPool / AveragePool / LpPool whose channel axis is one of
    its pooled axes, when its window there is one channel without padding: output channel ``j`` is the
    pool of input channel ``j * stride`` alone (TorchScript's ``MaxPool3d((1, 3, 3), (2, 1, 2))`` on a
    4-D map, LPRNet, is ``Transpose -> MaxPool((1, 1), strides (1, 2)) -> Transpose``). None when the
    window mixes channels, pads them, or ``ceil_mode`` could add a window past the last channel."""
    if node.op_type.startswith("Global") or x.axis < 2:
        return None
    slot, spatial = x.axis - 2, x.rank - 2
    kernel = get_attr(node, "kernel_shape") or []
    pads = get_attr(node, "pads") or [0] * (2 * spatial)
    stride = int((get_attr(node, "strides") or [1] * spatial)[slot])
    if len(kernel) != spatial or kernel[slot] != 1 or pads[slot] or pads[slot + spatial]:
        return None
    if get_attr(node, "ceil_mode", 0) and (x.size - 1) % stride:
        return None
    return stride


@register
class ResizeRule(Rule):
    """Resize (opset 10+: X, roi, scales, sizes) and Upsample (scales attribute or input).

    From opset 18 an ``axes`` attribute says which axes ``scales`` / ``sizes`` (and ``roi``) list: a
    channel axis not among them is not resized; one among them is read at its position in the list.

    ``coordinate_transformation_mode="tf_crop_and_resize"`` (ONNX Resize-11..19) samples the box ``roi``
    = [starts..., ends...] (normalised coordinates) and writes ``extrapolation_value`` (default 0) where
    the box reaches past the input: a constant channel ``v`` stays ``v`` only when ``v`` is that value, and
    the channel axis must have the box (0, 1) (any other crops and interpolates across channels).
    """

    op_types = ("Resize", "Upsample")
    passthrough = True

    def _scales_and_sizes(self, node, analysis):
        index = analysis.index
        scales = get_attr(node, "scales")
        sizes = None
        if node.op_type == "Upsample" or index.opset == 10:
            if scales is None and len(node.input) > 1:
                scales = index.constant(node.input[1])
        else:
            if len(node.input) > 2 and node.input[2]:
                scales = index.constant(node.input[2])
                if scales is None:
                    return None, None, False
            if len(node.input) > 3 and node.input[3]:
                sizes = shape_value(index, node.input[3])
                if sizes is None:
                    return None, None, False
        return scales, sizes, True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        scales, sizes, known = self._scales_and_sizes(node, analysis)
        if not known:
            analysis.barrier(node, "scales/sizes are computed")
            return
        position = _channel_position(node, x)
        if position is not None and scales is not None and len(np.reshape(scales, -1)) \
                and np.reshape(scales, -1)[position] != 1:
            analysis.barrier(node, "resizes the channel axis")
            return
        if position is not None and sizes is not None:
            # the channel entry must follow the input at run time, or be a constant we can rewrite
            entry = sizes[position]
            follows = is_dim_of(entry, node.input[0], x.axis)
            if not follows and not (as_int(entry) == x.size and analysis.index.is_const(node.input[3])):
                analysis.barrier(node, "resizes the channel axis (or fixes it in a computed size)")
                return
        mode = _string(get_attr(node, "mode", b"nearest"))
        const = x.const if mode in ("nearest", "linear", "bilinear") else x.zero
        if _string(get_attr(node, "coordinate_transformation_mode", b"")) == "tf_crop_and_resize":
            if not _crops_only_spatially(node, analysis, position):
                analysis.barrier(node, "crops the channel axis (its roi is not the box (0, 1) or is computed)")
                return
            const = const & (x.value == get_attr(node, "extrapolation_value", 0.0))
        pass_through(node, analysis, x.with_values(const, x.value))

    def nonnegative(self, node, analysis):
        """Nearest and linear modes (Resize-19, Upsample) give input elements or convex combinations of
        them (the linear filter, antialiased too, has weights >= 0): >= 0 when the input is and, in
        ``tf_crop_and_resize``, the extrapolation value is >= 0. Cubic weights are negative: not provable."""
        if _string(get_attr(node, "mode", b"nearest")) not in ("nearest", "linear", "bilinear"):
            return False
        if _string(get_attr(node, "coordinate_transformation_mode", b"")) == "tf_crop_and_resize" \
                and not get_attr(node, "extrapolation_value", 0.0) >= 0:
            return False
        return inputs_nonnegative(node, analysis)

    def rewrite(self, node, rewriter):
        keep = rewriter.keep(node.output[0])
        if keep is None or keep.all() or node.op_type != "Resize" or len(node.input) < 4 or not node.input[3] \
                or not rewriter.index.is_const(node.input[3]):
            return  # computed sizes follow the input's channels at run time
        position = _channel_position(node, rewriter.info(node.output[0]))
        if position is None:
            return  # the channel axis is not listed
        sizes = rewriter.index.constant(node.input[3]).copy()
        sizes[position] = int(keep.sum())
        rewriter.weights.write(node, 3, sizes, key=("sizes", sizes.tobytes()))


def _crops_only_spatially(node, analysis, position: int | None) -> bool:
    """The roi of a ``tf_crop_and_resize`` Resize (input 1: [starts..., ends...], one pair per listed axis)
    gives the channel axis (listed at ``position``) the box (0, 1), which maps every channel onto itself."""
    if position is None:
        return True
    roi = analysis.index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if roi is None or roi.size % 2 or position >= roi.size // 2:
        return False  # an empty or short roi (the spec asks for one pair per axis): not provable
    roi = roi.reshape(-1)
    return bool(roi[position] == 0 and roi[position + roi.size // 2] == 1)


def _channel_position(node, x) -> int | None:
    """Where the channel axis is in Resize's ``scales`` / ``sizes``: its axis, or its place in ``axes``
    (opset 18); None when ``axes`` does not list it."""
    axes = get_attr(node, "axes")
    if axes is None:
        return x.axis
    axes = [a + x.rank if a < 0 else a for a in axes]
    return axes.index(x.axis) if x.axis in axes else None


def _pad_fill(node, index) -> float | None:
    """The value a constant-mode Pad writes (attribute ``value`` before opset 11, input 2 from opset 11;
    default 0), or None when it is computed."""
    if get_attr(node, "pads") is not None or len(node.input) < 3 or not node.input[2]:
        return get_attr(node, "value", 0.0)
    fill = index.constant(node.input[2])
    return None if fill is None else float(np.reshape(fill, -1)[0]) if np.size(fill) else 0.0


def _pad_operands(node, index, rank: int) -> tuple[np.ndarray, int | None] | None:
    """The flat ``pads`` of a Pad ([begins..., ends...], one pair per padded axis; attribute before
    opset 11, input 1 from opset 11, with the axes of input 3 from opset 18) and ``axes[i]``, the axis
    of pair ``i``; None when the pads or axes are computed."""
    pads = get_attr(node, "pads")
    axes = None
    if pads is None:
        pads = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if len(node.input) > 3 and node.input[3]:
            axes = index.constant(node.input[3])
            if axes is None:
                return None
    if pads is None:
        return None
    pads = np.asarray(np.reshape(pads, -1), np.int64)
    axes = list(range(rank)) if axes is None else [normalize_axis(int(a), rank) for a in np.reshape(axes, -1)]
    return pads, axes


def _channel_pads(node, index, x) -> tuple[np.ndarray, int | None] | None:
    """(flat pads, position of the channel axis' begin entry in them or None when it is not padded), or
    None when the pads are computed."""
    operands = _pad_operands(node, index, x.rank)
    if operands is None:
        return None
    pads, axes = operands
    half = len(pads) // 2
    position = axes.index(x.axis) if x.axis in axes[:half] else None
    if position is not None and not (pads[position] or pads[position + half]):
        position = None
    return pads, position


@register
class PadRule(Rule):
    """Pad (ONNX Pad-1..23). Spatial padding passes channels through; a constant ``v`` stays ``v`` when
    the fill is ``v`` or only the channel axis is padded (constant mode), or the mode copies input elements
    (reflect, edge, wrap).

    Constant-mode padding of the channel axis by ``b`` before and ``e`` after (BlazeFace's
    ``F.pad(x, (0, 0, 0, 0, 0, c_out - c_in))`` before a residual Add) is
    ``Concat([fill] * b, x, [fill] * e)``: the output carries ``x``'s channels between ``b`` and ``e``
    new channels, each the constant fill. A deleted pad channel leaves the pads (the rewrite counts the
    kept ones). Padding the channel axis in another mode (copies of channels) or cropping it (negative
    pads) is a barrier.
    """

    op_types = ("Pad",)
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        operands = _channel_pads(node, analysis.index, x)
        fill = _pad_fill(node, analysis.index)
        if operands is None or fill is None:
            analysis.barrier(node, "pads or fill value are computed")
            return
        mode = _string(get_attr(node, "mode", b"constant"))
        pads, position = operands
        half = len(pads) // 2
        writes_fill = mode == "constant" and any(pads[i] or pads[i + half] for i in range(half) if i != position)
        info = x.with_values(x.const & (x.value == fill) if writes_fill else x.const, x.value)
        if position is None:
            pass_through(node, analysis, info)
            return
        before, after = int(pads[position]), int(pads[position + half])
        if mode != "constant" or before < 0 or after < 0:
            analysis.barrier(node, f"pads the channel axis ({mode} mode)" if mode != "constant"
                             else "crops the channel axis (negative pads)")
            return
        parts = [analysis.fresh(None, "", n, x.axis, x.rank, np.ones(n, bool), np.full(n, fill))
                 for n in (before, after)]
        info = dataclasses.replace(
            info, ids=np.concatenate([parts[0].ids, info.ids, parts[1].ids]),
            const=np.concatenate([parts[0].const, info.const, parts[1].const]),
            value=np.concatenate([parts[0].value, info.value, parts[1].value]))
        analysis.set(node.output[0], info)

    def allows_empty_input(self, node, slot, plan):
        """The input may lose every channel only when the output does (the node goes); a channel pad
        would otherwise pad nothing into channels."""
        return plan.is_empty(node.output[0])

    def rewrite(self, node, rewriter):
        keep = rewriter.keep(node.output[0])
        x = rewriter.info(node.input[0])
        if keep is None or keep.all() or x is None:
            return
        pads, position = _channel_pads(node, rewriter.index, x)
        if position is None:
            return
        end = position + len(pads) // 2
        new = pads.copy()
        new[position] = int(keep[: pads[position]].sum())
        new[end] = int(keep[len(keep) - pads[end]:].sum())
        write_int_operand(node, rewriter, "pads", 1, new)

    def nonnegative(self, node, analysis):
        """Pad-18 copies its input and writes the fill value (constant mode) or input elements (reflect,
        edge, wrap): >= 0 when the input is and, in constant mode, the fill is a constant >= 0."""
        if _string(get_attr(node, "mode", b"constant")) == "constant":
            fill = _pad_fill(node, analysis.index)
            if fill is None or not fill >= 0:
                return False
        return inputs_nonnegative(node, analysis)


@register
class CumSumRule(Rule):
    """CumSum (ONNX CumSum-14) along a constant axis other than the channel axis sums within each channel:
    channels pass, zero stays zero (a sum of zeros), another constant does not; along the channel axis it
    mixes channels (a barrier)."""

    op_types = ("CumSum",)
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        axis = analysis.index.constant(node.input[1]) if len(node.input) > 1 else None
        if axis is None or axis.size != 1:
            analysis.barrier(node, "its axis is computed")
        elif normalize_axis(int(axis.reshape(-1)[0]), x.rank) == x.axis:
            analysis.barrier(node, "sums across the channel axis")
        else:
            pass_through(node, analysis, x.with_values(x.zero, np.zeros(x.size)))

    def nonnegative(self, node, analysis):
        """Sums (exclusive: from 0) of elements >= 0 are >= 0."""
        return inputs_nonnegative(node, analysis)


@register
class SoftmaxRule(Rule):
    op_types = ("Softmax", "LogSoftmax", "Hardmax")
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        default = -1 if analysis.index.opset >= 13 else 1
        axis = normalize_axis(get_attr(node, "axis", default), x.rank)
        if analysis.index.opset < 13 and axis <= x.axis:  # old softmax flattens from `axis` on
            analysis.barrier(node, "normalises across the channel axis")
            return
        if axis == x.axis:
            analysis.barrier(node, "normalises across the channel axis")
            return
        pass_through(node, analysis, x.unknown_values())

    def nonnegative(self, node, analysis):
        """Softmax ``exp(x) / sum exp(x)`` and Hardmax (0 or 1) are >= 0 for every input (ONNX Softmax-13,
        Hardmax-13); LogSoftmax is <= 0."""
        return node.op_type in ("Softmax", "Hardmax")
