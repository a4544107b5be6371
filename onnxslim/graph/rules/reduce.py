"""Reductions (ReduceSum, ReduceMean, ReduceMax ...), over spatial axes or over the channel axis.

Over axes that exclude the channel axis (ReduceMean over H, W is a global average pool), output channel
``c`` reads input channel ``c`` only: ids pass through. A constant channel ``v`` stays ``v`` under
``mean``/``max``/``min``; under the sums and ``prod`` only zero stays zero (``n * 0``, ``0^n``); under
``log-sum`` and ``log-sum-exp`` even zero does not (``log 0``, ``log n``), so their values are unknown.

Over the channel axis (axes given as an attribute, or as a constant input from opset 18; an empty list
means every axis) each output element reads every channel: the output is one new channel (or none,
without keepdims), and the op reads its input like a conv whose weights are all ones. Per op, what
deleting a channel that is **zero** in the input does (non-zero channels are always kept):

==================================================  ===================================  =====================
op over channels                                    a zero channel                       so
==================================================  ===================================  =====================
ReduceSum, ReduceL1, ReduceL2, ReduceSumSquare,     adds ``g(0) = 0`` to the sum         deleted, exact
ReduceLogSum (``sum g(x_c)``, ``g(0) = 0``)
ReduceMean (``sum x_c / C``)                        adds 0, but the divisor is C         deleted; the output
                                                                                         is rescaled by C'/C
ReduceMax on an input provably >= 0 (every          cannot exceed the kept channels:     deleted, exact
element, every input; CBAM's ``max(x, dim=1)``      ``max(max_kept, 0) = max_kept``
of ``Relu(...) * sigmoid(...)``)                    since ``max_kept >= 0``
ReduceMax otherwise                                 can be the maximum (all others       kept
                                                    negative)
ReduceMin                                           is the minimum when the others are   kept
                                                    positive (on an input >= 0 the
                                                    result is 0 with it, the kept
                                                    channels' minimum without it)
ReduceProd                                          makes the product 0                  kept
ReduceLogSumExp                                     adds ``exp(0) = 1``                  kept
==================================================  ===================================  =====================

"Provably >= 0" is :meth:`ChannelAnalysis.nonnegative <onnxslim.graph.analysis.ChannelAnalysis.nonnegative>`:
each producer's rule answers from the ONNX operator spec (Relu, Sigmoid, a Mul of non-negative operands
with every mask value >= 0, pooling, Concat, Reshape ... of non-negative inputs); a graph input, a BN
shift or a negative mask entry makes it False.

The C'/C rescale is a ``Mul`` by a scalar inserted after the ReduceMean: ``mean'(x) * C'/C = sum / C``.
At least one channel always stays (a reduction over no channel is not the masked model's value).
Source: ONNX operator spec, ReduceMean-18 and its siblings.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxslim.graph.model import get_attr
from onnxslim.graph.rules.base import (
    Rule,
    block_reduced_channels,
    feature_or_barrier,
    inputs_nonnegative,
    insert_after,
    keep_all,
    normalize_axis,
    pass_through,
    register,
)

# op -> (function of the channel values (1-D), what a zero channel does over the channel axis or None)
_OVER_CHANNELS = {
    "ReduceSum": (np.sum, None),
    "ReduceL1": (lambda v: np.sum(np.abs(v)), None),
    "ReduceL2": (lambda v: np.sqrt(np.sum(v * v)), None),
    "ReduceSumSquare": (lambda v: np.sum(v * v), None),
    "ReduceLogSum": (lambda v: np.log(np.sum(v)), None),
    "ReduceMean": (np.mean, None),
    "ReduceMax": (np.max, "a zero channel can be the maximum (the input is not provably >= 0)"),
    "ReduceMin": (np.min, "a zero channel can be the minimum"),
    "ReduceProd": (np.prod, "a zero channel makes the product zero"),
    "ReduceLogSumExp": (lambda v: np.log(np.sum(np.exp(v))), "a zero channel adds exp(0) = 1"),
}
_KEEPS_CONSTANTS = ("ReduceMean", "ReduceMax", "ReduceMin")  # over other axes: a constant v stays v
_KEEPS_ZERO = ("ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceProd")  # only 0 stays 0


def reduced_axes(node, analysis, rank: int) -> list[int] | None:
    """The axes ``node`` reduces (normalised, sorted), or None when they are computed."""
    axes = get_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        constant = analysis.index.constant(node.input[1])
        if constant is None:
            return None
        axes = constant.reshape(-1).tolist()
    if not axes:
        return [] if get_attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(normalize_axis(int(a), rank) for a in axes)


@register
class ReduceRule(Rule):
    """Reductions over spatial axes pass channels through; over the channel axis see the module table."""

    op_types = tuple(_OVER_CHANNELS)
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        axes = reduced_axes(node, analysis, x.rank)
        if axes is None:
            analysis.barrier(node, "reduces over computed axes")
            return
        keepdims = get_attr(node, "keepdims", 1)
        if x.axis in axes:
            self._over_channels(node, analysis, x, axes, keepdims)
            return
        if node.op_type in _KEEPS_CONSTANTS:
            info = x.with_values(x.const, x.value)
        elif node.op_type in _KEEPS_ZERO:
            info = x.with_values(x.zero, x.value)
        else:
            info = x.unknown_values()
        if not keepdims:
            info.axis, info.rank = x.axis - sum(1 for a in axes if a < x.axis), x.rank - len(axes)
        pass_through(node, analysis, info)

    def _over_channels(self, node, analysis, x, axes, keepdims) -> None:
        function, why_kept = _OVER_CHANNELS[node.op_type]
        if node.op_type == "ReduceMax" and analysis.nonnegative(node.input[0]):
            why_kept = None  # max(max over the kept channels, 0) is the max over the kept channels
        if why_kept is not None:
            keep_all(analysis, node, x, f"over the channel axis {why_kept}")
        else:
            block_reduced_channels(analysis, node, node.input[0], x, np.ones(x.size, bool), absorbs_constants=False)
        if not keepdims:
            return  # the output has no channel axis
        const, value = np.zeros(1, bool), np.zeros(1)
        if axes == [x.axis] and x.const.all() and x.size:
            with np.errstate(all="ignore"):
                result = float(function(x.value))
            const, value = np.array([np.isfinite(result)]), np.array([result])
        analysis.fresh(None, node.output[0], 1, x.axis, x.rank, const, value)

    def nonnegative(self, node, analysis):
        """ReduceL1, ReduceL2, ReduceSumSquare are sums of ``|x|``, ``x^2`` (then a square root): always
        >= 0. ReduceMax, ReduceMin, ReduceMean, ReduceSum, ReduceProd of an input >= 0 are >= 0 (ONNX
        ReduceMax-18 ...); the log reductions can be negative."""
        if node.op_type in ("ReduceL1", "ReduceL2", "ReduceSumSquare"):
            return True
        return node.op_type in _KEEPS_CONSTANTS + _KEEPS_ZERO and inputs_nonnegative(node, analysis)

    def _reduces_channels(self, node, plan) -> bool:
        x = plan.analysis.info.get(node.input[0])
        if x is None:
            return False
        axes = reduced_axes(node, plan.analysis, x.rank)
        return axes is not None and x.axis in axes

    def reduction(self, node, slot):
        """"full" for the data input: over the channel axis it sums (or maxes) every channel. Over other
        axes a mask put before it by ``prune`` is harmless (channels pass one-to-one), so no axes are read."""
        return "full" if slot == 0 else "none"

    def allows_empty_input(self, node, slot, plan):
        return not self._reduces_channels(node, plan)

    def rewrite(self, node, rewriter):
        if node.op_type != "ReduceMean" or not self._reduces_channels(node, rewriter.plan):
            return
        keep = rewriter.keep(node.input[0])
        if keep is None or keep.all():
            return
        _scale_output(node, rewriter, float(keep.sum()) / len(keep))


def _scale_output(node, rewriter, factor: float) -> None:
    """Multiply ``node``'s first output by ``factor``: the node writes a new name, a ``Mul`` inserted
    after it writes the old one (so every reader, and a graph output, is unchanged)."""
    index = rewriter.index
    original = node.output[0]
    hidden = index.fresh_name(f"{original}_unscaled")
    dtype = helper.tensor_dtype_to_np_dtype(_elem_type(index, original))
    scale = rewriter.weights.add(f"{original}_rescale", np.array(factor, dtype))
    insert_after(node, rewriter, "Mul", hidden, scale, index.fresh_name(f"{original}_rescale"))


def _elem_type(index, name: str) -> int:
    """The element type of the computed tensor ``name``: found by walking its data path back (input 0 of
    each producer) to a graph input or initializer; ``Cast`` gives its ``to``, ``DequantizeLinear`` the
    type of its scale (ONNX type constraints: every other op on a float data path keeps the type)."""
    declared = {v.name: v.type.tensor_type.elem_type for v in list(index.graph.input) + list(index.graph.value_info)}
    for _ in range(len(index.nodes) + 1):
        if name in index.initializers:
            return index.initializers[name].data_type
        if declared.get(name):
            return declared[name]
        producer = index.producer.get(name)
        if producer is None or not producer.input:
            break
        if producer.op_type == "Cast":
            return int(get_attr(producer, "to"))
        name = producer.input[1] if producer.op_type == "DequantizeLinear" else producer.input[0]
    return onnx.TensorProto.FLOAT

