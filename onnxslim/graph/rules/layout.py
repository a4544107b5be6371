"""Ops that move, cut, join or regroup channels.

* Concat on the channel axis: the output's channels are the inputs' channels end to end (offsets);
  an input that loses every channel is dropped from the Concat. A constant input brings fresh channels
  (each a known constant where its slice is one value: PyramidNet's zero channels), sliced by the
  rewrite. Concat on another axis couples the inputs' channels.
* Split / Slice / Gather on the channel axis: each output takes a sub-range (or a list) of the input's
  channels; sizes, bounds and indices are recomputed in the kept numbering. A Slice with a step on the
  channel axis alone (``x.flip(1)``, ``x[:, ::2]``) takes a list of channels: it stays a Slice while the
  kept ones are evenly spaced and becomes a Gather otherwise. GatherND with constant 1-tuples over a
  channel axis 0 is such a Gather (see :class:`GatherNDRule`). On other axes they pass
  channels through.
* Flatten (axis 1) and a Reshape of a (N, C, H, W) map with static C, H, W to (N, C*H*W), with any batch
  N (a constant ``[-1, C*H*W]`` target, or ``Shape -> Gather -> Concat``): feature ``c*H*W + s`` belongs to
  channel ``c``, so a channel becomes a block of H*W features that a Gemm / MatMul reads; the Reshape
  target is rewritten to ``[-1, C'*H*W]``. When H or W is unknown before run time the op is a barrier
  whose reason names ``--input-shape``. A Reshape that keeps (N, C) and regroups the rest
  passes channels through, whatever the rest is at run time (``view(b, c, -1)`` or ``view(b, c, h * w)``
  of a map with a dynamic size; a constant C inside a computed target is rewritten), as does one that leaves the channel axis and the axes after it as they were
  (channels last: Swin's windows, tokens merged with the batch before a Linear). A Reshape that regroups
  channels (a channel shuffle, GroupNorm's groups; with a batch of 1 baked into the target, the whole
  tensor) maps them through :mod:`regroup`; any other Reshape is a barrier, as is Transpose when a
  later op expects channels on axis 1 (it only moves the axis here).
* Squeeze / Unsqueeze / Transpose keep channels and move the channel axis; Expand broadcasts them (its
  shape's channel entry is 1, a constant rewritten to the kept count, or ``Shape(t)`` of a coupled feature);
  Tile that repeats only other axes passes them.
* ScatterND with constant indices writes update channels into data channels (ReXNet's
  ``out[:, 0:c] += x``): each written channel is coupled with the update channel written into it; the
  rewrite keeps the tuples of kept channels, renumbered.
* Shape reads no channel values: it does not keep anything (Reshape targets computed from it are
  handled by the Reshape rule).
"""

from __future__ import annotations

import numpy as np

from onnxslim.graph.channels import BARRIER, ChannelInfo
from onnxslim.graph.model import get_attr, set_attr
from onnxslim.graph.rules.base import (
    BarrierRule,
    Rule,
    feature_or_barrier,
    inputs_nonnegative,
    inputs_positive,
    normalize_axis,
    pass_through,
    register,
    write_int_operand,
)
from onnxslim.graph.rules.regroup import (
    apply_map,
    components,
    depth_to_space_map,
    reshape_map,
    space_to_depth_map,
)
from onnxslim.graph.shape_values import UNKNOWN, Dim, is_dim_of, reshape_target, shape_value, static_values


def _new_positions(keep: np.ndarray) -> np.ndarray:
    """Index of each old channel in the kept numbering (valid where kept)."""
    return np.cumsum(keep) - 1


def _input_or_attr(node, analysis, attr: str, slot: int):
    """An operand given as an attribute (old opsets) or as an input (new ones) that is a constant or
    computable from static shapes (``torch.chunk`` bounds computed from ``Shape``).

    Returns (value or None, known): known is False when the input cannot be computed.
    """
    value = get_attr(node, attr)
    if value is not None:
        return np.asarray(value, np.int64), True
    if len(node.input) > slot and node.input[slot]:
        numbers = static_values(shape_value(analysis.index, node.input[slot]))
        return (None, False) if numbers is None else (np.asarray(numbers, np.int64), True)
    return None, True


class _MovesElements(Rule):
    """Ops that move, copy or select the elements of their data input (input 0) and compute none."""

    def nonnegative(self, node, analysis):
        """>= 0 when the data input is (the output's elements are input elements)."""
        return inputs_nonnegative(node, analysis)

    def positive(self, node, analysis):
        """> 0 when the data input is."""
        return inputs_positive(node, analysis)


@register
class ConcatRule(_MovesElements):
    op_types = ("Concat",)
    passthrough = True

    def propagate(self, node, analysis):
        index = analysis.index
        out_shape = index.shape(node.output[0])
        infos = [analysis.feature(name) for name in node.input]
        features = [i for i in infos if i is not None]
        if not features:
            analysis.barrier(node, "no feature-map input")
            return
        rank = features[0].rank
        axis = normalize_axis(get_attr(node, "axis", 0), rank)
        channel_axis = features[0].axis
        if any(i.axis != channel_axis or i.rank != rank for i in features):
            analysis.barrier(node, "inputs disagree on the channel axis")
            return
        if axis != channel_axis:
            self._along_another_axis(node, analysis, infos, features[0])
            return
        parts = []
        for name, info in zip(node.input, infos):
            if info is not None:
                parts.append(info)
                continue
            constant = index.constant(name)
            if constant is None or constant.ndim != rank:
                analysis.barrier(node, "an input has no known channel axis")
                return
            parts.append(_constant_channels(analysis, constant, channel_axis))
        ids = np.concatenate([p.ids for p in parts])
        if out_shape is not None and out_shape[axis] not in (None, len(ids)):
            analysis.barrier(node, "output channel count does not add up")
            return
        info = features[0].with_values(np.concatenate([p.const for p in parts]), np.concatenate([p.value for p in parts]))
        info.ids = ids
        analysis.set(node.output[0], info)

    @staticmethod
    def _along_another_axis(node, analysis, infos, first) -> None:
        """A Concat along an axis other than the channel axis (ONNX Concat-13: shapes agree off ``axis``):
        output channel ``c`` is channel ``c`` of every input, so the features' ids are coupled (one
        unit) and ``c`` is the constant ``v`` only when it is ``v`` in every input. A constant input (a
        ViT class token ``cat([cls, tokens], 1)``) is ``v`` at ``c`` when its whole slice ``c`` is ``v``; the
        rewrite slices it with the deleted channels. Any other input without channel facts is a barrier."""
        const = first.const.copy()
        for name, info in zip(node.input, infos):
            if info is not None:
                if info.size != first.size:
                    analysis.barrier(node, "inputs have different channel counts")
                    return
                const &= info.const & (info.value == first.value)
                continue
            constant = analysis.index.constant(name)
            if constant is None or constant.ndim != first.rank or constant.shape[first.axis] != first.size:
                analysis.barrier(node, "an input has no known channel axis")
                return
            slices = np.moveaxis(constant, first.axis, 0).reshape(first.size, -1)
            const &= (slices == first.value[:, None]).all(axis=1)
        for info in infos:
            if info is not None and info is not first:
                analysis.couple(first.ids, info.ids)
        pass_through(node, analysis, first.with_values(const, first.value))

    def nonnegative(self, node, analysis):
        """>= 0 when every input is (the output is the inputs' elements, on any axis)."""
        return inputs_nonnegative(node, analysis, range(len(node.input)))

    def positive(self, node, analysis):
        return inputs_positive(node, analysis, range(len(node.input)))

    def allows_empty_input(self, node, slot, plan):
        return True

    def rewrite(self, node, rewriter):
        out = rewriter.info(node.output[0])
        if out is None:
            return
        first = next(rewriter.info(n) for n in node.input if rewriter.info(n) is not None)
        if normalize_axis(get_attr(node, "axis", 0), out.rank) == first.axis:
            kept_constants = _slice_constant_inputs(node, rewriter, out)
            names = [name for slot, name in enumerate(node.input)
                     if kept_constants.get(slot, True) and not rewriter.plan.is_empty(name)]
            if len(names) != len(node.input):
                del node.input[:]
                node.input.extend(names)
                if len(names) == 1:  # a Concat of one input is that input
                    node.op_type = "Identity"
                    del node.attribute[:]
            return
        keep = rewriter.keep(node.output[0])
        if keep is None or keep.all():
            return
        for slot, name in enumerate(node.input):
            constant = rewriter.index.constant(name)
            if constant is not None:
                rewriter.weights.write(node, slot, np.compress(keep, constant, axis=out.axis),
                                       key=("take", out.axis, keep.tobytes()))


def _constant_channels(analysis, constant: np.ndarray, axis: int) -> ChannelInfo:
    """The channels of a constant input of a channel Concat (PyramidNet's zero channels
    ``cat([shortcut, zeros], 1)``): fresh ones, each the constant ``v`` where its whole slice is ``v``."""
    slices = np.moveaxis(constant, axis, 0).reshape(constant.shape[axis], -1).astype(np.float64)
    const = (slices == slices[:, :1]).all(axis=1) if slices.shape[1] else np.zeros(len(slices), bool)
    value = np.where(const, slices[:, 0], 0.0) if slices.shape[1] else np.zeros(len(slices))
    return analysis.fresh(None, "", constant.shape[axis], axis, constant.ndim, const, value)


def _slice_constant_inputs(node, rewriter, out) -> dict[int, bool]:
    """Keep the kept channels of each constant input of a channel Concat (by its offset in the output);
    returns, per constant input slot, whether any channel of it is kept."""
    kept, offset = {}, 0
    keep = rewriter.keep(node.output[0])
    for slot, name in enumerate(node.input):
        constant = rewriter.index.constant(name)
        size = constant.shape[out.axis] if constant is not None else rewriter.info(name).size
        if constant is not None:
            part = keep[offset:offset + size]
            kept[slot] = bool(part.any())
            if kept[slot] and not part.all():
                rewriter.weights.write(node, slot, np.compress(part, constant, axis=out.axis),
                                       key=("take", out.axis, part.tobytes()))
        offset += size
    return kept


def _split_sizes(node, analysis, x):
    axis = normalize_axis(get_attr(node, "axis", 0), x.rank)
    sizes, known = _input_or_attr(node, analysis, "split", 1)
    if not known:
        return axis, None
    outputs = len(node.output)
    if sizes is None:
        dim = x.size if axis == x.axis else None
        if dim is None:
            return axis, []  # not needed off the channel axis
        chunk = -(-dim // outputs)
        sizes = np.array([min(chunk, dim - k * chunk) for k in range(outputs)], np.int64)
    return axis, sizes


@register
class SplitRule(_MovesElements):
    op_types = ("Split",)
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        axis, sizes = _split_sizes(node, analysis, x)
        if axis != x.axis:
            pass_through(node, analysis, x, outputs=len(node.output))
            return
        if sizes is None:
            unknown = _unknown_dims(analysis, node.input[:1])
            analysis.barrier(node, "split sizes are computed" + (GIVE_SHAPE if unknown else ""))
            return
        if int(np.sum(sizes)) != x.size:
            analysis.barrier(node, "split sizes do not add up")
            return
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for position, name in enumerate(node.output):
            analysis.set(name, x.take(np.arange(offsets[position], offsets[position + 1])))

    def allows_empty_output(self, node, position, plan):
        return plan.is_empty(node.input[0]) or not self._on_channel_axis(node, plan)

    def _on_channel_axis(self, node, plan) -> bool:
        x = plan.analysis.info.get(node.input[0])
        return x is not None and normalize_axis(get_attr(node, "axis", 0), x.rank) == x.axis

    def rewrite(self, node, rewriter):
        if not self._on_channel_axis(node, rewriter.plan):
            return
        keep = rewriter.keep(node.input[0])
        if keep is None or keep.all():
            return
        sizes = np.array([int(rewriter.keep(name).sum()) for name in node.output], np.int64)
        if get_attr(node, "num_outputs") is not None:
            node.attribute.remove(next(a for a in node.attribute if a.name == "num_outputs"))
        if rewriter.index.opset >= 13:
            write_int_operand(node, rewriter, "split", 1, sizes)
        else:
            set_attr(node, "split", [int(s) for s in sizes])


class _ChannelSelection(_MovesElements):
    """Slice and Gather on the channel axis select channel positions of the input."""

    passthrough = True

    def allows_empty_output(self, node, position, plan):
        return plan.is_empty(node.input[0]) or not self.selects_channels(node, plan.analysis)

    def selects_channels(self, node, analysis) -> bool:
        raise NotImplementedError


@register
class SliceRule(_ChannelSelection):
    op_types = ("Slice",)

    def _operands(self, node, analysis, rank):
        starts, known_s = _input_or_attr(node, analysis, "starts", 1)
        ends, known_e = _input_or_attr(node, analysis, "ends", 2)
        axes, known_a = _input_or_attr(node, analysis, "axes", 3)
        steps, known_t = (None, True) if analysis.index.opset < 10 else _input_or_attr(node, analysis, "steps", 4)
        if not (known_a and known_s and known_e and known_t) or starts is None or ends is None:
            return None
        axes = list(range(len(starts))) if axes is None else [normalize_axis(int(a), rank) for a in axes]
        steps = np.ones(len(starts), np.int64) if steps is None else steps
        return starts, ends, axes, steps

    def selects_channels(self, node, analysis) -> bool:
        x = analysis.info.get(node.input[0])
        operands = self._operands(node, analysis, x.rank) if x is not None else None
        return operands is not None and x.axis in operands[2]

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        operands = self._operands(node, analysis, x.rank)
        if operands is None:
            axes, known = _input_or_attr(node, analysis, "axes", 3)
            if known and axes is not None and x.axis not in [normalize_axis(int(a), x.rank) for a in axes]:
                pass_through(node, analysis, x)
                return
            unknown = _unknown_dims(analysis, node.input[:1])
            analysis.barrier(node, "slice bounds are computed" + (GIVE_SHAPE if unknown else ""))
            return
        starts, ends, axes, steps = operands
        if x.axis not in axes:
            pass_through(node, analysis, x)
            return
        position = axes.index(x.axis)
        if steps[position] != 1 and len(axes) != 1:
            analysis.barrier(node, "strided slice of the channel axis and of other axes")
            return
        analysis.set(node.output[0], x.take(_sliced(x.size, starts, ends, steps, position)))

    def rewrite(self, node, rewriter):
        if not self.selects_channels(node, rewriter.analysis):
            return
        keep = rewriter.keep(node.input[0])
        if keep is None or keep.all():
            return
        x = rewriter.info(node.input[0])
        starts, ends, axes, steps = self._operands(node, rewriter.analysis, x.rank)
        position = axes.index(x.axis)
        chosen = _sliced(x.size, starts, ends, steps, position)
        new = _new_positions(keep)[chosen[keep[chosen]]]
        if len(new) == 0:
            return
        step = int(new[1] - new[0]) if len(new) > 1 else 1
        if step == 0 or (len(new) > 2 and (np.diff(new) != step).any()):
            _slice_to_gather(node, rewriter, x.axis, new)  # a strided selection that is no longer a range
            return
        starts, ends = starts.copy(), ends.copy()
        end = int(new[-1]) + (1 if step > 0 else -1)
        starts[position], ends[position] = new[0], end if end >= 0 else np.iinfo(np.int64).min
        write_int_operand(node, rewriter, "starts", 1, starts)
        write_int_operand(node, rewriter, "ends", 2, ends)
        if step != steps[position]:
            steps = steps.copy()
            steps[position] = step
            write_int_operand(node, rewriter, "steps", 4, steps)


def _sliced(size: int, starts, ends, steps, position: int) -> np.ndarray:
    """The channels a Slice takes along the channel axis (entry ``position`` of its operands), in order
    (ONNX Slice-13: bounds clamped as Python's slices are, a negative step walks backwards)."""
    return np.arange(size)[slice(int(starts[position]), int(ends[position]), int(steps[position]))]


def _slice_to_gather(node, rewriter, axis: int, positions: np.ndarray) -> None:
    """Turn a Slice of the channel axis alone into ``Gather(x, positions, axis)`` (ONNX Gather-13)."""
    indices = rewriter.weights.add(f"{node.output[0]}_channels", np.asarray(positions, np.int64))
    node.op_type = "Gather"
    del node.input[1:]
    node.input.append(indices)
    del node.attribute[:]
    set_attr(node, "axis", int(axis))


@register
class GatherRule(_ChannelSelection):
    op_types = ("Gather",)

    def selects_channels(self, node, analysis) -> bool:
        x = analysis.info.get(node.input[0])
        return x is not None and normalize_axis(get_attr(node, "axis", 0), x.rank) == x.axis

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        indices = analysis.index.constant(node.input[1])
        axis = normalize_axis(get_attr(node, "axis", 0), x.rank)
        if indices is None:
            if axis == x.axis:
                analysis.barrier(node, "gather indices are computed")
                return
            indices_rank = len(analysis.index.shape(node.input[1]) or ())
        else:
            indices_rank = indices.ndim
        if axis != x.axis:
            info = x.with_values(x.const, x.value)
            info.rank = x.rank - 1 + indices_rank
            info.axis = x.axis - 1 + indices_rank if axis < x.axis else x.axis
            pass_through(node, analysis, info)
            return
        if indices.ndim != 1:
            analysis.barrier(node, "gathers channels with non 1-D indices")
            return
        analysis.set(node.output[0], x.take(np.where(indices < 0, indices + x.size, indices)))

    def rewrite(self, node, rewriter):
        if not self.selects_channels(node, rewriter.analysis):
            return
        keep = rewriter.keep(node.input[0])
        if keep is None or keep.all():
            return
        x = rewriter.info(node.input[0])
        indices = rewriter.index.constant(node.input[1])
        positions = np.where(indices < 0, indices + x.size, indices)
        kept = positions[keep[positions]]
        new = _new_positions(keep)[kept].astype(indices.dtype)
        rewriter.weights.write(node, 1, new, key=("gather", new.tobytes()))


@register
class GatherNDRule(_ChannelSelection):
    """GatherND (ONNX GatherND-13, batch_dims 0) with constant indices: k-tuples over data's first k axes;
    the output is ``indices.shape[:-1] + data.shape[k:]``. Tuples that stop before the channel axis take
    whole channel rows: channels pass, on the axis they land on. 1-tuples over a channel axis 0 (the
    dynamo export of ``x[:, idx]``: Transpose, GatherND, Transpose) are ``Gather(data, indices[:, 0])``:
    output channel ``i`` is data channel ``indices[i]``. Other forms are barriers."""

    op_types = ("GatherND",)

    def selects_channels(self, node, analysis) -> bool:
        x = analysis.info.get(node.input[0])
        indices = analysis.index.constant(node.input[1])
        return x is not None and indices is not None and x.axis < indices.shape[-1]

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        indices = analysis.index.constant(node.input[1])
        if indices is None or get_attr(node, "batch_dims", 0) != 0:
            analysis.barrier(node, "indices are computed or batch_dims is not 0")
            return
        k = indices.shape[-1]
        if x.axis >= k:
            info = x.with_values(x.const, x.value)
            info.axis, info.rank = indices.ndim - 1 + x.axis - k, indices.ndim - 1 + x.rank - k
            pass_through(node, analysis, info)
        elif k == 1 and x.axis == 0 and indices.ndim == 2:
            analysis.set(node.output[0], x.take(np.where(indices[:, 0] < 0, indices[:, 0] + x.size, indices[:, 0])))
        else:
            analysis.barrier(node, "gathers channels with tuples over other axes too")

    def rewrite(self, node, rewriter):
        keep = rewriter.keep(node.input[0])
        if not self.selects_channels(node, rewriter.analysis) or keep is None or keep.all():
            return
        indices = rewriter.index.constant(node.input[1])
        positions = np.where(indices[:, 0] < 0, indices[:, 0] + len(keep), indices[:, 0])
        new = _new_positions(keep)[positions[keep[positions]]].astype(indices.dtype).reshape(-1, 1)
        rewriter.weights.write(node, 1, new, key=("gathernd", new.tobytes()))


@register
class FlattenRule(_MovesElements):
    """Flatten (ONNX Flatten-13): ``(d0 ... d{k-1}, dk ...) -> (d0*...*d{k-1}, dk*...)`` for ``axis`` k.

    k = 1 keeps the batch: channel ``c`` of an NCHW map becomes a block of features, of another layout
    the features of its index map (:mod:`regroup`). k > 1 merges the batch with the axes before k (LeViT's
    ``bn(x.flatten(0, 1))`` of a (B, N, C) sequence): a channel axis at or after k stays in the columns,
    mapped from the static dims after k alone, since every row is laid out alike; one before k goes into
    the rows (a barrier)."""

    op_types = ("Flatten",)
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        axis = normalize_axis(get_attr(node, "axis", 1), x.rank)
        block = _block_size(analysis.index.shape(node.input[0]), x)
        if axis == 1 and x.axis != 1 and _map_reshape(node, analysis, x):
            return
        if 1 < axis <= x.axis and _map_columns(node, analysis, x, axis):
            return
        if axis != 1 or x.axis != 1:
            analysis.barrier(node, "flattens across the batch")
            return
        if block is None:
            analysis.barrier(node, "flattens over dynamic spatial dims" + GIVE_SHAPE)
            return
        analysis.set(node.output[0], _flattened(x, block))


def _map_columns(node, analysis, x, axis: int) -> bool:
    """Give a Flatten's columns (the dims from ``axis`` on, static) the channels through their index map."""
    shape = analysis.index.shape(node.input[0])
    if shape is None or len(shape) != x.rank or any(not isinstance(d, int) for d in shape[axis:]):
        return False
    found = reshape_map(list(shape[axis:]), x.axis - axis, [int(np.prod(shape[axis:], dtype=np.int64))])
    if found is None:
        return False
    apply_map(analysis, x, node.output[0], found[1], 1, 2)
    return True


# said where channels stay only because a dim is not known before run time
GIVE_SHAPE = " (a dim is unknown before run time: give --input-shape)"


def _unknown_dims(analysis, names) -> bool:
    """Some tensor of ``names`` has an unknown dim other than the batch."""
    shapes = [analysis.index.shape(name) for name in names if name]
    return any(shape is None or None in shape[1:] for shape in shapes)


def _static_map(node, analysis, x):
    """(output channel axis, IndexMap) of a Reshape / Flatten of static per-sample dims that keeps the
    batch axis (see :mod:`regroup`), that keeps the rows of channels on the last axis
    (:func:`_rows_map`), or of a whole static tensor of one sample (:func:`_whole_map`); None otherwise."""
    index = analysis.index
    in_shape, out_shape = index.shape(node.input[0]), index.shape(node.output[0])
    if in_shape is None or out_shape is None or len(in_shape) != x.rank or len(out_shape) < 2:
        return None
    if any(d is None for d in in_shape[1:]) or any(d is None for d in out_shape[1:]):
        return None
    if x.axis > 0 and in_shape[0] == out_shape[0]:
        found = reshape_map(list(in_shape[1:]), x.axis - 1, list(out_shape[1:]))
        return None if found is None else (found[0] + 1, found[1])
    rows = _rows_map(list(in_shape), list(out_shape)) if 0 < x.axis == x.rank - 1 else None
    return rows if rows is not None else _whole_map(list(in_shape), list(out_shape), x)


def _whole_map(in_shape: list, out_shape: list, x):
    """A Reshape of a whole static tensor that is one sample (a batch of 1 baked into the target, or no
    batch axis left) maps every element, batch included: megvii's ShuffleNetV2 ``channel_shuffle``
    (YOLO-FastestV2) reshapes ``(1, C, H, W) -> (C/2, 2, H*W)``, transposes to ``(2, C/2, H*W)`` and
    takes ``x[0]``, ``x[1]`` of ``(2, -1, C/2, H, W)``; SA-Net's shuffle attention merges groups of channels
    into the batch, ``(1, C, H, W) -> (G, C/G, H, W)``, and the TorchScript export spells the way back as
    ``(G, C/G, H, W) -> (1, C, H, W)``: one sample on either side. (output axis, IndexMap) or None."""
    if any(not isinstance(d, int) for d in [*in_shape, *out_shape]) or (x.axis > 0 and 1 not in (in_shape[0], out_shape[0])):
        return None
    if _groups_into_batch(in_shape, out_shape, x):
        # channel c is channel c % (C/G) of sample c // (C/G): the channel axis stays axis 1, channel j of
        # every group in one component (the finest map put the G groups on axis 0 whenever G > C/G: the
        # batch axis, a barrier to the per-sample ops after it; SA-Net's own G = 64 of C = 512 and up)
        c = np.arange(in_shape[1], dtype=np.int64)
        return 1, components(c, c % out_shape[1], in_shape[1], out_shape[1])
    if x.axis > 0 and in_shape[0] != 1:  # the output's batch of 1 holds no channel: map into the sample's dims
        found = reshape_map(in_shape, x.axis, out_shape[1:])
        return None if found is None else (found[0] + 1, found[1])
    return reshape_map(in_shape, x.axis, out_shape)


def _groups_into_batch(in_shape: list, out_shape: list, x) -> bool:
    """Whether a Reshape of one sample's channels ``(1, C, ...) -> (G, C/G, ...)`` (the same dims after
    the channels, G > 1, C/G > 1) moves G groups of channels into the batch (SA-Net's ``view(b * G, -1, h,
    w)``). With C/G = 1 every channel is a sample of its own, and the finest map (axis 0) keeps them apart."""
    return x.axis == 1 and len(in_shape) == len(out_shape) >= 3 and in_shape[0] == 1 < out_shape[0] \
        and out_shape[1] > 1 and out_shape[0] * out_shape[1] == in_shape[1] and in_shape[2:] == out_shape[2:]


def _rows_map(in_shape: list, out_shape: list):
    """A Reshape of static dims, channels on the last axis, whose leading dims hold as many rows as some
    leading dims of the output (the dynamo spelling of LeViT's ``(B*N, C) -> (B, N, heads, d)``): every
    row keeps its elements, so the channels map as in a one-row Reshape. (output axis, IndexMap) or None."""
    if any(not isinstance(d, int) for d in [*in_shape, *out_shape]):
        return None
    rows = int(np.prod(in_shape[:-1], dtype=np.int64))
    k_out = max((k for k in range(1, len(out_shape)) if int(np.prod(out_shape[:k], dtype=np.int64)) == rows),
                default=None)
    found = None if k_out is None else reshape_map(in_shape[-1:], 0, out_shape[k_out:])
    return None if found is None else (found[0] + k_out, found[1])


def _map_reshape(node, analysis, x) -> bool:
    """Give the output of a regrouping Reshape / Flatten its channels through the index map."""
    found = _static_map(node, analysis, x)
    if found is None:
        return False
    axis, index_map = found
    apply_map(analysis, x, node.output[0], index_map, axis, len(analysis.index.shape(node.output[0])))
    return True


def _same_trailing_layout(node, analysis, x) -> int | None:
    """The output axis of a Reshape that leaves the channel axis and the axes after it laid out as they
    were, whatever it does before them (Swin's window partition ``(N, H/w, W/w, w, w, C) -> (N*nW, w*w,
    C)`` merges the batch): element ``f`` of channel ``c`` is ``f // T % C == c`` with the same T (the
    elements after the channel axis) on both sides, so channels pass one to one. None otherwise, or when
    those dims, or the output's dims other than the first, are not static."""
    in_shape, out_shape = analysis.index.shape(node.input[0]), analysis.index.shape(node.output[0])
    if in_shape is None or out_shape is None or len(in_shape) != x.rank or len(out_shape) < 2:
        return None
    tail, dims = in_shape[x.axis + 1:], out_shape[1:]
    if any(not isinstance(d, int) for d in [*tail, *dims]) or in_shape[x.axis] != x.size:
        return None
    block = int(np.prod(tail, dtype=np.int64))
    for axis in range(len(out_shape) - 1, 0, -1):
        if out_shape[axis] == x.size and int(np.prod(out_shape[axis + 1:], dtype=np.int64)) == block:
            return axis
    return None


def _block_size(shape, x) -> int | None:
    """H*W... of a (N, C, H, W...) map when static."""
    if shape is None or len(shape) != x.rank or any(d is None for d in shape[2:]):
        return None
    return int(np.prod(shape[2:], dtype=np.int64)) if x.rank > 2 else 1


def _flattened(x, block: int):
    info = x.with_values(np.repeat(x.const, block), np.repeat(x.value, block))
    info.ids, info.rank, info.axis = np.repeat(x.ids, block), 2, 1
    return info


@register
class ReshapeRule(_MovesElements):
    op_types = ("Reshape",)
    passthrough = True

    def _kind(self, node, analysis, x) -> tuple[str, list | None]:
        """("flatten" | "same" | "barrier", resolved output dims)."""
        index = analysis.index
        in_shape = index.shape(node.input[0])
        dims = reshape_target(index, node)
        if x.axis != 1 or in_shape is None or dims is None or len(in_shape) < 2:
            return "barrier", None

        def same(d, axis):
            return is_dim_of(d, "in", axis) or (in_shape[axis] is not None and d == in_shape[axis])

        block = _block_size(in_shape, x)
        if len(dims) == 2 and same(dims[0], 0) and block is not None and dims[1] == x.size * block:
            return "flatten", dims
        if len(dims) >= 2 and same(dims[0], 0) and same(dims[1], 1):
            entry = shape_value(index, node.input[1])[1]
            adapts = is_dim_of(entry, node.input[0], 1) or (not isinstance(entry, Dim) and entry in (0, -1))
            if adapts or index.is_const(node.input[1]) or _channel_constant(index, node) is not None:
                return "same", dims
        return "barrier", None

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        kind, dims = self._kind(node, analysis, x)
        axis = _same_trailing_layout(node, analysis, x) if kind == "barrier" else None
        if axis is not None:
            info = x.with_values(x.const, x.value)
            info.axis, info.rank = axis, len(analysis.index.shape(node.output[0]))
            pass_through(node, analysis, info)
            return
        if kind == "barrier" and _map_reshape(node, analysis, x):
            return
        if kind == "barrier":
            dims = reshape_target(analysis.index, node)
            if dims is not None and UNKNOWN not in dims[:2]:
                analysis.barrier(node, "regroups the channel axis")
            else:
                unknown = _unknown_dims(analysis, [node.input[0], node.output[0]])
                analysis.barrier(node, "its target shape is unknown" + (GIVE_SHAPE if unknown else ""))
        elif kind == "flatten":
            analysis.set(node.output[0], _flattened(x, _block_size(analysis.index.shape(node.input[0]), x)))
        else:
            info = x.with_values(x.const, x.value)
            info.rank = len(dims)
            pass_through(node, analysis, info)

    def rewrite(self, node, rewriter):
        keep = rewriter.keep(node.output[0])
        if keep is None or keep.all():
            return
        x = rewriter.info(node.input[0])
        kind, _ = self._kind(node, rewriter.analysis, x)
        if kind == "barrier":  # an index map: the output's channel axis takes the kept count
            out = rewriter.info(node.output[0])
            dims = [-1, *rewriter.index.shape(node.output[0])[1:]]
            dims[out.axis] = int(keep.sum())
            node.input[1] = rewriter.weights.add(f"{node.output[0]}_shape", np.array(dims, np.int64))
            return
        if kind == "flatten":
            # a computed target (Shape -> Gather -> Concat) would still say the old size
            node.input[1] = rewriter.weights.add(f"{node.output[0]}_shape", np.array([-1, int(keep.sum())], np.int64))
            return
        target = rewriter.index.constant(node.input[1])
        found = (node, 1, 1) if target is not None else _channel_constant(rewriter.index, node)
        if found is None:
            return  # the channel entry follows the input at run time
        owner, slot, offset = found
        target = rewriter.index.constant(owner.input[slot]).copy()
        if target[offset] == x.size:
            target[offset] = int(keep.sum())
            rewriter.weights.write(owner, slot, target, key=("shape", target.tobytes()))


def _channel_constant(index, node) -> tuple | None:
    """(Concat, input slot, offset) of the constant that gives a computed Reshape target its channel
    entry: dynamo spells ``view(b, C, -1)`` of a map with a dynamic size as ``Concat(Shape(x)[0:1], [C],
    [-1])``. None when entry 1 is not such a constant, or when the Concat feeds anything but this Reshape
    (its rewrite must change nothing else)."""
    concat = index.producer.get(node.input[1])
    if concat is None or concat.op_type != "Concat" or len(index.uses(node.input[1])) != 1 \
            or node.input[1] in index.outputs:
        return None
    start = 0
    for slot, name in enumerate(concat.input):
        value = shape_value(index, name)
        if value is None:
            return None
        if start <= 1 < start + len(value):
            return (concat, slot, 1 - start) if index.is_const(name) else None
        start += len(value)
    return None


@register
class ExpandRule(_MovesElements):
    """Expand (ONNX Expand-13): ``y = x`` broadcast to ``shape`` by numpy's rules; the output has the longer
    of the two ranks, so the input's channel axis ``a`` (rank ``r``) is axis ``a + R - r`` of the output
    (rank ``R``), and entry ``a + R - r - (R - len(shape))`` of ``shape`` meets the channel dim C.

    That entry keeps the channels one to one when it is 1 or absent (C stays), a constant C (rewritten to
    the kept count), or the channel dim of a feature ``t`` at run time: ``s.expand_as(t)`` is exported as
    ``Expand(s, Shape(t))`` (SE blocks written ``x * y.expand_as(x)``); then ``t``'s channels are coupled
    with ``s``'s, so both keep the same ones and the shape follows at run time. A computed entry that is
    neither is a barrier.

    Broadcasting one channel to many (``C == 1``, the entry a constant ``C'`` or ``t``'s channel dim:
    ``F.normalize`` divides by ``norm.expand_as(x)``): every output channel reads the one input channel,
    which is kept (as for a broadcast operand of Add / Mul); the ``C'`` output channels are copies of its
    value, with ``t``'s ids when the shape follows ``t`` (deleted with ``t``'s channels at run time), or
    new ids whose deletion rewrites the constant entry.
    """

    op_types = ("Expand",)
    passthrough = True

    def _channel_entry(self, node, analysis, x):
        """(entry of ``shape`` at the channel axis or None when absent, output rank); (False, 0) when
        the shape is not computable."""
        shape = shape_value(analysis.index, node.input[1]) if len(node.input) > 1 else None
        if shape is None:
            return False, 0
        rank = max(x.rank, len(shape))
        position = x.axis + rank - x.rank - (rank - len(shape))
        return (shape[position] if position >= 0 else None), rank

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        entry, rank = self._channel_entry(node, analysis, x)
        if entry is False:
            analysis.barrier(node, "its shape is computed")
            return
        other = analysis.feature(entry.tensor) if isinstance(entry, Dim) else None
        follows = other is not None and other.axis == entry.axis and other.size == entry.static
        index = analysis.index
        constant = not isinstance(entry, Dim) and entry is not None and index.is_const(node.input[1])
        axis = x.axis + rank - x.rank
        if x.size == 1 and entry not in (None, 1) and (follows or constant):
            self._broadcast_one(node, analysis, x, other.ids if follows else int(entry), axis, rank)
            return
        if entry not in (None, 1) and not (follows and other.size == x.size) and not (constant and entry == x.size):
            analysis.barrier(node, "its shape fixes the channel count in a computed value")
            return
        if follows:
            analysis.couple(x.ids, other.ids)  # Shape(t) says t's channel count at run time
        info = x.with_values(x.const, x.value)
        info.axis, info.rank = axis, rank
        pass_through(node, analysis, info)

    @staticmethod
    def _broadcast_one(node, analysis, x, ids_or_count, axis: int, rank: int) -> None:
        """The one channel of ``x`` to many: it is kept; the output gets ``t``'s ids (an array) or
        ``count`` new ones, each a copy of the input's value."""
        analysis.keep(x.ids, BARRIER, f"Expand '{analysis.index.node_name(node)}' broadcasts '{node.input[0]}' "
                                      "over many channels")
        count = ids_or_count if isinstance(ids_or_count, int) else len(ids_or_count)
        const, value = np.repeat(x.const, count), np.repeat(np.where(x.const, x.value, 0.0), count)
        if isinstance(ids_or_count, int):
            analysis.fresh(None, node.output[0], count, axis, rank, const, value)
        else:
            analysis.set(node.output[0], ChannelInfo(ids_or_count, axis, rank, const, value))

    def nonnegative(self, node, analysis):
        """The output's elements are copies of the data input's: >= 0 when it is."""
        return inputs_nonnegative(node, analysis)

    def rewrite(self, node, rewriter):
        keep = rewriter.keep(node.output[0])
        shape = rewriter.index.constant(node.input[1]) if keep is not None and not keep.all() else None
        if shape is None:
            return  # nothing deleted, or a computed shape that follows the channels at run time
        out = rewriter.info(node.output[0])
        position = out.axis - (len(rewriter.index.shape(node.output[0]) or ()) - len(shape))
        if 0 <= position < len(shape) and shape[position] == len(keep):
            shape = shape.copy()
            shape[position] = int(keep.sum())
            rewriter.weights.write(node, 1, shape, key=("shape", shape.tobytes()))


def _scatter_channels(node, analysis, x, u) -> np.ndarray | None:
    """Per update channel ``j``, the data channel its slices are written to (see :class:`ScatterNDRule`);
    None when the tuples do not address channels that way."""
    indices = analysis.index.constant(node.input[1])
    if indices is None or indices.ndim < 2 or not x.axis < indices.shape[-1] or u.axis >= indices.ndim - 1 \
            or indices.shape[u.axis] != u.size:
        return None
    channel = np.moveaxis(indices[..., x.axis], u.axis, 0).reshape(u.size, -1)
    channel = np.where(channel < 0, channel + x.size, channel)
    if not (channel == channel[:, :1]).all() or (channel[:, 0] >= x.size).any() or (channel[:, 0] < 0).any():
        return None
    return channel[:, 0]


@register
class ScatterNDRule(_MovesElements):
    """ScatterND (ONNX ScatterND-11 ... 18, reduction none or add) with constant indices: ``out = data``,
    then ``out[indices[i]] = updates[i]`` for each k-tuple ``indices[i]`` over data's first k axes; the
    updates have shape ``indices.shape[:-1] + data.shape[k:]``.

    * The tuples address the channel axis (ReXNet's partial residual ``out[:, 0:c] += x``, which both
      torch exporters write as a ScatterND) and the updates carry their channels on a leading axis along
      which the tuples' channel entry depends on the position ``j`` only: output channel ``t[j]`` is data
      channel ``t[j]`` where not written and update channel ``j`` where written. Those two are coupled (one
      unit) and the output carries data's channels; deleting a unit deletes the update's tuples too: the
      rewrite keeps the others and renumbers their channel entry.
    * The tuples stop before the channel axis: whole channel rows are written, update channel ``c`` to
      output channel ``c``; data's and the updates' channels are coupled one to one.

    A channel is a known constant when data's and the update's channel hold it. Other forms are barriers.
    """

    op_types = ("ScatterND",)

    def propagate(self, node, analysis):
        x, u = analysis.feature(node.input[0]), analysis.feature(node.input[2])
        indices = analysis.index.constant(node.input[1])
        if x is None or u is None or indices is None or get_attr(node, "reduction", b"none") not in (b"none", b"add"):
            analysis.barrier(node, "needs feature data and updates, constant indices, reduction none or add")
            return
        if x.axis >= indices.shape[-1]:  # whole channel rows written
            if u.size != x.size or u.axis != indices.ndim - 1 + x.axis - indices.shape[-1]:
                analysis.barrier(node, "updates and data disagree on the channel axis")
                return
            analysis.couple(x.ids, u.ids)
            const = x.const & u.const & (x.value == u.value)
            pass_through(node, analysis, x.with_values(const, x.value))
            return
        target = _scatter_channels(node, analysis, x, u)
        if target is None:
            analysis.barrier(node, "writes channels that its updates do not carry on one axis")
            return
        analysis.couple(x.ids[target], u.ids)
        const = x.const.copy()
        const[target] &= u.const & (u.value == x.value[target])
        pass_through(node, analysis, x.with_values(const, x.value))

    def allows_empty_input(self, node, slot, plan):
        return slot == 0 and plan.is_empty(node.output[0])

    def rewrite(self, node, rewriter):
        x, u = rewriter.info(node.input[0]), rewriter.info(node.input[2])
        keep_x, keep_u = rewriter.keep(node.input[0]), rewriter.keep(node.input[2])
        indices = rewriter.index.constant(node.input[1])
        if x is None or u is None or keep_x.all() or x.axis >= indices.shape[-1]:
            return
        new = np.compress(keep_u, indices, axis=u.axis)
        channel = new[..., x.axis]
        new[..., x.axis] = _new_positions(keep_x)[np.where(channel < 0, channel + x.size, channel)]
        rewriter.weights.write(node, 1, new, key=("scatter", new.tobytes()))


@register
class TileRule(_MovesElements):
    """Tile (ONNX Tile-13): ``repeats[i]`` copies of the input along each axis ``i``. With 1 repeat of the
    channel axis (``x.repeat(1, 1, 2, 2)``), output channel ``c`` holds copies of input channel ``c``'s
    elements only: channels and their constant values pass; repeating the channel axis is a barrier."""

    op_types = ("Tile",)
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        repeats = static_values(shape_value(analysis.index, node.input[1])) if len(node.input) > 1 else None
        if repeats is None or len(repeats) != x.rank:
            analysis.barrier(node, "its repeats are computed")
        elif repeats[x.axis] != 1:
            analysis.barrier(node, "repeats the channel axis")
        else:
            pass_through(node, analysis, x.with_values(x.const, x.value))


@register
class SqueezeRule(_MovesElements):
    op_types = ("Squeeze", "Unsqueeze")
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        axes, known = _input_or_attr(node, analysis, "axes", 1)
        out_shape = analysis.index.shape(node.output[0])
        if not known or (axes is None and out_shape is None):
            analysis.barrier(node, "axes are computed")
            return
        if node.op_type == "Squeeze":
            if axes is None:
                in_shape = analysis.index.shape(node.input[0]) or ()
                axes = [a for a, d in enumerate(in_shape) if d == 1]
            axes = [normalize_axis(int(a), x.rank) for a in axes]
            if x.axis in axes:
                analysis.barrier(node, "squeezes the channel axis")
                return
            axis, rank = x.axis - sum(1 for a in axes if a < x.axis), x.rank - len(axes)
        else:
            rank = x.rank + len(axes)
            inserted = sorted(normalize_axis(int(a), rank) for a in axes)
            kept = [p for p in range(rank) if p not in inserted]
            axis = kept[x.axis]
        info = x.with_values(x.const, x.value)
        info.axis, info.rank = axis, rank
        pass_through(node, analysis, info)


#: ops that preprocess an input axis by axis: elementwise (normalisation, a cast), or moving elements
#: along axes without mixing them (a spatial Pad, a crop, a resize)
_PREPROCESSING = frozenset({"Mul", "Add", "Sub", "Div", "Cast", "Identity", "Clip", "Neg", "Sqrt", "Pow",
                            "Pad", "Slice", "Resize"})


def _preprocessed_input(index, name: str) -> str | None:
    """The graph input that ``name`` is, or that ops of ``_PREPROCESSING`` with constant other operands
    computed from it alone; None otherwise."""
    inputs = {value.name for value in index.inputs}
    for _ in range(16):
        if name in inputs:
            return name
        node = index.producer.get(name)
        if node is None or node.op_type not in _PREPROCESSING or node.domain not in ("", "ai.onnx"):
            return None
        variable = [n for n in node.input if n and not index.is_const(n)]
        if len(variable) != 1:
            return None
        name = variable[0]
    return None


@register
class TransposeRule(_MovesElements):
    """Transpose moves the channel axis to ``perm.index(axis)``.

    A graph input's layout is unknown (axis 1 is a guess, and its channels are kept anyway): a Transpose
    reading it decides it. NHWC inputs of tf2onnx / keras2onnx exports are transposed to NCHW before the
    first conv, so the Transpose's output gets (kept) channels on axis 1 — also when the input is first
    normalised by constants or padded (M-LSD's ``x / 127.5 - 1`` and TF "same" pads in NHWC,
    :func:`_preprocessed_input`).
    """

    op_types = ("Transpose",)
    passthrough = True

    def propagate(self, node, analysis):
        shape = analysis.index.shape(node.output[0])
        source = _preprocessed_input(analysis.index, node.input[0])
        if source is not None and shape and len(shape) >= 2 and shape[1]:
            read = analysis.feature(node.input[0])  # what the preprocessing made of the guessed axis stays
            info = analysis.fresh(None, node.output[0], shape[1], 1, len(shape))
            for ids in (info.ids, read.ids if read is not None else ()):
                analysis.keep(ids, BARRIER, f"graph input '{source}'")
            return
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        perm = get_attr(node, "perm") or list(reversed(range(x.rank)))
        info = x.with_values(x.const, x.value)
        info.axis = list(perm).index(x.axis)
        pass_through(node, analysis, info)


@register
class ShapeRule(Rule):
    """Shape reads only dims; nothing it does depends on channel values."""

    op_types = ("Shape",)

    def propagate(self, node, analysis):
        return None

    def allows_empty_input(self, node, slot, plan):
        return False


@register
class DepthToSpaceRule(_MovesElements):
    """DepthToSpace / SpaceToDepth (PixelShuffle and its inverse) move blocks of r*r channels into space
    and back: an index map (see :mod:`regroup`). DepthToSpace couples the r*r input channels of each
    output channel; SpaceToDepth gives each input channel r*r output channels. Deleting whole units
    keeps the op exact with no attribute to change."""

    op_types = ("DepthToSpace", "SpaceToDepth")
    passthrough = True

    def propagate(self, node, analysis):
        x = feature_or_barrier(node, analysis)
        if x is None:
            return
        block = get_attr(node, "blocksize", 1)
        mode = get_attr(node, "mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        index_map = (depth_to_space_map(x.size, block, mode) if node.op_type == "DepthToSpace"
                     else space_to_depth_map(x.size, block))
        if x.axis != 1 or x.rank != 4 or index_map is None:
            analysis.barrier(node, "needs an NCHW input whose channels divide into blocks")
            return
        apply_map(analysis, x, node.output[0], index_map, 1, 4)


BARRIERS = (
    BarrierRule("its value counts the channels", ("Size",)),
)
