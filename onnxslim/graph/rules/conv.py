"""Conv and ConvTranspose: they create output channels and reduce over input channels.

Conv, weight W (Cout, Cin/g, k...), g groups of a = Cin/g inputs and b = Cout/g outputs::

    y[o] = b[o] + sum_{i in group(o)} W[o, i] * x[i]

* Output ``o`` is the constant ``b[o]`` when ``W[o, i] = 0`` for every input ``i`` that is not zero
  (a dead filter, or a filter reading only deleted channels).
* g = 1: input ``i`` may go when it is zero, when column ``W[:, i]`` is all zero (unused), or when it is a
  constant ``v`` and the conv has no spatial padding: then ``b'[o] = b[o] + v * sum_k W[o, i, k]`` exactly.
* g > 1 (grouped, depthwise): the inputs and outputs of one group form one unit, deleted as a whole
  (the group count shrinks), so that the remaining groups keep equal sizes. For depthwise convs
  (a = b = 1) this ties input channel ``i`` to output channel ``i``.

ConvTranspose, W (Cin, Cout/g, k...): the same with the roles of the weight axes swapped; its outputs
overlap, so constants cannot be absorbed.
"""

from __future__ import annotations

import numpy as np

from onnxslim.graph.channels import ChannelAnalysis
from onnxslim.graph.model import get_attr, set_attr
from onnxslim.graph.rules.base import (
    Rule,
    block_reduced_channels,
    keep_all,
    layer_keeps,
    register,
    scale_vector,
    slice_bias,
    write_scaled,
)


def _bias(analysis_or_index, node, channels: int) -> np.ndarray:
    index = getattr(analysis_or_index, "index", analysis_or_index)
    bias = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return np.zeros(channels) if bias is None else bias.astype(np.float64)


def has_padding(node, kernel: tuple[int, ...]) -> bool:
    auto_pad = get_attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        strides = get_attr(node, "strides") or [1] * len(kernel)
        return any(k > 1 for k in kernel) or any(s > 1 for s in strides)
    return any(p != 0 for p in (get_attr(node, "pads") or []))


def _static_shapes(node, dims) -> tuple[tuple, tuple, tuple] | None:
    """(x, W, y) shapes when static past the batch axis (W entirely), else None."""
    x, w, y = dims(node.input[0]), dims(node.input[1]), dims(node.output[0])
    if x is None or w is None or y is None or any(d is None for d in list(x[1:]) + list(w) + list(y[1:])):
        return None
    return x, w, y


def _group_units(analysis: ChannelAnalysis, in_ids: np.ndarray, out_ids: np.ndarray, groups: int) -> None:
    """Couple each group's inputs and outputs into one unit."""
    a, b = len(in_ids) // groups, len(out_ids) // groups
    representative = in_ids[::a]  # first input channel of every group
    analysis.couple(in_ids, np.repeat(representative, a))
    analysis.couple(out_ids, np.repeat(representative, b))


@register
class ConvRule(Rule):
    op_types = ("Conv",)

    def propagate(self, node, analysis):
        index = analysis.index
        x = analysis.feature(node.input[0])
        weight = index.constant(node.input[1])
        if x is None or weight is None or x.axis != 1:
            analysis.barrier(node, "input without channel facts or weights that are not constant")
            return
        groups = get_attr(node, "group", 1)
        cout, per_group = weight.shape[0], weight.shape[1]
        if per_group * groups != x.size or cout % groups:
            analysis.barrier(node, "weight shape does not match the input channels")
            return
        bias = _bias(analysis, node, cout)
        nonzero = np.any(weight.reshape(cout, per_group, -1) != 0, axis=2)  # (Cout, Cin/g)
        # live input of (o, j): input channel (o // b) * a + j
        b = cout // groups
        live = ~x.zero
        live_in = live[(np.arange(cout) // b)[:, None] * per_group + np.arange(per_group)[None, :]]
        dead = ~np.any(nonzero & live_in, axis=1)
        out = analysis.fresh(node, node.output[0], cout, 1, x.rank, const=dead, value=bias)
        analysis.share_weight(node.input[1], x.ids, out.ids)
        if groups == 1:
            absorbs = not has_padding(node, weight.shape[2:])
            block_reduced_channels(analysis, node, node.input[0], x, np.any(nonzero, axis=0), absorbs,
                                   " (spatial padding)")
        else:
            _group_units(analysis, x.ids, out.ids, groups)

    counts_macs = True

    def filters(self, node, index):
        weight = index.constant(node.input[1])
        return weight.reshape(weight.shape[0], -1)

    def reduction(self, node, slot):
        return "none" if slot != 0 else "full" if get_attr(node, "group", 1) == 1 else "grouped"

    def macs(self, node, dims):
        """``Cout * prod(out spatial) * Cin/g * prod(kernel)``."""
        shapes = _static_shapes(node, dims)
        return None if shapes is None else int(np.prod(shapes[2][1:], dtype=np.int64) * np.prod(shapes[1][1:], dtype=np.int64))

    def fold_output_scale(self, node, index, weights, s):
        """``W[o] *= s[o], b[o] *= s[o]``."""
        weight = index.constant(node.input[1])
        if weight is None or weight.shape[0] != len(s):
            return False
        write_scaled(weights, node, 1, weight, s.reshape(-1, *([1] * (weight.ndim - 1))))
        scale_vector(index, weights, node, 2, s)
        return True

    def scaled_input_weight(self, node, slot, index, s):
        """``W[:, i] *= s[i]`` (within each group); exact with zero padding since ``pad(s x) = s pad(x)``."""
        weight = index.constant(node.input[1]) if len(node.input) > 1 else None
        groups = get_attr(node, "group", 1)
        if slot != 0 or weight is None or weight.shape[1] * groups != len(s):
            return None
        factor = s.reshape(groups, 1, weight.shape[1], *([1] * (weight.ndim - 2)))
        grouped = weight.astype(np.float64).reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        return (grouped * factor).reshape(weight.shape)

    def rewrite(self, node, rewriter):
        keeps = layer_keeps(node, rewriter)
        if keeps is None:
            return
        keep_out, keep_in = keeps
        weights = rewriter.weights
        weight = weights.read(node, 1)
        groups = get_attr(node, "group", 1)
        cout = weight.shape[0]
        bias = _bias(rewriter, node, cout)
        if groups == 1:
            x = rewriter.info(node.input[0])
            absorb = ~keep_in & x.const & (x.value != 0)
            if absorb.any():
                sums = weight[:, absorb].reshape(cout, int(absorb.sum()), -1).sum(axis=2, dtype=np.float64)
                bias = bias + sums @ x.value[absorb]
                rewriter.set_bias(node, 2, bias[keep_out].astype(weight.dtype))
            else:
                slice_bias(node, rewriter, keep_out)
            new_weight = weight[keep_out][:, keep_in]
            weights.write(node, 1, new_weight, key=("conv", keep_out.tobytes(), keep_in.tobytes()))
        else:
            b = cout // groups
            kept_groups = int(keep_out[::b].sum())
            weights.write(node, 1, weight[keep_out], key=("take", 0, keep_out.tobytes()))
            slice_bias(node, rewriter, keep_out)
            set_attr(node, "group", kept_groups)


@register
class ConvTransposeRule(Rule):
    op_types = ("ConvTranspose",)

    def propagate(self, node, analysis):
        index = analysis.index
        x = analysis.feature(node.input[0])
        weight = index.constant(node.input[1])
        if x is None or weight is None or x.axis != 1 or weight.shape[0] != x.size:
            analysis.barrier(node, "input without channel facts or weights that are not constant")
            return
        groups = get_attr(node, "group", 1)
        cin, per_group = weight.shape[0], weight.shape[1]
        cout = per_group * groups
        a = cin // groups
        bias = _bias(analysis, node, cout)
        nonzero = np.any(weight.reshape(cin, per_group, -1) != 0, axis=2)  # (Cin, Cout/g)
        live = ~x.zero
        # output o = k * per_group + j reads inputs k*a .. k*a+a-1 through W[i, j]
        grouped = (nonzero & live[:, None]).reshape(groups, a, per_group).any(axis=1)  # (g, Cout/g)
        dead = ~grouped.reshape(-1)
        out = analysis.fresh(node, node.output[0], cout, 1, x.rank, const=dead, value=bias)
        analysis.share_weight(node.input[1], x.ids, out.ids)
        if groups == 1:
            block_reduced_channels(analysis, node, node.input[0], x, np.any(nonzero, axis=1), False,
                                   " (transposed convolution outputs overlap)")
        else:
            _group_units(analysis, x.ids, out.ids, groups)
        output_shape = get_attr(node, "output_shape")
        if output_shape is not None and len(output_shape) == x.rank:  # non-standard: includes N and C
            keep_all(analysis, node, out, "output_shape fixes the channel count")

    counts_macs = True

    def filters(self, node, index):
        """Output ``k * Cout/g + j`` is made by ``W[k*a : (k+1)*a, j]`` (a = Cin/g inputs per group)."""
        weight = index.constant(node.input[1])
        groups = get_attr(node, "group", 1)
        cin, per_group = weight.shape[0], weight.shape[1]
        grouped = weight.reshape(groups, cin // groups, per_group, -1).transpose(0, 2, 1, 3)
        return grouped.reshape(groups * per_group, -1)

    def reduction(self, node, slot):
        return "none" if slot != 0 else "full" if get_attr(node, "group", 1) == 1 else "grouped"

    def macs(self, node, dims):
        """``Cin * prod(in spatial) * Cout/g * prod(kernel)``."""
        shapes = _static_shapes(node, dims)
        if shapes is None:
            return None
        x, w, _ = shapes
        return int(np.prod(x[1:], dtype=np.int64) * w[1] * np.prod(w[2:], dtype=np.int64))

    def fold_output_scale(self, node, index, weights, s):
        """``W[i, j] *= s[k * Cout/g + j]`` for inputs ``i`` of group ``k``; ``b *= s``."""
        weight = index.constant(node.input[1])
        groups = get_attr(node, "group", 1)
        if weight is None or weight.shape[1] * groups != len(s):
            return False
        per = s.reshape(groups, 1, weight.shape[1], *([1] * (weight.ndim - 2)))
        grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        weights.write(node, 1, (grouped * per).reshape(weight.shape).astype(weight.dtype))
        scale_vector(index, weights, node, 2, s)
        return True

    def rewrite(self, node, rewriter):
        keeps = layer_keeps(node, rewriter)
        if keeps is None:
            return
        keep_out, keep_in = keeps
        weights = rewriter.weights
        weight = weights.read(node, 1)
        groups = get_attr(node, "group", 1)
        per_group = weight.shape[1]
        if groups == 1:
            new_weight = weight[keep_in][:, keep_out]
        else:
            new_weight = weight[keep_in]
            set_attr(node, "group", int(keep_out[::per_group].sum()))
        weights.write(node, 1, new_weight, key=("convT", keep_out.tobytes(), keep_in.tobytes()))
        slice_bias(node, rewriter, keep_out)
