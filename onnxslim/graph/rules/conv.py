"""Conv and ConvTranspose: they create output channels and reduce over input channels.

Conv, weight W (Cout, Cin/g, k...), g groups of a = Cin/g inputs and b = Cout/g outputs::

    y[o] = b[o] + sum_{i in group(o)} W[o, i] * x[i]

* Output ``o`` is the constant ``b[o]`` when ``W[o, i] = 0`` for every input ``i`` that is not zero
  (a dead filter, or a filter reading only deleted channels).
* g = 1: input ``i`` may go when it is zero, when column ``W[:, i]`` is all zero (unused), or when it is a
  constant ``v`` and the conv has no spatial padding: then ``b'[o] = b[o] + v * sum_k W[o, i, k]`` exactly
  (with groups, over the outputs ``o`` of the input's group).
* g > 1 (grouped, depthwise with a multiplier): input ``k*a + j`` feeds only the ``b`` outputs of group
  ``k``, so the conv holds a live input only while an output of its group is kept (a conditional keep;
  a group whose outputs all go frees its inputs). Deleting channels keeps the conv exact as long as the
  groups stay equal: **every group that stays keeps the same number a' >= 1 of inputs and b' >= 1 of
  outputs** (they may sit at different positions: each group's filters are sliced with their own
  columns), and a group goes only with all its inputs and outputs. The plan is settled to that
  condition by restoring deleted channels (always exact); the group count becomes the groups that stay.
  Plain depthwise convs (a = b = 1) couple input ``i`` with output ``i``: the same plan in one unit.
* A depthwise Conv (a = 1) whose input a Concat reads too (GhostNet's ``Concat(x, DWConv(x))``) does
  not couple: a group whose outputs all go while its input stays in the Concat leaves the conv through a
  ``Gather`` of the input channels of the groups that stay (``y[o] = W[o] * x[g(o)]`` reads nothing
  else, so the result is exact). Other shared inputs (a residual stream feeding a depthwise branch,
  BlazeFace) stay coupled: there the stream's classes go whole, with no Gather in every block.
* A Conv whose input holds the channels on a spatial axis (ECA-Net's ``Conv1d`` over the pooled channels,
  Wang et al. CVPR 2020), stride 1, output as long as its input: output position ``c`` reads the window
  around input position ``c``. Its outputs are new channels that go by a ``Gather`` after it; an input
  channel may go when it is a constant (a mask's zero): a ``Gather`` / ``Mul`` / ``Add`` before the conv
  puts its value back at its position, so no neighbour shifts into another's window. Strided or
  length-changing ones are barriers.

ConvTranspose, W (Cin, Cout/g, k...): the same with the roles of the weight axes swapped; its outputs
overlap, so constants cannot be absorbed.
"""

from __future__ import annotations

import numpy as np

from onnxslim.graph.model import get_attr, set_attr
from onnxslim.graph.rules.base import (
    Rule,
    block_reduced_channels,
    gather_input,
    insert_after,
    insert_before,
    keep_all,
    layer_keeps,
    normalize_axis,
    register,
    saturation_note,
    scale_vector,
    slice_bias,
    write_scaled,
)
from onnxslim.graph.values import STRUCTURAL


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


def _slides_along_channels(node, x, weight) -> bool:
    """A Conv whose input holds the channels on a spatial axis ``d`` (ECA-Net's Conv1d over the pooled
    channels, Wang et al. CVPR 2020), with stride 1 and an output as long as its input along ``d``
    (``pads = dilation * (k - 1)``): output position ``c`` is a window centred on input position ``c``."""
    if node.op_type != "Conv" or x is None or weight is None or x.axis < 2 or x.axis - 2 >= weight.ndim - 2:
        return False
    d, kernels = x.axis - 2, weight.ndim - 2
    auto_pad = get_attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    stride = (get_attr(node, "strides") or [1] * kernels)[d]
    window = (get_attr(node, "dilations") or [1] * kernels)[d] * (weight.shape[2 + d] - 1)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return stride == 1
    pads = [0] * (2 * kernels) if auto_pad == "VALID" else get_attr(node, "pads") or [0] * (2 * kernels)
    return stride == 1 and pads[d] + pads[d + kernels] == window


def _along_channels(node, analysis, x) -> None:
    """Channel facts of a Conv sliding along the channel axis (:func:`_slides_along_channels`). Every
    output position mixes its neighbours, so the output gets new ids (not a layer: prune chooses nothing
    there) and loses positions by a ``Gather`` after the conv. An input channel may go when it is a
    constant (a mask's zero): the rewrite puts its value back at its position before the conv, so no
    neighbour shifts into another's window; a live one stays."""
    block_reduced_channels(analysis, node, node.input[0], x, np.ones(x.size, bool), absorbs_constants=True)
    out = analysis.fresh(None, node.output[0], x.size, x.axis, x.rank)
    readers = analysis.index.uses(node.output[0])
    if len(readers) == 1 and readers[0].node.op_type == "Gather" and readers[0].slot == 0 \
            and normalize_axis(get_attr(readers[0].node, "axis", 0), x.rank) == x.axis:
        # a slimmed ECA conv already: its Gather takes the positions it needs (a second slim changes nothing)
        analysis.keep(out.ids, STRUCTURAL, "a Gather after it takes the positions its readers need")


def _rewrite_along_channels(node, rewriter) -> None:
    """``y = conv(restore(x'))[kept]``: ``restore`` = ``Gather`` of each position's slot in the sliced
    input, ``Mul`` by 1 at kept positions (0 where a channel went), ``Add`` of the deleted constants'
    values; then a ``Gather`` of the kept output positions. Both on the pooled vector: a few C elements."""
    x = rewriter.info(node.input[0])
    keep_in, keep_out = rewriter.keep(node.input[0]), rewriter.keep(node.output[0])
    dtype = rewriter.index.constant(node.input[1]).dtype
    if keep_in is not None and not keep_in.all():
        broadcast = (-1, *[1] * (x.rank - 1 - x.axis))
        gather_input(node, rewriter, x.axis, np.where(keep_in, np.cumsum(keep_in) - 1, 0))
        _insert_before(node, rewriter, "Mul", keep_in.astype(dtype).reshape(broadcast))
        fill = np.where(keep_in, 0.0, x.value).astype(dtype)
        if fill.any():
            _insert_before(node, rewriter, "Add", fill.reshape(broadcast))
    if keep_out is not None and not keep_out.all():
        _gather_output(node, rewriter, x.axis, np.flatnonzero(keep_out))


def _insert_before(node, rewriter, op_type: str, constant: np.ndarray) -> None:
    """Feed ``node`` ``op_type(its input 0, constant)`` from a new node inserted before it."""
    name = rewriter.index.fresh_name(f"{node.input[0]}_{op_type.lower()}")
    insert_before(node, rewriter, op_type, name, rewriter.weights.add(f"{name}_operand", constant))


def _gather_output(node, rewriter, axis: int, positions: np.ndarray) -> None:
    """``node`` writes a new name; a ``Gather`` of ``positions`` along ``axis`` after it writes the old one."""
    index, original = rewriter.index, node.output[0]
    hidden = index.fresh_name(f"{original}_all")
    indices = rewriter.weights.add(f"{original}_kept", positions.astype(np.int64))
    insert_after(node, rewriter, "Gather", hidden, indices, index.fresh_name(original), axis=int(axis))


def _unreadable(x, weight) -> str | None:
    """Why a Conv / ConvTranspose cannot follow channels through its input ``x`` and ``weight``, or None."""
    if x is None:
        return "input without channel facts"
    if weight is None:
        return "weights that are not constant (computed at run time)"
    if x.axis != 1:  # a Conv along the channel axis that is strided or changes its length
        return (f"convolves along the channel axis (its input's axis {x.axis} holds the channels) with a stride "
                "or a window that changes its length")
    return None


def _static_shapes(node, dims, weight_slot: int = 1) -> tuple[tuple, tuple, tuple] | None:
    """(x, W, y) shapes when static past the batch axis (W, input ``weight_slot``, entirely), else None."""
    x, w, y = dims(node.input[0]), dims(node.input[weight_slot]), dims(node.output[0])
    if x is None or w is None or y is None or any(d is None for d in list(x[1:]) + list(w) + list(y[1:])):
        return None
    return x, w, y


def _groups(node, x_ids: np.ndarray, y_ids: np.ndarray) -> tuple[int, int, int] | None:
    """(g, a, b): groups, input channels and output channels per group; None when they do not divide."""
    groups = get_attr(node, "group", 1)
    if groups < 1 or len(x_ids) % groups or len(y_ids) % groups:
        return None
    return groups, len(x_ids) // groups, len(y_ids) // groups


def gathers_input(node, index, groups: int, per_group: int) -> bool:
    """Whether the Conv ``node`` drops a group whose outputs all go by a Gather of its input (see the
    module docstring): a depthwise Conv (``per_group`` = 1 input per group, ``groups`` > 1) whose input
    a Concat reads too (GhostNet's Ghost module)."""
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx") and groups > 1 and per_group == 1 \
        and any(use.node.op_type == "Concat" for use in index.uses(node.input[0]))


def _block_per_group(analysis, node, x, out, used: np.ndarray, groups: int, absorbs: bool, why: str) -> None:
    """Keep the live inputs that group ``k``'s weights use, while an output of group ``k`` is kept.

    ``used`` (g, a): whether any filter of the group reads its ``j``-th input. With one group the keep is
    unconditional (as for any reducing consumer)."""
    a, b = x.size // groups, out.size // groups
    if groups == 1:
        block_reduced_channels(analysis, node, node.input[0], x, used[0], absorbs, why)
        return
    if a == 1 and b == 1 and not gathers_input(node, analysis.index, groups, a):
        # plain depthwise: input i and output i go together, one unit (same plan)
        analysis.couple(x.ids, out.ids)
        return
    for k in range(groups):
        block_reduced_channels(analysis, node, node.input[0], x.take(np.arange(k * a, (k + 1) * a)), used[k],
                               absorbs, why, trigger=out.ids[k * b:(k + 1) * b])


def conv_channels(node, analysis, x, nonzero: np.ndarray, bias: np.ndarray, absorbs: bool,
                  reads_every_input: bool = False, weight_slot: int = 1) -> None:
    """The channel facts of a Conv-like node (Conv, ConvInteger, QLinearConv) with weight mask ``nonzero``
    (Cout, Cin/g, k...) read from input ``weight_slot``: output ``o`` is the constant ``bias[o]`` when it
    reads no live input through a non-zero weight; input channels are held as :func:`_block_per_group`
    says (``absorbs``: constants go into the bias; ``reads_every_input``: an input channel no filter reads
    is held anyway)."""
    groups = get_attr(node, "group", 1)
    cout, per_group = nonzero.shape[0], nonzero.shape[1]
    if per_group * groups != x.size or cout % groups:
        analysis.barrier(node, "weight shape does not match the input channels")
        return
    nonzero = np.any(nonzero.reshape(cout, per_group, -1), axis=2)  # (Cout, Cin/g)
    # live input of (o, j): input channel (o // b) * a + j
    b = cout // groups
    live = ~x.zero
    live_in = live[(np.arange(cout) // b)[:, None] * per_group + np.arange(per_group)[None, :]]
    dead = ~np.any(nonzero & live_in, axis=1)
    out = analysis.fresh(node, node.output[0], cout, 1, x.rank, const=dead, value=bias)
    analysis.share_weight(node.input[weight_slot], x.ids, out.ids)
    used = nonzero.reshape(groups, b, per_group).any(axis=1)  # (g, a)
    if reads_every_input:
        used = np.ones_like(used)
    _block_per_group(analysis, node, x, out, used, groups, absorbs, " (spatial padding)")


def _balance_groups(plan, node, x_ids: np.ndarray, y_ids: np.ndarray) -> bool:
    """Restore channels so every group that stays keeps the same number of inputs and of outputs.

    A group stays when it keeps any input or output; it then needs at least one of each. The restored
    channels are the first deleted ones of the group (restoring is always exact)."""
    shape = _groups(node, x_ids, y_ids)
    if shape is None or shape[0] == 1:
        return False
    groups, a, b = shape
    keep_in = ~plan.removed[x_ids].reshape(groups, a)
    keep_out = ~plan.removed[y_ids].reshape(groups, b)
    kin, kout = keep_in.sum(axis=1), keep_out.sum(axis=1)
    # a group stays with an output; or, unless a Gather can drop its input, with an input
    alive = (kout > 0) if gathers_input(node, plan.analysis.index, groups, a) else (kin > 0) | (kout > 0)
    if not alive.any():
        return False
    target_in, target_out = max(int(kin[alive].max()), 1), max(int(kout[alive].max()), 1)
    restore = []
    for k in np.flatnonzero(alive):
        restore.extend(x_ids[k * a + np.flatnonzero(~keep_in[k])[: target_in - kin[k]]])
        restore.extend(y_ids[k * b + np.flatnonzero(~keep_out[k])[: target_out - kout[k]]])
    label = f"kept so that the groups of {node.op_type} '{plan.analysis.index.node_name(node)}' stay equal"
    return plan.restore(restore, label)


def _kept_by_group(keep_in: np.ndarray, keep_out: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Local positions (within their group) of the kept inputs and outputs of the groups that stay:
    arrays (g', a') and (g', b'), and the settled plan guarantees they are rectangular."""
    a, b = len(keep_in) // groups, len(keep_out) // groups
    alive = keep_in.reshape(groups, a).any(axis=1)
    kept_in = keep_in.reshape(groups, a)[alive]
    kept_out = keep_out.reshape(groups, b)[alive]
    local_in = np.nonzero(kept_in)[1].reshape(len(kept_in), -1)
    local_out = np.nonzero(kept_out)[1].reshape(len(kept_out), -1)
    return local_in, local_out


def _kept_rows_and_columns(keep_rows, keep_cols, groups: int, rows_are_out: bool):
    """Index arrays selecting the new weight from W (rows: the per-group axis 0, cols: axis 1)."""
    keep_in, keep_out = (keep_cols, keep_rows) if rows_are_out else (keep_rows, keep_cols)
    local_in, local_out = _kept_by_group(keep_in, keep_out, groups)
    local_rows, local_cols = (local_out, local_in) if rows_are_out else (local_in, local_out)
    per_row = len(keep_rows) // groups
    alive = np.flatnonzero(keep_in.reshape(groups, -1).any(axis=1))
    rows = (alive[:, None] * per_row + local_rows).reshape(-1)
    cols = np.repeat(local_cols, local_rows.shape[1], axis=0)
    return rows[:, None], cols, len(alive)


def slice_conv_weight(node, rewriter, keep_out: np.ndarray, keep_in: np.ndarray, slot: int = 1) -> None:
    """Write the kept filters and input columns of the Conv-like weight (Cout, Cin/g, k...) at input
    ``slot``, and the count of groups that stay."""
    groups = get_attr(node, "group", 1)
    weight = rewriter.weights.read(node, slot)
    rows, cols, kept_groups = _kept_rows_and_columns(keep_out, keep_in, groups, rows_are_out=True)
    rewriter.weights.write(node, slot, weight[rows, cols], key=("conv", groups, keep_out.tobytes(), keep_in.tobytes()))
    if groups > 1:
        set_attr(node, "group", kept_groups)


class _GroupedLayer(Rule):
    """What Conv and ConvTranspose share: groups stay equal (settle), an empty input goes with the node, and
    the input is reduced fully (group 1) or per group."""

    def settle(self, node, plan):
        x, y = plan.analysis.info.get(node.input[0]), plan.analysis.info.get(node.output[0])
        return x is not None and y is not None and _balance_groups(plan, node, x.ids, y.ids)

    def allows_empty_input(self, node, slot, plan):
        return slot == 0 and plan.deletes(node)

    def reduction(self, node, slot):
        return "none" if slot != 0 else "full" if get_attr(node, "group", 1) == 1 else "grouped"

    def channel_groups(self, node):
        return get_attr(node, "group", 1)


@register
class ConvRule(_GroupedLayer):
    op_types = ("Conv",)

    def propagate(self, node, analysis):
        index = analysis.index
        x = analysis.feature(node.input[0])
        weight = index.constant(node.input[1])
        if _slides_along_channels(node, x, weight):
            _along_channels(node, analysis, x)
            return
        why = _unreadable(x, weight)
        if why:
            analysis.barrier(node, why)
            return
        conv_channels(node, analysis, x, weight != 0, _bias(analysis, node, weight.shape[0]),
                      absorbs=not has_padding(node, weight.shape[2:]))

    counts_macs = True

    def filters(self, node, index):
        weight = index.constant(node.input[1])
        return weight.reshape(weight.shape[0], -1)

    def macs(self, node, dims):
        """``Cout * prod(out spatial) * Cin/g * prod(kernel)``."""
        shapes = _static_shapes(node, dims, self.weight_slot)
        return None if shapes is None else int(np.prod(shapes[2][1:], dtype=np.int64) * np.prod(shapes[1][1:], dtype=np.int64))

    def plan_notes(self, analysis, plan):
        """QDQ convs (onnxruntime fuses DQ -> Conv -> Q into a QLinearConv, whose u8s8 kernels saturate
        like ConvInteger's) that lose input channels: a YOLOv8-lite face detector from ``quantize_static``
        with int8 weights differed from its prune reference by up to 0.95; with ``reduce_range=True``,
        bit for bit."""
        index = analysis.index
        return saturation_note([index.node_name(node) for node in index.nodes
                                if analysis.rule_for(node) is self and _saturates(node, index, plan)], "QDQ conv(s)")

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

    def settle(self, node, plan):
        return not _slides_along_channels(node, plan.analysis.info.get(node.input[0]), plan.analysis.index.constant(
            node.input[1])) and super().settle(node, plan)

    def rewrite(self, node, rewriter):
        if _slides_along_channels(node, rewriter.info(node.input[0]), rewriter.index.constant(node.input[1])):
            _rewrite_along_channels(node, rewriter)
            return
        keeps = layer_keeps(node, rewriter)
        if keeps is None:
            return
        keep_out, keep_in = keeps
        weight = rewriter.weights.read(node, 1)
        groups = get_attr(node, "group", 1)
        cout, per_group = weight.shape[0], weight.shape[1]
        x = rewriter.info(node.input[0])
        absorb = ~keep_in & x.const & (x.value != 0)
        if absorb.any():  # b'[o] = b[o] + sum_j v[j] * sum_k W[o, j, k] over the deleted constant inputs j
            sums = weight.reshape(cout, per_group, -1).sum(axis=2, dtype=np.float64)
            values = np.where(absorb, x.value, 0.0).reshape(groups, per_group)
            bias = _bias(rewriter, node, cout) + np.einsum("gbj,gj->gb", sums.reshape(groups, -1, per_group), values).reshape(-1)
            rewriter.set_bias(node, 2, bias[keep_out].astype(weight.dtype))
        else:
            slice_bias(node, rewriter, keep_out)
        if gathers_input(node, rewriter.index, groups, per_group):
            keep_in = _gather_live_groups(node, rewriter, keep_out, keep_in, groups)
        slice_conv_weight(node, rewriter, keep_out, keep_in)


def _saturates(node, index, plan) -> bool:
    """A Conv of ``DequantizeLinear``'d uint8 activations (perhaps through a mask ``Mul``) and int8
    weights beyond 7 bits (``|q - zp| > 64``) that loses input channels, not depthwise (one channel per
    filter: no pairs change)."""
    keep = plan.keep(node.input[0])
    source = index.producer.get(node.input[0])
    while source is not None and source.op_type == "Mul" and index.is_const(source.input[1]):
        source = index.producer.get(source.input[0])  # a mask between the DequantizeLinear and the conv
    if keep is None or keep.all() or source is None or source.op_type != "DequantizeLinear" \
            or len(node.input) < 2 or node.input[1] not in index.quantized:
        return False
    activations = index.constant(source.input[2]) if len(source.input) > 2 and source.input[2] else None
    q, _, zero_point, axis = index.quantization(node.input[1])
    if activations is None or activations.dtype != np.uint8 or q.dtype != np.int8 or q.shape[1] == 1:
        return False
    zero_point = np.zeros(1) if zero_point is None else np.asarray(zero_point, np.int32)
    if axis is not None and zero_point.size > 1:
        zero_point = zero_point.reshape([-1 if a == axis else 1 for a in range(q.ndim)])
    return bool(np.abs(q.astype(np.int32) - zero_point).max() > 64)


def _gather_live_groups(node, rewriter, keep_out: np.ndarray, keep_in: np.ndarray, groups: int) -> np.ndarray:
    """A depthwise Conv whose input stays for other readers: when groups whose outputs all go keep their
    input channel, the conv reads ``Gather(x, kept channels of the groups that stay, axis=1)`` instead
    (a new node before it). Returns the input channels the conv then reads (per original channel)."""
    live = keep_out.reshape(groups, -1).any(axis=1)  # one input channel per group
    if not (keep_in & ~live).any():
        return keep_in
    gather_input(node, rewriter, 1, np.flatnonzero(live[keep_in]))  # positions in the input as sliced
    return keep_in & live


@register
class ConvTransposeRule(_GroupedLayer):
    op_types = ("ConvTranspose",)

    def propagate(self, node, analysis):
        index = analysis.index
        x = analysis.feature(node.input[0])
        weight = index.constant(node.input[1])
        why = _unreadable(x, weight) or (weight.shape[0] != x.size and "weight shape does not match the input channels")
        if why:
            analysis.barrier(node, why)
            return
        groups = get_attr(node, "group", 1)
        cin, per_group = weight.shape[0], weight.shape[1]
        if cin % groups:
            analysis.barrier(node, "weight shape does not match the groups")
            return
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
        used = nonzero.any(axis=1).reshape(groups, a)
        _block_per_group(analysis, node, x, out, used, groups, False, " (transposed convolution outputs overlap)")
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
        rows, cols, kept_groups = _kept_rows_and_columns(keep_in, keep_out, groups, rows_are_out=False)
        weights.write(node, 1, weight[rows, cols], key=("convT", groups, keep_out.tobytes(), keep_in.tobytes()))
        if groups > 1:
            set_attr(node, "group", kept_groups)
        slice_bias(node, rewriter, keep_out)
