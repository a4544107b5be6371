"""Normalisations.

BatchNormalization (inference form) is a per-channel affine map, channels pass through::

    y[c] = scale[c] * (x[c] - mean[c]) / sqrt(var[c] + eps) + B[c]

so a constant channel ``v`` stays constant, and zero becomes the shift ``B - scale * mean / sigma`` —
usually not zero, which is why masks belong *after* BN. Its four parameter vectors are sliced.

InstanceNormalization normalises each channel over space: a constant channel normalises to 0, so its
output is the constant ``B[c]``; parameters are sliced.

LayerNormalization over axes that exclude the channel axis passes channels through (its parameters are
not per channel). GroupNormalization couples the channels of each group (whole groups go).
LpNormalization divides by a p-norm: over the channel axis a zero channel adds nothing to the norm, so
zero channels go and the others stay. Normalisations that mix channels otherwise — LRN,
LayerNormalization over the channel axis — are barriers.
"""

from __future__ import annotations

import numpy as np

from onnxslim.graph.model import get_attr, set_attr
from onnxslim.graph.rules.base import (
    BarrierRule,
    Rule,
    block_reduced_channels,
    feature_or_barrier,
    inputs_nonnegative,
    keep_extra_outputs,
    normalize_axis,
    pass_through,
    register,
    scale_vector,
)


def _fold_scale(node, index, weights, s) -> bool:
    """``scale *= s, B *= s``: the normalised channel is multiplied by ``s`` (both constant)."""
    if any(index.constant(name) is None for name in node.input[1:3]):
        return False
    scale_vector(index, weights, node, 1, s)
    scale_vector(index, weights, node, 2, s)
    return True


def share_parameters(node, analysis, ids, slots) -> None:
    """Nodes reading one per-channel parameter initializer (a BN shared by the levels of an FPN head)
    must slice it alike: couple their channels, so that the parameter stays one tensor.

    Only a node's twins are coupled — nodes of the same op reading the same initializer at every one of
    ``slots`` (the same module applied again); an exporter that merged equal constants of unrelated
    layers (all-ones scales) does not tie those layers together (they get their own slices instead)."""
    names = tuple(node.input[slot] if slot < len(node.input) else "" for slot in slots)
    if not names or not names[0] or len(analysis.index.uses(names[0])) < 2:
        return
    twin = all(use.node.op_type == node.op_type and
               tuple(use.node.input[s] if s < len(use.node.input) else "" for s in slots) == names
               for use in analysis.index.uses(names[0]) if use.slot == slots[0])
    if twin:
        analysis.share_weight(f"{node.op_type}:{names}", ids, ids)


def _slice_parameters(node, rewriter, slots) -> None:
    keep = rewriter.keep(node.output[0])
    if keep is None or keep.all():
        return
    for slot in slots:
        if slot < len(node.input) and node.input[slot]:
            value = rewriter.index.constant(node.input[slot])
            if value is not None and value.ndim >= 1 and value.shape[0] == len(keep):
                rewriter.weights.write(node, slot, value[keep], key=("take", 0, keep.tobytes()))


@register
class BatchNormRule(Rule):
    op_types = ("BatchNormalization",)
    passthrough = True

    def propagate(self, node, analysis):
        x = analysis.feature(node.input[0])
        params = [analysis.index.constant(name) for name in node.input[1:5]]
        if x is None or x.axis != 1 or any(p is None for p in params) or len(params) != 4:
            analysis.barrier(node, "needs a feature input and constant parameters")
            return
        if get_attr(node, "training_mode", 0):
            analysis.barrier(node, "training mode")
            return
        if keep_extra_outputs(node, analysis, 1, "training outputs are read"):
            return
        share_parameters(node, analysis, x.ids, (1, 2, 3, 4))
        scale, bias, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        eps = get_attr(node, "epsilon", 1e-5)
        with np.errstate(all="ignore"):
            value = scale * (x.value - mean) / np.sqrt(var + eps) + bias
        pass_through(node, analysis, x.with_values(x.const & np.isfinite(value), value))

    def rewrite(self, node, rewriter):
        _slice_parameters(node, rewriter, (1, 2, 3, 4))

    def nonnegative(self, node, analysis):
        """``y = s x + t`` per channel with ``s = scale / sqrt(var + eps)``, ``t = B - s mean``: >= 0 for
        every ``x >= 0`` when ``s >= 0`` and ``t >= 0``. ``t`` must clear a margin of ``1e-6 (|B| + |s mean|)``
        so that float32 rounding, in any order a runtime evaluates the affine map, cannot push it below 0.
        (After a conv, a BN's input has either sign: usually not provable.)"""
        params = [analysis.index.constant(name) for name in node.input[1:5]]
        if len(params) != 4 or any(p is None for p in params) or get_attr(node, "training_mode", 0) \
                or not inputs_nonnegative(node, analysis):
            return False
        scale, bias, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        with np.errstate(all="ignore"):
            s = scale / np.sqrt(var + get_attr(node, "epsilon", 1e-5))
            shift = bias - s * mean
        return bool(np.all(s >= 0) and np.all(shift >= 1e-6 * (np.abs(bias) + np.abs(s * mean))))

    masks_go_after = True

    def channel_gains(self, node, index):
        """gamma (input 1): the ``bn`` criterion of Network Slimming (Liu et al. 2017) ranks by |gamma|."""
        gamma = index.constant(node.input[1])
        return None if gamma is None else gamma.astype(np.float64)

    def fold_output_scale(self, node, index, weights, s):
        return _fold_scale(node, index, weights, s)


@register
class InstanceNormRule(Rule):
    op_types = ("InstanceNormalization",)
    passthrough = True

    def propagate(self, node, analysis):
        x = analysis.feature(node.input[0])
        scale, bias = (analysis.index.constant(name) for name in node.input[1:3])
        if x is None or x.axis != 1 or scale is None or bias is None:
            analysis.barrier(node, "needs a feature input and constant parameters")
            return
        share_parameters(node, analysis, x.ids, (1, 2))
        # (v - mean) is exactly 0 only for a zero channel; other constants could round to tiny values
        pass_through(node, analysis, x.with_values(x.zero, bias.astype(np.float64)))

    def rewrite(self, node, rewriter):
        _slice_parameters(node, rewriter, (1, 2))

    def fold_output_scale(self, node, index, weights, s):
        return _fold_scale(node, index, weights, s)


@register
class LayerNormRule(Rule):
    op_types = ("LayerNormalization",)
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        axis = normalize_axis(get_attr(node, "axis", -1), x.rank)
        if axis <= x.axis:
            analysis.barrier(node, "normalises over the channel axis")
            return
        if keep_extra_outputs(node, analysis, 1, "mean / inv-std outputs are read"):
            return
        bias = analysis.index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        zero_bias = bias is None or not np.any(bias)
        pass_through(node, analysis, x.with_values(x.zero & zero_bias, np.zeros(x.size)))


@register
class LpNormRule(Rule):
    """LpNormalization (ONNX LpNormalization-1): ``y = x / ||x||_p`` along ``axis`` (default -1), p 1 or 2.

    Along a non-channel axis, output channel ``c`` reads input channel ``c`` only: channels pass through,
    and a zero channel stays zero (onnxruntime returns 0 for a zero norm, and the spec gives no epsilon).
    Along the channel axis (SSD's L2Norm on conv4_3, Paddle2ONNX's ``normalize``) every output reads the
    norm of all channels; a zero channel adds ``|0|^p = 0`` to it and comes out zero, so deleting zero
    channels from input and output together is exact, while every non-zero channel is kept (it is in the
    norm of the others).
    """

    op_types = ("LpNormalization",)
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        if normalize_axis(get_attr(node, "axis", -1), x.rank) == x.axis:
            block_reduced_channels(analysis, node, node.input[0], x, np.ones(x.size, bool), absorbs_constants=False)
        pass_through(node, analysis, x.with_values(x.zero, np.zeros(x.size)))

    def reduction(self, node, slot):
        """"full": along the channel axis every channel is in the norm (a mask put before it by ``prune``
        changes the others)."""
        return "full"


@register
class GroupNormRule(Rule):
    """GroupNormalization: channel ``c`` of group ``k = c // (C/G)`` is normalised with the mean and
    variance of its whole group, ``y[c] = scale * (x[c] - mean_k) / sqrt(var_k + eps) + bias``.

    Deleting one channel of a group would change that group's statistics, so the C/G channels of a group
    are coupled: whole groups go, ``num_groups`` shrinks. A group whose channels are all zero has mean 0
    and variance 0, so its output is exactly ``bias``. ``scale`` and ``bias`` are per group at opset 18
    (shape G) and per channel from opset 21 (shape C); the rule reads which one from their size.
    The exporters' spelling (Reshape to [N, G, -1], InstanceNormalization, Reshape back, Mul, Add) gets
    the same coupling from the index maps of its Reshapes (see :mod:`regroup`).
    """

    op_types = ("GroupNormalization",)
    passthrough = True

    def propagate(self, node, analysis):
        x = analysis.feature(node.input[0])
        scale, bias = (analysis.index.constant(name) for name in node.input[1:3])
        groups = get_attr(node, "num_groups", 0)
        if x is None or x.axis != 1 or scale is None or bias is None or groups < 1 or x.size % groups \
                or scale.size not in (groups, x.size) or bias.size != scale.size:
            analysis.barrier(node, "needs an NCHW input, constant scale and bias, and whole groups")
            return
        per = x.size // groups
        analysis.couple(x.ids, np.repeat(x.ids[::per], per))
        share_parameters(node, analysis, x.ids, (1, 2))
        shift = bias.astype(np.float64).reshape(-1)
        shift = np.repeat(shift, per) if shift.size == groups else shift
        zero_group = np.repeat(x.zero.reshape(groups, per).all(axis=1), per)
        pass_through(node, analysis, x.with_values(zero_group, shift))

    def rewrite(self, node, rewriter):
        keep = rewriter.keep(node.output[0])
        if keep is None or keep.all():
            return
        groups = get_attr(node, "num_groups")
        kept_groups = keep[:: len(keep) // groups]
        set_attr(node, "num_groups", int(kept_groups.sum()))
        for slot in (1, 2):
            value = rewriter.index.constant(node.input[slot])
            chosen = kept_groups if value.size == groups else keep
            rewriter.weights.write(node, slot, value.reshape(-1)[chosen], key=("take", 0, chosen.tobytes()))


BARRIERS = (
    BarrierRule("normalises across neighbouring channels", ("LRN",)),
    BarrierRule("may normalise across channels", ("MeanVarianceNormalization",)),
)
