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
from onnx import TensorProto

from onnxslim.graph.model import get_attr
from onnxslim.graph.rules.base import (
    Rule,
    inputs_nonnegative,
    normalize_axis,
    pass_through,
    register,
    slice_channel_vectors,
)
from onnxslim.graph.values import ChannelInfo


def _parameters(node, index, x: ChannelInfo):
    """(scale, zero point) per channel of ``x`` (float64 / int64 arrays of length C), or None with why."""
    scale = index.constant(node.input[1])
    zero_point = _zero_point(node, index)
    if scale is None or (_has_zero_point(node) and zero_point is None):
        return None, "scale or zero point is computed"
    if get_attr(node, "block_size", 0):
        return None, "blocked quantization"
    zero_point = np.zeros(scale.shape, np.int64) if zero_point is None else zero_point.astype(np.int64)
    if scale.size == 1:
        return (np.full(x.size, float(scale.reshape(-1)[0])), np.full(x.size, int(zero_point.reshape(-1)[0]))), ""
    if normalize_axis(get_attr(node, "axis", 1), x.rank) != x.axis or scale.size != x.size:
        return None, "per-axis parameters on another axis than the channels"
    return (scale.astype(np.float64).reshape(-1), zero_point.reshape(-1)), ""


def _zero_point(node, index) -> np.ndarray | None:
    """The node's zero point (None when absent or computed)."""
    return index.constant(node.input[2]) if _has_zero_point(node) else None


def _has_zero_point(node) -> bool:
    return len(node.input) > 2 and bool(node.input[2])


def _known_parameters(node, index) -> bool:
    """Every scale is a constant > 0 and the zero point is absent or a constant."""
    scale = index.constant(node.input[1])
    return scale is not None and bool(np.all(scale > 0)) and (not _has_zero_point(node)
                                                              or _zero_point(node, index) is not None)


def _unsigned_output(node, index) -> bool:
    """Q's output type is unsigned: its zero point's type, else ``output_dtype`` (opset 21), else uint8."""
    zero_point = _zero_point(node, index)
    if zero_point is not None:
        return zero_point.dtype.kind == "u"
    output_dtype = get_attr(node, "output_dtype", 0)
    return not _has_zero_point(node) and output_dtype in (0, TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT4)


def _same_values(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Two zero points are equal element by element (absent: 0)."""
    a = np.zeros(1, np.int64) if a is None else a.astype(np.int64).reshape(-1)
    b = np.zeros(1, np.int64) if b is None else b.astype(np.int64).reshape(-1)
    return a.size == b.size and bool(np.all(a == b))


def _quantized_type_range(node, index) -> tuple[int, int]:
    """Range of Q's output type: the zero point's type (uint8 when the zero point is absent)."""
    zero_point = _zero_point(node, index)
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
            if index.is_const(node.input[0]) or index.is_const(node.output[0]):
                return  # a quantized weight (or the Q of a fake-quantized one): its readers read it
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

    def nonnegative(self, node, analysis):
        """Q: its integers are >= 0 when their type is unsigned. DQ(q) = (q - z) * s >= 0 when every
        s > 0 and q >= z: z is the least value of q's type, or q = Q(x) of an x >= 0 with positive scales
        and the same zero point (rint(x / s_Q) >= 0, and saturation never goes below z)."""
        index = analysis.index
        if node.op_type == "QuantizeLinear":
            return _unsigned_output(node, index)
        if not _known_parameters(node, index):
            return False
        zero_point = _zero_point(node, index)
        if zero_point is not None and zero_point.dtype.kind in "iu" \
                and bool(np.all(zero_point == np.iinfo(zero_point.dtype).min)):
            return True
        quantize = index.producer.get(node.input[0])
        return quantize is not None and quantize.op_type == "QuantizeLinear" and _known_parameters(quantize, index) \
            and inputs_nonnegative(quantize, analysis) and _same_values(_zero_point(quantize, index), zero_point)

    def rewrite(self, node, rewriter):
        keep = rewriter.keep(node.output[0])
        if keep is not None:
            slice_channel_vectors(node, rewriter, (1, 2), keep)

    def plan_notes(self, analysis, plan):
        """A note naming the float layers (MAC-counting ops with a float weight initializer) that read a
        DequantizeLinear and lose channels: onnxruntime 1.20+ (graph optimizations basic and up, its
        ``WeightBiasQuantization`` pass) quantizes such a layer's weight at load time with one scale from
        its largest entry, which deleting channels can change, so outputs can differ by a quantization
        step (measured on a QOperator U-Net's float ConvTranspose, ``tests/test_qoperator_models.py``);
        ``disabled_optimizers=["WeightBiasQuantization"]`` compares bit for bit."""
        index, found = analysis.index, []
        for node in index.nodes:
            rule, producer = analysis.rule_for(node), index.producer.get(node.input[0]) if node.input else None
            if not rule.counts_macs or producer is None or producer.op_type != "DequantizeLinear" \
                    or len(node.input) <= rule.weight_slot or node.input[rule.weight_slot] not in index.initializers:
                continue
            weight = index.constant(node.input[rule.weight_slot])
            keeps = [plan.keep(node.input[0]), plan.keep(node.output[0])]
            if weight is not None and weight.dtype.kind == "f" and any(k is not None and not k.all() for k in keeps):
                found.append(index.node_name(node))
        if not found:
            return []
        return [f"{len(found)} float layer(s) between quantized ones lose channels ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}): onnxruntime quantizes their weights when it loads the model "
                "(graph optimizations basic and up), with a scale that deleting channels can change, so outputs can "
                "differ by a quantization step (disabled_optimizers=['WeightBiasQuantization'] compares bit for bit)"]
