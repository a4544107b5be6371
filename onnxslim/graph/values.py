"""Value states: the per-channel facts a rule computes for one tensor, and why a channel is kept.

A feature tensor's :class:`ChannelInfo` holds, per channel ``c``: its element id (see
:mod:`onnxslim.graph.unionfind`), and whether it is a known constant ``value[c]`` everywhere
(``const[c]``) or unknown. Zero is the constant 0. Rules derive an output's state from the inputs'
(``f(v)`` through elementwise ops, ``gamma (v - mean)/sigma + beta`` through BN, ``0 * anything = 0`` ...).

A :class:`Reason` says why a class of channels is kept; its ``kind`` is one of the kinds below.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

# kinds of reasons a class is kept; 'barrier' classes are out of reach by construction
BARRIER, LIVE, CONSTANT, STRUCTURAL = "barrier", "live", "constant", "structural"


@dataclasses.dataclass
class ChannelInfo:
    """Per-channel facts of one feature tensor; arrays are indexed by channel (length C)."""

    ids: np.ndarray  # int64 element ids
    axis: int  # the channel axis
    rank: int
    const: np.ndarray  # bool: the channel holds one value everywhere
    value: np.ndarray  # float64: that value (meaningful where const)

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def zero(self) -> np.ndarray:
        return self.const & (self.value == 0)

    def unknown_values(self) -> ChannelInfo:
        return dataclasses.replace(self, const=np.zeros(self.size, bool), value=np.zeros(self.size))

    def with_values(self, const: np.ndarray, value: np.ndarray) -> ChannelInfo:
        value = np.where(const, value, 0.0)
        return dataclasses.replace(self, const=const, value=value)

    def take(self, positions: np.ndarray) -> ChannelInfo:
        return dataclasses.replace(self, ids=self.ids[positions], const=self.const[positions],
                                   value=self.value[positions])


@dataclasses.dataclass(frozen=True)
class Reason:
    """Why a class is kept: ``kind`` is BARRIER, LIVE, CONSTANT or STRUCTURAL; ``text`` names op and tensor."""

    kind: str
    text: str


@dataclasses.dataclass(frozen=True)
class MaskSite:
    """A per-channel constant ``Mul`` (a mask) with zero entries at ``zero_channels`` of ``tensor``."""

    node: onnx.NodeProto
    tensor: str
    channels: int
    zero_channels: np.ndarray
