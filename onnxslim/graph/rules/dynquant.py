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

import numpy as np

from onnxslim.graph.model import set_attr
from onnxslim.graph.rules.base import (
    Rule,
    block_reduced_channels,
    feature_or_barrier,
    layer_keeps,
    pass_through,
    register,
)
from onnxslim.graph.rules.conv import ConvRule, _kept_rows_and_columns, conv_channels
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


def _centred_weight(node, index, out_axis: int) -> np.ndarray | None:
    """``W - w_z`` in int64, the zero point broadcast per tensor or along ``out_axis`` of W (the output
    channels); None when W or w_z is computed, or w_z has another shape."""
    weight = index.constant(node.input[1])
    if weight is None:
        return None
    has_zero_point = len(node.input) > 3 and node.input[3]
    zero_point = index.constant(node.input[3]) if has_zero_point else np.zeros(1, np.int64)
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


def _slice_weight_zero_point(node, rewriter, keep_out: np.ndarray) -> None:
    """Keep the per-output-channel weight zero point entries of the kept outputs."""
    if len(node.input) > 3 and node.input[3] and not keep_out.all():
        zero_point = rewriter.weights.read(node, 3)
        if zero_point.size == len(keep_out) and zero_point.size > 1:
            rewriter.weights.write(node, 3, zero_point.reshape(-1)[keep_out].reshape(-1),
                                   key=("take", 0, keep_out.tobytes()))


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
        return saturation_notes(analysis, plan)


@register
class ConvIntegerRule(ConvRule):
    """ConvInteger: :class:`~onnxslim.graph.rules.conv.ConvRule` with the centred weight ``W - w_z``, no
    bias, and every non-zero input channel held (see the module docstring); groups as Conv."""

    op_types = ("ConvInteger",)

    def propagate(self, node, analysis):
        x = analysis.feature(node.input[0])
        weight = _centred_weight(node, analysis.index, 0)
        if x is None or weight is None or x.axis != 1 or not _reads_quantized(node, analysis):
            analysis.barrier(node, "input without channel facts, weights or zero points that are not constant")
            return
        conv_channels(node, analysis, x, weight != 0, np.zeros(weight.shape[0]), absorbs=False,
                      reads_every_input=True)

    def filters(self, node, index):
        weight = _centred_weight(node, index, 0)
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
        weight = rewriter.weights.read(node, 1)
        groups = self.channel_groups(node)
        rows, cols, kept_groups = _kept_rows_and_columns(keep_out, keep_in, groups, rows_are_out=True)
        rewriter.weights.write(node, 1, weight[rows, cols], key=("conv", groups, keep_out.tobytes(), keep_in.tobytes()))
        if groups > 1:
            set_attr(node, "group", kept_groups)
        _slice_weight_zero_point(node, rewriter, keep_out)


@register
class MatMulIntegerRule(Rule):
    """MatMulInteger ``(..., K) @ (K, N)`` with a constant B: N output channels from B's columns; every
    non-zero input channel is held (see the module docstring)."""

    op_types = ("MatMulInteger",)
    counts_macs = True

    def propagate(self, node, analysis):
        a = analysis.feature(node.input[0])
        matrix = _centred_weight(node, analysis.index, 1)
        if a is None or matrix is None or matrix.ndim != 2 or a.axis != a.rank - 1 or matrix.shape[0] != a.size \
                or not _reads_quantized(node, analysis):
            analysis.barrier(node, "needs a quantized input with channels last and a constant 2-D B")
            return
        matrix_output_channels(node, analysis, a, matrix)
        block_reduced_channels(analysis, node, node.input[0], a, np.ones(a.size, bool), False, " (no bias)")

    def filters(self, node, index):
        return _centred_weight(node, index, 1).T

    def reduction(self, node, slot):
        return "full" if slot == 0 else "none"

    def macs(self, node, dims):
        """``rows * K * N`` per sample."""
        x, w = dims(node.input[0]), dims(node.input[1])
        if x is None or w is None or len(w) != 2 or any(d is None for d in list(x[1:]) + list(w)):
            return None
        rows = int(np.prod(x[1:-1], dtype=np.int64)) if len(x) > 2 else 1
        return int(rows * w[0] * w[1])

    def rewrite(self, node, rewriter):
        keeps = layer_keeps(node, rewriter)
        if keeps is None:
            return
        keep_out, keep_in = keeps
        matrix = rewriter.weights.read(node, 1)
        rewriter.weights.write(node, 1, matrix[keep_in][:, keep_out], key=("matmul", keep_out.tobytes(), keep_in.tobytes()))
        _slice_weight_zero_point(node, rewriter, keep_out)


def saturation_notes(analysis, plan) -> list[str]:
    """A note naming the integer ops that lose input channels and read int8 weights beyond 7 bits
    (``|W - w_z| > 64``) with uint8 activations: onnxruntime's AVX2 u8s8 kernels sum pairs of products
    in int16 with saturation (255 * 65 * 2 > 32767), so their results depend on which channels sit side
    by side, and the slimmed model can differ from the input in the last bits (onnxruntime's own
    ``quantize_dynamic(..., reduce_range=True)`` avoids it)."""
    index, found = analysis.index, []
    for node in index.nodes:
        keep = plan.keep(node.input[0]) if node.op_type in _INTEGER_OPS else None
        weight = index.constant(node.input[1]) if keep is not None and not keep.all() else None
        if weight is None or weight.dtype != np.int8:
            continue
        centred = _centred_weight(node, index, 0 if node.op_type == "ConvInteger" else 1)
        if centred is not None and np.abs(centred).max() > 64:
            found.append(index.node_name(node))
    if not found:
        return []
    return [f"{len(found)} integer op(s) ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}) read uint8 "
            "activations with int8 weights beyond 7 bits: onnxruntime's AVX2 kernels saturate pair sums of "
            "their products, so outputs can differ from the input model's wherever that happens (quantize "
            "with reduce_range=True, or uint8 weights, to compare bit for bit)"]
