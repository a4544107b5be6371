"""Gemm and MatMul: fully connected layers over a (N, K) feature.

Gemm ``Y = alpha * A @ B' + beta * C`` with B' = B or B^T (K, M):

* output neuron ``m`` is the constant ``beta * C[m]`` when ``B'[k, m] = 0`` for every non-zero input ``k``;
* input feature ``k`` may go when it is zero, unused (row ``B'[k]`` all zero), or a constant ``v``:
  ``C'[m] = beta * C[m] + alpha * v * B'[k, m]`` (written with beta = 1) absorbs it exactly.

A (N, C, H, W) map flattened into A carries each channel as a block of H*W features (see layout), so a
deleted channel removes a block of rows of B'.

MatMul ``Y = A @ B`` with constant 2-D B: on an A whose channel axis is the last it is Gemm without bias
(constants cannot be absorbed) applied to every row: ``(N, K) @ (K, M)``, and ``(N, ..., K) @ (K, M)``
as torch exports ``nn.Linear`` on a sequence or an NHWC map (ConvNeXt's pointwise MLP, a Conv1d's
output transposed to (N, L, C), tf2onnx's Dense on a rank-4 tensor); the output's last axis holds the M
new channels. On an A whose channel axis is not the last it acts on each channel separately
(``(N, C, L) @ (L, M)``) and passes channels through.
"""

from __future__ import annotations

import numpy as np

from onnxslim.graph.model import get_attr, set_attr
from onnxslim.graph.rules.base import (
    Rule,
    block_reduced_channels,
    layer_keeps,
    pass_through,
    register,
    slice_bias,
    write_scaled,
)


def _gemm_matrix(node, index) -> np.ndarray | None:
    """B' = B or B^T, shape (K, M)."""
    weight = index.constant(node.input[1])
    if weight is None or weight.ndim != 2:
        return None
    return weight.T if get_attr(node, "transB", 0) else weight


def _gemm_bias(node, index, outputs: int) -> np.ndarray | None:
    """beta * C as a length-M vector, or None when C is not per-neuron (e.g. (N, M) with N > 1)."""
    beta = get_attr(node, "beta", 1.0)
    if len(node.input) < 3 or not node.input[2]:
        return np.zeros(outputs)
    bias = index.constant(node.input[2])
    if bias is None:
        return None
    if bias.size == 1:
        return np.full(outputs, beta * float(bias.reshape(-1)[0]))
    if bias.shape[-1] == outputs and bias.size == outputs:
        return beta * bias.reshape(-1).astype(np.float64)
    return None


@register
class GemmRule(Rule):
    op_types = ("Gemm",)

    def propagate(self, node, analysis):
        a = analysis.feature(node.input[0])
        matrix = _gemm_matrix(node, analysis.index)
        if a is None or matrix is None or get_attr(node, "transA", 0) or a.rank != 2 or a.axis != 1:
            analysis.barrier(node, "needs a (N, K) feature input and a constant weight")
            return
        if matrix.shape[0] != a.size:
            analysis.barrier(node, "weight shape does not match the input features")
            return
        outputs = matrix.shape[1]
        bias = _gemm_bias(node, analysis.index, outputs)
        nonzero = matrix != 0
        dead = ~np.any(nonzero[~a.zero], axis=0)
        if bias is None:
            dead[:] = False
            bias = np.zeros(outputs)
        out = analysis.fresh(node, node.output[0], outputs, 1, 2, const=dead, value=bias)
        analysis.share_weight(node.input[1], a.ids, out.ids)
        block_reduced_channels(analysis, node, node.input[0], a, np.any(nonzero, axis=1),
                               absorbs_constants=_gemm_bias(node, analysis.index, outputs) is not None)

    counts_macs = True

    def filters(self, node, index):
        return _gemm_matrix(node, index).T

    def reduction(self, node, slot):
        return "full" if slot == 0 else "none"

    def macs(self, node, dims):
        """``K * M`` per row, whatever the batch."""
        w = dims(node.input[1])
        return int(w[0] * w[1]) if w is not None and len(w) == 2 else None

    def fold_output_scale(self, node, index, weights, s):
        """``B'[:, m] *= s[m]``, ``C[m] *= s[m]`` (C broadcast to M entries)."""
        weight = index.constant(node.input[1])
        trans_b = get_attr(node, "transB", 0)
        if weight is None or get_attr(node, "transA", 0) or weight.shape[0 if trans_b else 1] != len(s):
            return False
        has_bias = len(node.input) > 2 and bool(node.input[2])
        bias = index.constant(node.input[2]) if has_bias else None
        if has_bias and bias is None:
            return False
        write_scaled(weights, node, 1, weight, s[:, None] if trans_b else s[None, :])
        if bias is not None:
            full = np.broadcast_to(bias, np.broadcast_shapes(bias.shape, (len(s),)))
            write_scaled(weights, node, 2, full, s)
        return True

    def scaled_input_weight(self, node, slot, index, s):
        """``B'[k] *= s[k]``."""
        weight = index.constant(node.input[1])
        trans_b = get_attr(node, "transB", 0)
        if slot != 0 or weight is None or get_attr(node, "transA", 0) or weight.shape[1 if trans_b else 0] != len(s):
            return None
        return weight.astype(np.float64) * (s[None, :] if trans_b else s[:, None])

    def rewrite(self, node, rewriter):
        keeps = layer_keeps(node, rewriter)
        if keeps is None:
            return
        keep_out, keep_in = keeps
        index = rewriter.index
        weight = index.constant(node.input[1])
        trans_b = get_attr(node, "transB", 0)
        matrix = weight.T if trans_b else weight
        outputs = matrix.shape[1]
        a = rewriter.info(node.input[0])
        absorb = ~keep_in & a.const & (a.value != 0)
        new_matrix = matrix[keep_in][:, keep_out]
        rewriter.weights.write(node, 1, new_matrix.T if trans_b else new_matrix,
                               key=("gemm", trans_b, keep_out.tobytes(), keep_in.tobytes()))
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if absorb.any():
            alpha = get_attr(node, "alpha", 1.0)
            bias = _gemm_bias(node, index, outputs) + alpha * (a.value[absorb] @ matrix[absorb].astype(np.float64))
            rewriter.set_bias(node, 2, bias[keep_out].astype(weight.dtype))
            set_attr(node, "beta", 1.0)
        elif has_bias and index.constant(node.input[2]).shape[-1:] == (outputs,):
            slice_bias(node, rewriter, keep_out)


def _channelwise(node, info: dict) -> bool:
    a = info.get(node.input[0])
    return a is not None and a.axis != a.rank - 1


@register
class MatMulRule(Rule):
    op_types = ("MatMul",)

    def propagate(self, node, analysis):
        a = analysis.feature(node.input[0])
        matrix = analysis.index.constant(node.input[1])
        if a is None or matrix is None or matrix.ndim != 2:
            analysis.barrier(node, "needs a feature input and a constant 2-D weight")
            return
        if a.axis != a.rank - 1:  # (N, C, L) @ (L, M): per-channel, channels pass through
            zero = a.zero
            pass_through(node, analysis, a.with_values(zero, np.zeros(a.size)))
            return
        if matrix.shape[0] != a.size:
            analysis.barrier(node, "weight rows do not match the input features")
            return
        nonzero = matrix != 0
        dead = ~np.any(nonzero[~a.zero], axis=0)
        out = analysis.fresh(node, node.output[0], matrix.shape[1], a.rank - 1, a.rank, const=dead,
                             value=np.zeros(matrix.shape[1]))
        analysis.share_weight(node.input[1], a.ids, out.ids)
        block_reduced_channels(analysis, node, node.input[0], a, np.any(nonzero, axis=1), False, " (no bias)")

    def allows_empty_input(self, node, slot, plan):
        return _channelwise(node, plan.analysis.info)

    counts_macs = True

    def filters(self, node, index):
        return index.constant(node.input[1]).T

    def reduction(self, node, slot):
        return "full" if slot == 0 else "none"

    def macs(self, node, dims):
        """``K * M`` for (N, K) @ (K, M); ``rows * K * M`` per sample for (N, ..., K) @ (K, M)."""
        x, w, y = dims(node.input[0]), dims(node.input[1]), dims(node.output[0])
        if w is not None and len(w) == 2 and (x is None or len(x) == 2):
            return int(w[0] * w[1])
        if x is None or w is None or y is None or any(d is None for d in list(x[1:]) + list(w) + list(y[1:])):
            return None
        if len(x) < 2 or len(w) < 2:
            return None
        rows = int(np.prod(x[1:-1], dtype=np.int64)) if len(x) > 2 else 1
        return int(rows * x[-1] * w[-1])

    def scaled_input_weight(self, node, slot, index, s):
        """``B[k] *= s[k]`` for a (N, K) input."""
        weight = index.constant(node.input[1])
        if slot != 0 or weight is None or weight.ndim != 2 or weight.shape[0] != len(s) \
                or len(index.shape(node.input[0]) or ()) != 2:
            return None
        return weight.astype(np.float64) * s[:, None]

    def rewrite(self, node, rewriter):
        keeps = layer_keeps(node, rewriter)
        if keeps is None or _channelwise(node, rewriter.analysis.info):
            return
        keep_out, keep_in = keeps
        matrix = rewriter.index.constant(node.input[1])
        rewriter.weights.write(node, 1, matrix[keep_in][:, keep_out],
                               key=("matmul", keep_out.tobytes(), keep_in.tobytes()))
