"""Index maps: ops that only move elements, so that channels of the input land in channels of the output.

Reshape that regroups the channel axis (a channel shuffle's ``[N, C, H, W] -> [N, g, C/g, H, W]`` and
back, GroupNorm's ``[N, C, H, W] -> [N, G, -1]``, a Flatten of an NHWC map), DepthToSpace and
SpaceToDepth all send every element of input channel ``c`` to some output channel ``k``. Relate ``c`` and
``k`` whenever that happens; the **connected components** of this relation are the units:

* the input channels of a component are coupled (deleted together), every output channel of the
  component carries the component's id — a block of features (Flatten: channel ``c`` of an NHWC map is
  the features ``{s * C + c}``), r*r channels of DepthToSpace, the ``C/G`` channels of a group ...
* deleting a component removes exactly the elements ``{f : channel_in(f) in S}`` from the input and the
  same elements ``{f : channel_out(f) in K}`` from the output (equal sets: that is what a component is).
  Removing elements keeps the order of the rest, so the op applied to the smaller input gives the smaller
  output: the map is exact with the output's channel count as its only change (a Reshape target's entry;
  DepthToSpace/SpaceToDepth need no change at all).
* an output channel is a known constant when every input channel of its component is the same constant.

For a Reshape, the output axis that carries the channels is one on which every input channel lands at a
single index (no space mixed in: GroupNorm's ``[N, G, C/G*H*W]`` is read along G) if there is one, with
the most components (the finest units), the later on a tie: a channel shuffle's ``C -> (g, C/g)`` is read
along ``C/g`` (channel ``j`` of every group goes together, and the Transpose and Reshape that follow
keep the order). A map of one component (GroupNorm with one group: ``[N, 1, C*H*W] -> [N, C, H, W]``)
is exact on any axis and is read on the axis at the input's channel position, where the readers (a
conv) look for channels. A Flatten has one axis: channel ``c`` becomes a block of features.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxslim.graph.unionfind import UnionFind
from onnxslim.graph.values import ChannelInfo

_MAX_ELEMENTS = 1 << 22  # a Reshape over more elements per sample is not mapped (a barrier)


@dataclasses.dataclass(frozen=True)
class IndexMap:
    """``in_rep[c]``: the representative input channel of input channel ``c``'s component;
    ``out_rep[k]``: the representative input channel of output channel ``k``."""

    in_rep: np.ndarray
    out_rep: np.ndarray

    @property
    def components(self) -> int:
        return len(_unique(self.in_rep))


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a sort; numpy's hash-based unique is slow on large int arrays)."""
    ordered = np.sort(values, kind="stable")
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if len(ordered) else ordered


def components(in_channel: np.ndarray, out_channel: np.ndarray, c_in: int, c_out: int) -> IndexMap | None:
    """The components of the relation {(in_channel[f], out_channel[f])}; None when an output channel
    receives no input channel (it could not be deleted with anything)."""
    codes = _unique(in_channel * c_out + out_channel)  # one int per related pair
    ins, outs = codes // c_out, codes % c_out
    if len(_unique(ins)) != c_in or len(_unique(outs)) != c_out:
        return None
    if len(outs) == c_out:  # each output channel reads one input channel (Flatten, SpaceToDepth)
        out_rep = np.empty(c_out, np.int64)
        out_rep[outs] = ins
        return IndexMap(np.arange(c_in, dtype=np.int64), out_rep)
    if len(ins) == c_in:  # each input channel lands in one output channel (a group, DepthToSpace)
        out_rep = np.full(c_out, c_in, np.int64)
        np.minimum.at(out_rep, outs, ins)
        in_rep = np.empty(c_in, np.int64)
        in_rep[ins] = out_rep[outs]
        return IndexMap(in_rep, out_rep)
    uf = UnionFind()
    uf.new(c_in + c_out)
    uf.union(ins, outs + c_in)
    roots = uf.roots()
    rep = np.full(c_in + c_out, c_in, np.int64)
    np.minimum.at(rep, roots[:c_in], np.arange(c_in))
    return IndexMap(rep[roots[:c_in]], rep[roots[c_in:]])


def apply_map(analysis, x: ChannelInfo, name: str, index_map: IndexMap, axis: int, rank: int) -> ChannelInfo:
    """Couple each component's input channels and give output ``name`` their ids (see module doc)."""
    in_rep, out_rep = index_map.in_rep, index_map.out_rep
    analysis.couple(x.ids, x.ids[in_rep])
    same = np.ones(x.size, bool)
    np.logical_and.at(same, in_rep, x.const & (x.value == x.value[in_rep]))
    const = same[out_rep] & x.const[out_rep]
    info = ChannelInfo(x.ids[out_rep], axis, rank, const, np.where(const, x.value[out_rep], 0.0))
    analysis.set(name, info)
    return info


def _channel_of_element(dims: list[int], axis: int, size: int) -> np.ndarray:
    stride = int(np.prod(dims[axis + 1:], dtype=np.int64))
    return (np.arange(size, dtype=np.int64) // stride) % dims[axis]


def _compress(in_dims: list[int], in_axis: int, out_dims: list[int]) -> tuple[list[int], list[int], set[int]]:
    """Shrink a Reshape's dims by a block of consecutive elements that stays inside one input channel
    (GroupNorm's ``[C, H, W] -> [G, C/G*H*W]`` and back): the channels relate as the blocks do.

    * the elements after the channel axis (``inner``) divide the output's last dim: that dim shrinks by
      ``inner``, and each channel lands at several of its indices (it cannot carry the channels: returned
      in the third value);
    * else the largest output suffix ``out_dims[k:]`` (k >= 1) whose size divides ``inner`` holds positions
      inside a block only: those dims become 1 and the input keeps ``inner / size`` after the channel.
    Returns (in_dims, out_dims, axes that cannot carry the channels)."""
    inner = int(np.prod(in_dims[in_axis + 1:], dtype=np.int64))
    if inner > 1 and out_dims[-1] % inner == 0 and out_dims[-1] > inner and len(out_dims) > 1:
        return in_dims[:in_axis + 1], [*out_dims[:-1], out_dims[-1] // inner], {len(out_dims) - 1}
    for k in range(1, len(out_dims)):
        size = int(np.prod(out_dims[k:], dtype=np.int64))
        if size > 1 and inner % size == 0:
            rest = inner // size
            return [*in_dims[:in_axis + 1], *([rest] if rest > 1 else [])], [*out_dims[:k], *[1] * (len(out_dims) - k)], set()
    return in_dims, out_dims, set()


def reshape_map(in_dims: list[int], in_axis: int, out_dims: list[int]) -> tuple[int, IndexMap] | None:
    """The best output axis and its map for a Reshape of the static per-sample dims ``in_dims`` (channel
    axis ``in_axis``) into ``out_dims`` (batch excluded from both); None when no axis maps."""
    in_dims, out_dims = list(in_dims), list(out_dims)
    size = int(np.prod(in_dims, dtype=np.int64))
    if size != int(np.prod(out_dims, dtype=np.int64)) or size == 0:
        return None
    unusable: set[int] = set()
    if size > _MAX_ELEMENTS:  # too many to enumerate: the relation of blocks of elements, when it is one
        in_dims, out_dims, unusable = _compress(in_dims, in_axis, out_dims)
        if int(np.prod(in_dims, dtype=np.int64)) > _MAX_ELEMENTS:
            return None
    # trailing dims that both sides share and that hold no channel do not change the relation
    while len(in_dims) > in_axis + 1 and len(out_dims) > 1 and in_dims[-1] == out_dims[-1]:
        in_dims.pop()
        out_dims.pop()
    size = int(np.prod(in_dims, dtype=np.int64))
    in_channel = _channel_of_element(in_dims, in_axis, size)
    out_channels = [_channel_of_element(out_dims, axis, size) for axis in range(len(out_dims))]
    if in_dims[in_axis] == 1 and in_axis < len(out_dims):
        # one input channel, one component on any axis (GroupNorm with one group: [N, 1, C*H*W] back to
        # [N, C, H, W]): every axis is exact; the input's channel position is where the readers look
        return in_axis, components(in_channel, out_channels[in_axis], 1, out_dims[in_axis])
    # trailing axes of size 1 (an (N, C, 1, 1) gate spelt ``view(b, -1, 1, 1)``) hold one index each:
    # they would count as pure below with a single component, and are never where the channels are
    while len(out_dims) > 1 and out_dims[-1] == 1:
        out_dims.pop()
        out_channels.pop()
    # an axis on which every input channel lands at one index only carries no space (GroupNorm's
    # [N, G, C/G*H*W] is read along G, not along the mixed axis); among those the finest, the later
    pure = [len(_unique(in_channel * out_dims[axis] + out_channel)) == in_dims[in_axis]
            and axis not in unusable for axis, out_channel in enumerate(out_channels)]
    best, best_count = None, 0
    for axis in range(len(out_dims)):
        if (any(pure) and not pure[axis]) or axis in unusable:
            continue
        found = components(in_channel, out_channels[axis], in_dims[in_axis], out_dims[axis])
        if found is not None and found.components >= best_count:
            best, best_count = (axis, found), found.components
    return best


def depth_to_space_map(channels: int, block: int, mode: str) -> IndexMap | None:
    """DepthToSpace: output channel ``k`` of ``C / r^2`` takes input channels ``j * C/r^2 + k`` (DCR) or
    ``k * r^2 + j`` (CRD), j < r^2."""
    r2 = block * block
    if channels % r2:
        return None
    c_out = channels // r2
    k, j = np.meshgrid(np.arange(c_out), np.arange(r2), indexing="ij")
    source = j * c_out + k if mode == "DCR" else k * r2 + j
    return components(source.reshape(-1), k.reshape(-1), channels, c_out)


def space_to_depth_map(channels: int, block: int) -> IndexMap:
    """SpaceToDepth: output channel ``j * C + c`` (j < r^2) takes input channel ``c``."""
    out = np.arange(channels * block * block)
    return components(out % channels, out, channels, len(out))
