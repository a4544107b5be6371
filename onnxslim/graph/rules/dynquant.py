"""Dynamically quantized models (onnxruntime's ``quantize_dynamic``): DynamicQuantizeLinear, ConvInteger
and MatMulInteger, after the ONNX operator spec::

    DynamicQuantizeLinear(x) = (q, s, z):  s = (max(0, max x) - min(0, min x)) / 255,
                                           z = saturate(rint(-min(0, min x) / s)),
                                           q = saturate(rint(x / s) + z)          (uint8)
    ConvInteger(q, W, z, w_z)[o]   = sum_i (q[i] - z) * (W[o, i] - w_z[o])         (int32, like Conv)
    MatMulInteger(q, B, z, w_z)[n] = sum_k (q[k] - z) * (B[k, n] - w_z[n])        (int32)

The int32 result is Cast to float and multiplied by ``s * w_scale`` (a computed scalar, which
:class:`~onnxslim.graph.rules.elementwise.NaryRule` reads as a broadcast operand of unknown value: zero
stays zero), then a bias is added.

**Exactness.** A zero channel of ``x`` quantizes to ``q = rint(0 / s) + z = z`` exactly, so it adds
``(z - z) * ... = 0`` to every output: it is tracked as "zero" through DynamicQuantizeLinear, meaning
"reads as the zero point", which the integer ops subtract. Deleting it leaves ``min x`` and ``max x``
unchanged (their range always includes 0), so ``s`` and ``z`` — and every kept channel's ``q`` — are
the same bits after slimming. A channel that is not zero would change the range: the integer ops hold
every non-zero input channel, even one that their weights ignore or a constant (no bias absorbs it).
Output ``o`` is the constant 0 when ``W[o] - w_z[o]`` is zero on every live input. Only per-tensor or
per-output-channel weight zero points are read; anything else is a barrier.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxslim.graph.rules.base import (
    Rule,
    block_reduced_channels,
    feature_or_barrier,
    layer_keeps,
    pass_through,
    register,
    saturation_note,
    slice_channel_vectors,
)
from onnxslim.graph.rules.conv import ConvRule, conv_channels, slice_conv_weight
from onnxslim.graph.rules.linear import matrix_output_channels

_INTEGER_OPS = ("ConvInteger", "MatMulInteger")


def _reads_quantized(node, analysis) -> bool:
    """Input 0's "zero" channels read as input 2 (the zero point): input 0 comes from a
    DynamicQuantizeLinear whose zero point is input 2, or input 2 is absent or a constant 0."""
    index = analysis.index
    producer = index.producer.get(node.input[0])
    x_zero_point = node.input[2] if len(node.input) > 2 else ""
    if producer is not None and producer.op_type == "DynamicQuantizeLinear":
        return len(producer.output) > 2 and x_zero_point == producer.output[2]
    value = index.constant(x_zero_point) if x_zero_point else np.zeros(1)
    return value is not None and value.size == 1 and bool(np.all(value == 0))


def centred_weight(node, index, out_axis: int, weight_slot: int = 1, zero_point_slot: int = 3) -> np.ndarray | None:
    """``W - w_z`` in int64 (W: input ``weight_slot``, w_z: input ``zero_point_slot``, absent: 0), the zero
    point broadcast per tensor or along ``out_axis`` of W (the output channels); None when W or w_z is
    computed, or w_z has another shape."""
    weight = index.constant(node.input[weight_slot])
    if weight is None:
        return None
    has_zero_point = len(node.input) > zero_point_slot and node.input[zero_point_slot]
    zero_point = index.constant(node.input[zero_point_slot]) if has_zero_point else np.zeros(1, np.int64)
    if zero_point is None:
        return None
    weight = weight.astype(np.int64)
    if zero_point.size == 1:
        return weight - int(zero_point.reshape(-1)[0])
    if zero_point.size != weight.shape[out_axis]:
        return None
    shape = [1] * weight.ndim
    shape[out_axis] = zero_point.size
    return weight - zero_point.astype(np.int64).reshape(shape)


@register
class DynamicQuantizeRule(Rule):
    """DynamicQuantizeLinear: channels pass; a zero channel reads as the zero point ("zero" for the
    integer ops that subtract it); any other constant becomes live (its q depends on the computed
    scale). Outputs 1 and 2 are scalars. A reader of q other than the integer ops makes it a barrier."""

    op_types = ("DynamicQuantizeLinear",)
    masks_go_before = True  # prune masks its float input: a uint8 0 is not its zero point

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        zero_point = node.output[2] if len(node.output) > 2 else ""
        for use in analysis.index.uses(node.output[0]):
            if use.node.op_type not in _INTEGER_OPS or use.slot != 0 or len(use.node.input) < 3 \
                    or use.node.input[2] != zero_point:
                analysis.barrier(node, f"q is read by {use.node.op_type} '{analysis.index.node_name(use.node)}', "
                                       "not by an integer op that subtracts its zero point")
                return
        if node.output[0] in analysis.index.outputs:
            analysis.barrier(node, "q is a graph output")
            return
        pass_through(node, analysis, x.with_values(x.zero, np.zeros(x.size)))

    def plan_notes(self, analysis, plan):
        return saturation_notes(analysis, plan, lambda rule: type(rule) in (ConvIntegerRule, MatMulIntegerRule))


@register
class ConvIntegerRule(ConvRule):
    """ConvInteger: :class:`~onnxslim.graph.rules.conv.ConvRule` with the centred weight ``W - w_z``, no
    bias, and every non-zero input channel held (see the module docstring); groups as Conv."""

    op_types = ("ConvInteger",)

    def propagate(self, node, analysis):
        x = analysis.feature(node.input[0])
        weight = self.centred(node, analysis.index)
        if x is None or weight is None or x.axis != 1 or not _reads_quantized(node, analysis):
            analysis.barrier(node, "input without channel facts, weights or zero points that are not constant")
            return
        conv_channels(node, analysis, x, weight != 0, np.zeros(weight.shape[0]), absorbs=False,
                      reads_every_input=True)

    #: inputs that hold one entry per output channel (or one per tensor): sliced with the filters
    channel_vector_slots: tuple[int, ...] = (3,)

    def centred(self, node, index) -> np.ndarray | None:
        """``W - w_z`` (Cout, Cin/g, k...) in int64."""
        return centred_weight(node, index, 0, self.weight_slot, self.weight_slot + 2)

    def filters(self, node, index):
        weight = self.centred(node, index)
        return weight.reshape(weight.shape[0], -1)

    def fold_output_scale(self, node, index, weights, s):
        return False

    def scaled_input_weight(self, node, slot, index, s):
        return None

    def rewrite(self, node, rewriter):
        keeps = layer_keeps(node, rewriter)
        if keeps is None:
            return
        keep_out, keep_in = keeps
        slice_conv_weight(node, rewriter, keep_out, keep_in, self.weight_slot)
        slice_channel_vectors(node, rewriter, self.channel_vector_slots, keep_out)


@register
class MatMulIntegerRule(Rule):
    """MatMulInteger ``(..., K) @ (K, N)`` with a constant B: N output channels from B's columns; every
    non-zero input channel is held (see the module docstring)."""

    op_types = ("MatMulInteger",)
    counts_macs = True
    #: inputs with one entry per column of B (or one per tensor)
    channel_vector_slots = (3,)

    def propagate(self, node, analysis):
        a = analysis.feature(node.input[0])
        matrix = self.centred(node, analysis.index)
        if a is None or matrix is None or matrix.ndim != 2 or a.axis != a.rank - 1 or matrix.shape[0] != a.size \
                or not _reads_quantized(node, analysis):
            analysis.barrier(node, "needs a quantized input with channels last and a constant 2-D B")
            return
        matrix_output_channels(node, analysis, a, matrix)
        block_reduced_channels(analysis, node, node.input[0], a, np.ones(a.size, bool), False, " (no bias)")

    def transposed(self, node) -> bool:
        """B is stored as (N, K) (QGemm's ``transB``)."""
        return False

    def centred(self, node, index) -> np.ndarray | None:
        """``B - b_z`` (K, N) in int64 (B stored (N, K) when ``transposed``)."""
        if self.transposed(node):
            weight = centred_weight(node, index, 0, self.weight_slot, self.weight_slot + 2)
            return None if weight is None else weight.T
        return centred_weight(node, index, 1, self.weight_slot, self.weight_slot + 2)

    def filters(self, node, index):
        return self.centred(node, index).T

    def reduction(self, node, slot):
        return "full" if slot == 0 else "none"

    def macs(self, node, dims):
        """``rows * K * N`` per sample."""
        x, w = dims(node.input[0]), dims(node.input[self.weight_slot])
        if x is None or w is None or len(w) != 2 or any(d is None for d in list(x[1:]) + list(w)):
            return None
        rows = int(np.prod(x[1:-1], dtype=np.int64)) if len(x) > 2 else 1
        return int(rows * w[0] * w[1])

    def rewrite(self, node, rewriter):
        keeps = layer_keeps(node, rewriter)
        if keeps is None:
            return
        keep_out, keep_in = keeps
        transposed = self.transposed(node)
        weight = rewriter.weights.read(node, self.weight_slot)
        kept = (weight.T if transposed else weight)[keep_in][:, keep_out]
        rewriter.weights.write(node, self.weight_slot, kept.T if transposed else kept,
                               key=("matmul", transposed, keep_out.tobytes(), keep_in.tobytes()))
        slice_channel_vectors(node, rewriter, self.channel_vector_slots, keep_out)


def saturation_notes(analysis, plan, owns: Callable[[Rule], bool]) -> list[str]:
    """A note naming the integer layers (nodes whose rule ``owns(rule)`` accepts: a ConvInteger- or
    MatMulInteger-like rule with ``centred``) that lose input channels and read int8 weights beyond 7
    bits (``|W - w_z| > 64``) with uint8 activations (a computed zero point: DynamicQuantizeLinear's):
    onnxruntime's AVX2 u8s8 kernels sum pairs of products in int16 with saturation (255 * 65 * 2 >
    32767), so their results depend on which channels sit side by side, and the slimmed model can
    differ from the input in the last bits (onnxruntime's ``reduce_range=True`` avoids it; int8
    activations and uint8 weights do not saturate: measured in ``tests/test_dynamic_quant.py`` and
    ``tests/test_qoperator_models.py``)."""
    index, found = analysis.index, []
    for node in index.nodes:
        rule = analysis.rule_for(node)
        keep = plan.keep(node.input[0]) if owns(rule) else None
        weight = index.constant(node.input[rule.weight_slot]) if keep is not None and not keep.all() else None
        activations = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if weight is None or weight.dtype != np.int8 or (activations is not None and activations.dtype != np.uint8) \
                or (rule.reduction(node, 0) == "grouped" and weight.shape[1] == 1):
            continue  # (a depthwise filter sums one channel: deleting others changes none of its pairs)
        centred = rule.centred(node, index)
        if centred is not None and np.abs(centred).max() > 64:
            found.append(index.node_name(node))
    return saturation_note(found, "integer op(s)")
