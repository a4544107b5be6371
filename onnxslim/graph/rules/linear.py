"""Gemm, MatMul and Einsum: fully connected layers over a (N, K) feature, and their generalisations.

Gemm ``Y = alpha * A @ B' + beta * C`` with B' = B or B^T (K, M):

* output neuron ``m`` is the constant ``beta * C[m]`` when ``B'[k, m] = 0`` for every non-zero input ``k``;
* input feature ``k`` may go when it is zero, unused (row ``B'[k]`` all zero), or a constant ``v``:
  ``C'[m] = beta * C[m] + alpha * v * B'[k, m]`` (written with beta = 1) absorbs it exactly.

A (N, C, H, W) map flattened into A carries each channel as a block of H*W features (see layout), so a
deleted channel removes a block of rows of B'.

MatMul ``Y = A @ B`` with constant 2-D B: on an A whose channel axis is the last it is Gemm applied to
every row, without bias unless an Add of a constant (M,) vector is its only reader (then that bias
absorbs constant input channels as Gemm's does): ``(N, K) @ (K, M)``, and ``(N, ..., K) @ (K, M)``
as torch exports ``nn.Linear`` on a sequence or an NHWC map (ConvNeXt's pointwise MLP, a Conv1d's
output transposed to (N, L, C), tf2onnx's Dense on a rank-4 tensor); the output's last axis holds the M
new channels. On an A whose channel axis is not the last it acts on each channel separately
(``(N, C, L) @ (L, M)``) and passes channels through.

MatMul of a feature and a computed (or non-2-D) operand ``Y[..., m, n] = sum_k A[..., m, k] B[..., k, n]``:
row ``m`` of Y reads row ``m`` of A only, column ``n`` reads column ``n`` of B only. So channels on A's
row axis (the second last) pass to Y's second last axis (attention pooling ``(N, C, HW) @ (N, HW, 1)``,
GCNet's context ``(N, 1, C, HW) @ (N, 1, HW, 1)``), and channels on B's last axis pass to Y's last axis
(``attention @ V`` with V's channels last); a zero channel stays zero, deleting it deletes a row (column)
of Y and nothing else. The other operand is read whole: its channels are kept. Two features whose
channels are the summed axis, A's last and B's second last (``q @ k^T`` attention scores of a non-local
block): term ``k`` is ``A[..., k] B[..., k, :]``, so their channels are coupled and kept unless one of
the two is zero; Y's axes are rows and columns, not channels.

Einsum of two features that both carry the channel letter on their channel axes, kept in the output
(``bchw,bc->bchw``), multiplies channel by channel: their channels are coupled. Einsum of a feature map
and a constant 2-D weight that sums the channel letter against the weight's
other letter, which becomes a new output axis, every other axis of the feature reaching the output
(``bchw,oc->bohw``, ``torch.einsum`` as a 1x1 conv, which both torch exporters keep as Einsum;
``...c,co->...o``), is MatMul over those axes: zero input channels go with the weight's rows, output
channels with its columns. An equation that leaves the channel letter alone passes channels through.
Source: ONNX operator spec, Einsum-12 (``...`` broadcasting, the implicit output in alphabetical order).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from onnxslim.graph.model import get_attr, set_attr
from onnxslim.graph.rules.base import (
    Rule,
    block_reduced_channels,
    filter_scores,
    keep_all,
    layer_keeps,
    pass_through,
    register,
    slice_bias,
    write_scaled,
)
from onnxslim.graph.values import BARRIER, LIVE


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


def _passing_forms(node, analysis) -> list[str]:
    """The forms of a MatMul with a computed (or non-2-D) B in which a feature's channels reach Y:
    "rows" (A's on its second last axis), "columns" (B's on its last axis)."""
    a, b = (analysis.feature(name) for name in node.input[:2])
    rank_a, rank_b = (len(analysis.index.shape(name) or ()) for name in node.input[:2])
    forms = []
    if a is not None and a.rank >= 2 and a.axis == a.rank - 2 and rank_b >= 2:
        forms.append("rows")
    if b is not None and b.rank >= 2 and b.axis == b.rank - 1 and rank_a >= 2:
        forms.append("columns")
    if len(forms) == 2 and analysis.kept_by(BARRIER)[a.ids].all():  # pass the side still free to go
        forms.reverse()
    return forms


def _channelwise(node, info: dict) -> bool:
    """Y carries the channels of an input (their ids): a per-channel product, rows or columns passed."""
    out = info.get(node.output[0])
    return out is not None and any(
        name in info and np.array_equal(info[name].ids, out.ids) for name in node.input[:2])


def _pass_rows_or_columns(node, analysis, form: str) -> None:
    """"rows" / "columns" (see :func:`_passing_forms`): the feature's channels reach Y (zero stays zero,
    a constant does not: it meets the other operand's values); the other operand's are kept."""
    slot = 0 if form == "rows" else 1
    x, other = analysis.feature(node.input[slot]), analysis.feature(node.input[1 - slot])
    if other is not None:
        keep_all(analysis, node, other, f"read whole by the MatMul that passes the {form} of '{node.input[slot]}'")
    rank = max(x.rank, len(analysis.index.shape(node.input[1 - slot]) or ()))
    info = x.with_values(x.zero, np.zeros(x.size))
    info.axis, info.rank = rank - (2 if form == "rows" else 1), rank
    analysis.set(node.output[0], info)


def _contracts_channels(node, analysis) -> bool:
    """Both operands are features, A's channels on its last axis and B's on its second last, as many:
    ``Y[..., m, n] = sum_k A[..., m, k] B[..., k, n]`` sums over their channels (attention scores
    ``q @ k^T`` of a non-local block, SAGAN, DANet)."""
    a, b = (analysis.feature(name) for name in node.input[:2])
    return (a is not None and b is not None and a.rank >= 2 and b.rank >= 2 and a.axis == a.rank - 1
            and b.axis == b.rank - 2 and a.size == b.size)


def _contract_channels(node, analysis) -> None:
    """The channel sum of :func:`_contracts_channels`: term ``k`` is ``A[..., k] * B[..., k, :]``, zero
    when either channel is zero, and deleting channel ``k`` of both removes exactly that term. So the
    two channels ``k`` are coupled and kept unless one of them is zero. Y's axes are rows of A and
    columns of B, not channels: its ids are fresh and kept."""
    a, b = (analysis.feature(name) for name in node.input[:2])
    analysis.couple(a.ids, b.ids)
    label = f"MatMul '{analysis.index.node_name(node)}'"
    live = ~(a.zero | b.zero)
    analysis.keep(a.ids[live], LIVE, f"live (non-zero) in '{node.input[0]}' and '{node.input[1]}', "
                                     f"multiplied and summed by {label}")
    shape = analysis.index.shape(node.output[0])
    rank = max(a.rank, b.rank)
    size = shape[rank - 2] if shape is not None and len(shape) == rank else None
    if size:
        out = analysis.fresh(None, node.output[0], size, rank - 2, rank)
        analysis.keep(out.ids, BARRIER, f"rows of the channel sum of {label}")


@register
class MatMulRule(Rule):
    op_types = ("MatMul",)

    def propagate(self, node, analysis):
        a = analysis.feature(node.input[0])
        matrix = analysis.index.constant(node.input[1])
        if a is None or matrix is None or matrix.ndim != 2:
            forms = _passing_forms(node, analysis)
            if forms:
                _pass_rows_or_columns(node, analysis, forms[0])
            elif _contracts_channels(node, analysis):
                _contract_channels(node, analysis)
            else:
                analysis.barrier(node, "needs a feature input and a constant 2-D weight, or a feature's "
                                       "channels on A's second last or B's last axis")
            return
        if a.axis != a.rank - 1:  # (N, C, L) @ (L, M): per-channel, channels pass through
            zero = a.zero
            pass_through(node, analysis, a.with_values(zero, np.zeros(a.size)))
            return
        if matrix.shape[0] != a.size:
            analysis.barrier(node, "weight rows do not match the input features")
            return
        nonzero = matrix_output_channels(node, analysis, a, matrix)
        block_reduced_channels(analysis, node, node.input[0], a, np.any(nonzero, axis=1),
                               _bias_add(node, analysis.index, a.rank) is not None, " (no bias after it)")

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
        matrix = rewriter.index.constant(node.input[1])
        if keeps is None or matrix is None or _channelwise(node, rewriter.analysis.info):
            return  # a product of two features: each shrinks where it is made
        keep_out, keep_in = keeps
        a = rewriter.info(node.input[0])
        absorb = ~keep_in & a.const & (a.value != 0)
        if absorb.any():  # the plan let them go: the Add after it takes value @ rows
            add, slot = _bias_add(node, rewriter.index, a.rank)
            bias = rewriter.index.constant(add.input[slot])
            delta = a.value[absorb] @ matrix[absorb].astype(np.float64)
            rewriter.weights.write(add, slot, (bias.astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype))
        rewriter.weights.write(node, 1, matrix[keep_in][:, keep_out],
                               key=("matmul", keep_out.tobytes(), keep_in.tobytes()))


def matrix_output_channels(node, analysis, a, matrix: np.ndarray, weight_slot: int = 1) -> np.ndarray:
    """The N output channels of ``A @ B`` for a constant 2-D ``B`` (K, N, input ``weight_slot``) read by
    ``A``'s last axis: column ``n`` is a constant zero when its non-zero rows read only zero channels of
    ``A``; ``B``'s rows and columns share ids with ``A``'s and the output's channels. Returns ``B != 0``."""
    nonzero = matrix != 0
    dead = ~np.any(nonzero[~a.zero], axis=0)
    out = analysis.fresh(node, node.output[0], matrix.shape[1], a.rank - 1, a.rank, const=dead,
                         value=np.zeros(matrix.shape[1]))
    analysis.share_weight(node.input[weight_slot], a.ids, out.ids)
    return nonzero


def _bias_add(node, index, rank: int):
    """(Add node, slot of its bias) when the MatMul's output is read only by an Add of a constant with
    one entry per output column (shape (..., M), rank at most the output's): ``nn.Linear`` on a
    sequence, tf2onnx's Dense. That bias absorbs an input channel that is a non-zero constant ``v``:
    ``b' = b + v * B[k]``. None otherwise."""
    out, matrix = node.output[0], index.constant(node.input[1])
    uses = index.uses(out)
    if len(uses) != 1 or out in index.outputs or uses[0].node.op_type != "Add" or uses[0].node.domain not in ("", "ai.onnx") \
            or len(uses[0].node.input) != 2:
        return None
    add, slot = uses[0].node, 1 - uses[0].slot
    bias = index.constant(add.input[slot])
    if bias is None or matrix is None or bias.size != matrix.shape[1] or bias.shape[-1:] != matrix.shape[1:] \
            or bias.ndim > rank:
        return None
    return add, slot


# -- Einsum ---------------------------------------------------------------------------------------

_ELLIPSIS_LETTERS = "0123456789"  # stand-ins for the axes of '...' (digits are no einsum subscripts)


def _equation(node) -> str:
    equation = get_attr(node, "equation", b"")
    return equation.decode() if isinstance(equation, bytes) else equation


def _einsum_terms(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """(input terms, output term) of ``equation`` with ``...`` spelt out as one letter per axis and an
    implicit output made explicit (the ``...`` axes, then the letters used once, in alphabetical
    order: ONNX Einsum-12); None when the equation does not fit the input ranks."""
    equation = equation.replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    fill = ""
    for position, (term, rank) in enumerate(zip(terms, ranks)):
        if "..." in term:
            count = rank - (len(term) - 3)
            if count < 0 or count > len(_ELLIPSIS_LETTERS) or (fill and len(fill) != count):
                return None
            fill = _ELLIPSIS_LETTERS[:count]
            terms[position] = term.replace("...", fill)
        if len(terms[position]) != rank:
            return None
    if not arrow:
        letters = "".join(terms)
        out = fill + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in fill))
    return terms, out.replace("...", fill)


class _EinsumForm(NamedTuple):
    """How an Einsum reads its feature operand (input ``slot``); ``axis`` is the output's channel axis."""

    kind: str  # "contract": a linear layer over the channels; "channelwise": channels pass through
    slot: int
    axis: int
    matrix: np.ndarray | None = None  # "contract": the weight as (K input channels, M output channels)
    transposed: bool = False  # the weight is stored (M, K)
    coupled: bool = False  # "channelwise" of two features that share the channel letter (couple them)


def _einsum_of_features(node, infos) -> _EinsumForm | None:
    """Two features whose channel axes carry one letter that reaches the output (``bchw,bc->bchw``: a
    gate computed from the map): output channel ``c`` is a sum of products that all hold channel ``c`` of
    both operands, so the two are coupled and a zero channel of either stays zero."""
    parsed = _einsum_terms(_equation(node), [info.rank for info in infos])
    if parsed is None:
        return None
    terms, out = parsed
    channel = terms[0][infos[0].axis]
    if terms[1][infos[1].axis] != channel or channel not in out or infos[0].size != infos[1].size \
            or any(len(set(term)) != len(term) for term in [*terms, out]):
        return None
    return _EinsumForm("channelwise", 0, out.index(channel), coupled=True)


def _einsum_form(node, feature_info, index) -> _EinsumForm | None:
    """The form of an Einsum of one feature operand and one constant, from the equation and the
    feature's channel axis: "contract" when the channel letter is summed against a 2-D constant whose
    other letter is a new output axis and every other axis of the feature reaches the output
    (``bchw,oc->bohw``: a 1x1 conv; ``...c,co->...o``: a Linear); "channelwise" when the channel letter
    reaches the output and the constant does not use it (``bchw,wk->bchk``), or two features share it
    (:func:`_einsum_of_features`); None otherwise."""
    if len(node.input) != 2:
        return None
    infos = [feature_info(name) for name in node.input]
    if all(info is not None for info in infos):
        return _einsum_of_features(node, infos)
    constants = [index.constant(name) for name in node.input]
    slots = [s for s in (0, 1) if infos[s] is not None and constants[1 - s] is not None]
    if len(slots) != 1:
        return None
    slot = slots[0]
    x, weight = infos[slot], constants[1 - slot]
    parsed = _einsum_terms(_equation(node), [x.rank, weight.ndim] if slot == 0 else [weight.ndim, x.rank])
    if parsed is None:
        return None
    terms, out = parsed
    term, wterm = terms[slot], terms[1 - slot]
    if len(set(term)) != len(term) or len(set(wterm)) != len(wterm) or len(set(out)) != len(out):
        return None
    channel = term[x.axis]
    if channel in out and channel not in wterm:
        return _EinsumForm("channelwise", slot, out.index(channel))
    new = wterm.replace(channel, "")
    if weight.ndim != 2 or channel not in wterm or channel in out or len(new) != 1 or new in term \
            or sorted(out) != sorted(term.replace(channel, new)):
        return None
    transposed = wterm[0] != channel
    return _EinsumForm("contract", slot, out.index(new), weight.T if transposed else weight, transposed)


@register
class EinsumRule(Rule):
    """Einsum of a feature map and a constant (see :func:`_einsum_form`): a "contract" equation creates
    channels like MatMul (no bias: a non-zero constant channel is kept); a "channelwise" one passes
    them through; any other equation is a barrier. A mask scale next to it is not folded (it stays a
    Mul). ``reduction`` is "full" for both slots: the constant one has no channels to ask about, and a
    channelwise Einsum then only gets a mask in front of it rather than after it."""

    op_types = ("Einsum",)
    counts_macs = True

    def propagate(self, node, analysis):
        form = _einsum_form(node, analysis.feature, analysis.index)
        if form is None:
            analysis.barrier(node, "needs a feature and a constant, contracted over the channels into one new "
                                   "axis, or not touching the channels, or two features sharing the channels")
            return
        x = analysis.feature(node.input[form.slot])
        rank = len(analysis.index.shape(node.output[0]) or ()) or x.rank
        if form.kind == "channelwise":
            zero = x.zero
            if form.coupled:
                other = analysis.feature(node.input[1])
                analysis.couple(x.ids, other.ids)
                zero = zero | other.zero
            info = x.with_values(zero, np.zeros(x.size))
            pass_through(node, analysis, dataclasses.replace(info, axis=form.axis, rank=rank))
            return
        nonzero = form.matrix != 0
        outputs = form.matrix.shape[1]
        dead = ~np.any(nonzero[~x.zero], axis=0)
        out = analysis.fresh(node, node.output[0], outputs, form.axis, rank, const=dead, value=np.zeros(outputs))
        analysis.share_weight(node.input[1 - form.slot], x.ids, out.ids)
        block_reduced_channels(analysis, node, node.input[form.slot], x, np.any(nonzero, axis=1), False, " (no bias)")

    def allows_empty_input(self, node, slot, plan):
        form = _einsum_form(node, plan.analysis.info.get, plan.analysis.index)
        return form is not None and form.kind == "channelwise"

    def channel_scores(self, node, analysis, criterion="l1"):
        form = _einsum_form(node, analysis.info.get, analysis.index)
        return None if form is None or form.kind != "contract" else filter_scores(form.matrix.T, criterion)

    def reduction(self, node, slot):
        return "full"

    def macs(self, node, dims):
        """One multiply-accumulate per combination of the equation's letters, the batch (the output's
        first letter) taken as 1."""
        shapes = [dims(name) for name in node.input]
        parsed = None if any(s is None for s in shapes) else _einsum_terms(_equation(node), [len(s) for s in shapes])
        if parsed is None:
            return None
        sizes = {}
        for term, shape in zip(parsed[0], shapes):
            sizes.update({letter: size for letter, size in zip(term, shape) if size is not None})
        letters = set("".join(parsed[0])) - set(parsed[1][:1])
        if any(letter not in sizes for letter in letters):
            return None
        return int(np.prod([sizes[letter] for letter in letters], dtype=np.int64))

    def rewrite(self, node, rewriter):
        form = _einsum_form(node, rewriter.info, rewriter.index)
        if form is None or form.kind != "contract":
            return
        keep_in, keep_out = rewriter.keep(node.input[form.slot]), rewriter.keep(node.output[0])
        if keep_in is None or keep_out is None or (keep_in.all() and keep_out.all()):
            return
        matrix = form.matrix[keep_in][:, keep_out]
        rewriter.weights.write(node, 1 - form.slot, matrix.T if form.transposed else matrix,
                               key=("einsum", form.transposed, keep_out.tobytes(), keep_in.tobytes()))
