"""Ops that work on each channel's spatial plane separately: channels pass through one-to-one.

Constant channels: ``max``/``min``/``mean`` of a constant is that constant, so MaxPool, global pooling
and AveragePool that excludes padding keep them (reductions: see :mod:`onnxslim.graph.rules.reduce`).
AveragePool counting zero padding and LpPool keep only zero. Resize (nearest or linear) and
Upsample interpolate between equal values and keep constants; cubic keeps only zero; a
``tf_crop_and_resize`` box past the input keeps only the constant equal to its extrapolation value. Pad keeps a
constant ``v`` when it pads with ``v`` (or replicates edges); constant padding of the channel axis adds
channels that hold the fill value (see :class:`PadRule`).

Softmax and the like over a spatial axis pass channels through; over the channel axis they are barriers.
CumSum along a spatial axis keeps only zero.
"""

from __future__ import annotations

import numpy as np

from onnxslim.graph.model import get_attr, set_attr
from onnxslim.graph.rules.base import (
    Rule,
    feature_or_barrier,
    inputs_nonnegative,
    keep_extra_outputs,
    normalize_axis,
    pass_through,
    register,
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
        if x.axis != 1:
            analysis.barrier(node, "channel axis is not axis 1")
            return
        if keep_extra_outputs(node, analysis, 1, "its indices output is read"):
            return
        keeps_constants = node.op_type in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool")
        if node.op_type == "AveragePool":
            padded = any(get_attr(node, "pads") or []) or _string(get_attr(node, "auto_pad", b"NOTSET")).startswith("SAME")
            keeps_constants = not (padded and get_attr(node, "count_include_pad", 0))
        const = x.const if keeps_constants else x.zero
        pass_through(node, analysis, x.with_values(const, x.value))

    def commutes_with_positive_scale(self, node):
        return node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")

    def nonnegative(self, node, analysis):
        """LpPool and GlobalLpPool are p-norms ``(sum |x|^p)^(1/p)``: always >= 0 (ONNX LpPool-18). The
        max and average pools take a max or a mean of input elements (padding is ignored by MaxPool and
        is 0 for AveragePool; MaxPool's indices are >= 0): >= 0 when the input is."""
        return node.op_type in ("LpPool", "GlobalLpPool") or inputs_nonnegative(node, analysis)


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


def _pad_operands(node, index):
    """(pads as a flat int array, axes they apply to or None for all, fill) of a Pad; pads None when
    computed (or its ``axes`` are), fill None when computed."""
    fill = _pad_fill(node, index)
    pads = get_attr(node, "pads")
    if pads is not None:
        return np.reshape(np.asarray(pads, np.int64), -1), None, fill
    pads = index.constant(node.input[1]) if len(node.input) > 1 else None
    has_axes = len(node.input) > 3 and bool(node.input[3])
    axes = index.constant(node.input[3]) if has_axes else None
    if pads is None or (has_axes and axes is None):
        return None, None, fill
    return np.reshape(pads, -1).astype(np.int64), None if axes is None else np.reshape(axes, -1), fill


def _channel_pads(node, index, x) -> tuple[int, int, int] | None:
    """(position of the channel axis in ``pads``, channels padded before, after) — (-1, 0, 0) when the
    channel axis is not padded; None when pads, axes or fill are computed."""
    pads, axes, fill = _pad_operands(node, index)
    if pads is None or fill is None:
        return None
    axes = list(range(x.rank)) if axes is None else [normalize_axis(int(a), x.rank) for a in axes]
    half = len(pads) // 2
    for position, axis in enumerate(axes[:half]):
        if axis == x.axis and (pads[position] or pads[position + half]):
            return position, int(pads[position]), int(pads[position + half])
    return -1, 0, 0


@register
class PadRule(Rule):
    """Pad (ONNX Pad-2 ... Pad-18). Spatial padding passes channels through. Padding the channel axis with
    a constant ``v`` (ResNet's CIFAR "option A" shortcut ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``)
    adds ``before`` and ``after`` new channels that hold ``v`` everywhere: each is a fresh channel, the
    constant ``v``, and the rewrite pads only as many as are kept (they are all alike). Negative channel
    pads (a crop) and the reflect / edge / wrap modes on the channel axis are barriers."""

    op_types = ("Pad",)
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        found = _channel_pads(node, analysis.index, x)
        if found is None:
            analysis.barrier(node, "pads or fill value are computed")
            return
        fill = _pad_fill(node, analysis.index)
        mode = _string(get_attr(node, "mode", b"constant"))
        _, before, after = found
        if (before or after) and (mode != "constant" or before < 0 or after < 0):
            analysis.barrier(node, f"pads the channel axis ({mode}, {before} before, {after} after)")
            return
        const = x.const & (x.value == fill) if mode == "constant" else x.const
        info = x.with_values(const, x.value)
        if before or after:
            parts = [analysis.fresh(None, "", n, x.axis, x.rank, np.ones(n, bool), np.full(n, fill))
                     for n in (before, after)]
            info.ids = np.concatenate([parts[0].ids, x.ids, parts[1].ids])
            info.const = np.concatenate([parts[0].const, const, parts[1].const])
            info.value = np.concatenate([parts[0].value, info.value, parts[1].value])
        pass_through(node, analysis, info)

    def allows_empty_input(self, node, slot, plan):
        return slot == 0 and plan.is_empty(node.output[0])

    def rewrite(self, node, rewriter):
        x = rewriter.info(node.input[0])
        keep = rewriter.keep(node.output[0])
        found = None if x is None else _channel_pads(node, rewriter.index, x)
        if keep is None or found is None or found[0] < 0 or keep.all():
            return
        position, before, after = found
        pads, _, _ = _pad_operands(node, rewriter.index)
        pads = pads.copy()
        pads[position], pads[position + len(pads) // 2] = keep[:before].sum(), keep[len(keep) - after:].sum()
        if get_attr(node, "pads") is not None:
            set_attr(node, "pads", [int(p) for p in pads])
        else:
            rewriter.weights.write(node, 1, pads, key=("pads", pads.tobytes()))

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
