"""QuantizeLinear / DequantizeLinear on feature maps (QDQ models), after the ONNX operator spec:

    Q(x)  = saturate(rint(x / s) + z)        (rint: round half to even; saturate to q's type)
    DQ(q) = (q - z) * s

with ``s``, ``z`` scalars (per tensor) or 1-D along ``axis`` (per axis). Channels pass one-to-one; a
channel that is the constant ``v`` becomes ``Q(v)`` / ``DQ(v)`` computed with that channel's parameters.
Per-axis parameters on the channel axis are sliced with the channels; per-axis parameters on another
axis, or blocked quantization, make the op a barrier.

**Exactness of a zero channel.** ``Q(0) = saturate(z_Q) = z_Q`` exactly (``rint(0) = 0`` and ``z_Q`` is in
range), and ``DQ(Q(0)) = (z_Q - z_DQ) * s_DQ``, which is 0 exactly iff ``z_DQ == z_Q``: the zero point of
the DequantizeLinear maps 0 back to 0 when it equals the QuantizeLinear's, as in every Q -> DQ pair that a
quantization tool writes (they share ``s`` and ``z``). A zero channel then stays zero through the pair
and is deleted like any zero; with mismatched zero points it becomes the non-zero constant
``(z_Q - z_DQ) * s_DQ``, which is tracked as such (kept unless its reader can absorb it). Nothing is
rounded differently after slimming: kept channels go through the same int8 arithmetic.

Weights are ``DequantizeLinear`` of initializers (quantized constants, :mod:`onnxslim.graph.quantized`):
the rules of their readers see their values, and slicing them keeps int8 data int8.
"""

from __future__ import annotations

import numpy as np

from onnxslim.graph.model import get_attr
from onnxslim.graph.rules.base import Rule, normalize_axis, pass_through, register
from onnxslim.graph.values import ChannelInfo


def _parameters(node, index, x: ChannelInfo):
    """(scale, zero point) per channel of ``x`` (float64 / int64 arrays of length C), or None with why."""
    scale = index.constant(node.input[1])
    zero_point = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or (len(node.input) > 2 and node.input[2] and zero_point is None):
        return None, "scale or zero point is computed"
    if get_attr(node, "block_size", 0):
        return None, "blocked quantization"
    zero_point = np.zeros(scale.shape, np.int64) if zero_point is None else zero_point.astype(np.int64)
    if scale.size == 1:
        return (np.full(x.size, float(scale.reshape(-1)[0])), np.full(x.size, int(zero_point.reshape(-1)[0]))), ""
    if normalize_axis(get_attr(node, "axis", 1), x.rank) != x.axis or scale.size != x.size:
        return None, "per-axis parameters on another axis than the channels"
    return (scale.astype(np.float64).reshape(-1), zero_point.reshape(-1)), ""


def _quantized_type_range(node, index) -> tuple[int, int]:
    """Range of Q's output type: the zero point's type (uint8 when the zero point is absent)."""
    zero_point = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    info = np.iinfo(zero_point.dtype if zero_point is not None else np.uint8)
    return info.min, info.max


@register
class QuantizeRule(Rule):
    """QuantizeLinear and DequantizeLinear of a feature map: the channel values map through Q / DQ."""

    op_types = ("QuantizeLinear", "DequantizeLinear")
    passthrough = True

    def propagate(self, node, analysis):
        index = analysis.index
        x = analysis.feature(node.input[0])
        if x is None:
            if index.is_const(node.input[0]):
                return  # a quantized weight: its readers read it (see onnxslim.graph.quantized)
            analysis.barrier(node, "input has no known channel axis")
            return
        found, why = _parameters(node, index, x)
        if found is None:
            analysis.barrier(node, why)
            return
        scale, zero_point = found
        with np.errstate(all="ignore"):
            if node.op_type == "QuantizeLinear":
                low, high = _quantized_type_range(node, index)
                ratio = x.value / scale
                value = np.clip(np.rint(ratio) + zero_point, low, high)
                # a constant known only to float precision may round either way near a half: unknown
                decided = (x.value == 0) | (np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) > 1e-3)
            else:
                value = (x.value - zero_point) * scale.astype(np.float32)
                decided = np.ones(x.size, bool)
        const = x.const & np.isfinite(value) & decided
        pass_through(node, analysis, x.with_values(const, value))

    def rewrite(self, node, rewriter):
        keep = rewriter.keep(node.output[0])
        if keep is None or keep.all():
            return
        for slot in (1, 2):
            value = rewriter.index.constant(node.input[slot]) if len(node.input) > slot and node.input[slot] else None
            if value is not None and value.size == len(keep) and value.size > 1:
                rewriter.weights.write(node, slot, value[keep], key=("take", 0, keep.tobytes()))
