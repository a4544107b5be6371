"""The channel dataflow analysis: which channels are provably zero, which are coupled, what blocks them.

Model
-----
Every feature tensor (a tensor with a channel axis) carries, per channel:

* an **element id**. Ops that only move channels around (activations, BN, pooling, Concat, Split,
  Flatten ...) pass ids through; ops that create channels (Conv, Gemm, MatMul, graph inputs) make fresh
  ones. Ops that tie channels of different tensors (a residual ``Add``, SE gating ``Mul``, the groups of a
  depthwise conv) **couple** their ids with a union-find. A coupled class is one channel in every tensor
  that carries it and is deleted all-or-nothing.
* a **value state**: channel ``c`` is a known constant ``v`` everywhere (``const[c]``, ``value[c]``),
  or unknown. Zero is the constant 0. States flow forward: ``f(v)`` through elementwise ops (so zero stays
  zero exactly when ``f(0) = 0``), ``gamma (v - mean)/sigma + beta`` through BN, ``0 * anything = 0`` ...

Deciding
--------
A class can be deleted unless something **keeps** it:

* a *barrier*: a graph input or output, an op without a rule, a control-flow body reading it;
* a *reducing consumer* (Conv with one group, Gemm, MatMul, ConvTranspose) reading a tensor of the class
  in which the channel is neither zero, nor ignored by the consumer's weights, nor a constant that the
  consumer can absorb into its bias exactly (only without spatial padding);
* a *conditional* keep (:meth:`ChannelAnalysis.keep_if`): a grouped conv reads a live input channel only
  for the outputs of its group, so it holds that input only while one of those outputs is kept.

The plan then *settles* (:meth:`RemovalPlan.settle`): conditional keeps, tensors that must not become
empty, and rules whose rewrite needs a shape constraint (a grouped conv's groups keep equal sizes) each
restore channels until nothing changes. Restoring only ever keeps more, so the loop ends.

Channelwise consumers never keep a class: their output carries the same ids, so the channel vanishes in
lockstep. Deleting is always safe to undo: keeping a channel never changes the model's output, which is
how tensors that would become empty (and layer sizes rounded to a multiple) are handled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx

from onnxslim.graph.model import Graph

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
    kind: str  # BARRIER, LIVE or CONSTANT
    text: str


@dataclasses.dataclass(frozen=True)
class MaskSite:
    """A per-channel constant ``Mul`` (a mask) with zero entries at ``zero_channels`` of ``tensor``."""

    node: onnx.NodeProto
    tensor: str
    channels: int
    zero_channels: np.ndarray


class UnionFind:
    """Union-find over element ids, grown in blocks; find/union are vectorised over id arrays."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, np.int64)

    @property
    def size(self) -> int:
        return len(self.parent)

    def new(self, count: int) -> np.ndarray:
        start = len(self.parent)
        ids = np.arange(start, start + count, dtype=np.int64)
        self.parent = np.concatenate([self.parent, ids])
        return ids

    def find(self, ids: np.ndarray) -> np.ndarray:
        roots = self.parent[ids]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                return roots
            roots = up

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            low = np.minimum(ra[differ], rb[differ])
            high = np.maximum(ra[differ], rb[differ])
            self.parent[high] = low  # a repeated 'high' keeps one of its targets; the loop unites the rest

    def roots(self) -> np.ndarray:
        return self.find(np.arange(self.size, dtype=np.int64))


class ChannelAnalysis:
    """Runs every node's rule in topological order, then decides which element ids to delete."""

    def __init__(self, index: Graph):
        self.index = index
        self.uf = UnionFind()
        self.info: dict[str, ChannelInfo] = {}
        self.reasons: list[Reason] = []
        self._reason_ids: dict[Reason, int] = {}
        self._keeps: list[tuple[np.ndarray, int]] = []
        self.conditional: list[tuple[np.ndarray, np.ndarray, int]] = []  # (trigger ids, ids, reason)
        self.masks: list[MaskSite] = []
        self.barriers: list[tuple[onnx.NodeProto, str]] = []
        self.creators: dict[str, onnx.NodeProto] = {}  # tensor -> node that made its ids fresh
        self._weight_readers: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- API used by rules -------------------------------------------------------------------------
    def feature(self, name: str) -> ChannelInfo | None:
        """Channel facts of a computed tensor (None for constants, absent inputs, shape-less tensors)."""
        if not name or self.index.is_const(name):
            return None
        return self.info.get(name)

    def set(self, name: str, info: ChannelInfo) -> None:
        if name:
            self.info[name] = info

    def fresh(self, node: onnx.NodeProto | None, name: str, channels: int, axis: int, rank: int,
              const: np.ndarray | None = None, value: np.ndarray | None = None) -> ChannelInfo:
        """New element ids for the output ``name`` of a channel-creating node."""
        ids = self.uf.new(channels)
        if const is None:
            const, value = np.zeros(channels, bool), np.zeros(channels)
        info = ChannelInfo(ids, axis, rank, const, np.where(const, value, 0.0))
        self.set(name, info)
        if node is not None:
            self.creators[name] = node
        return info

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.union(a, b)

    def share_weight(self, weight: str, in_ids: np.ndarray, out_ids: np.ndarray) -> None:
        """Layers reading one weight initializer must slice it alike: couple their channels.

        (Slicing it differently would need one copy per reader and make the model larger.)
        """
        first = self._weight_readers.setdefault(weight, (in_ids, out_ids))
        if first[0] is not in_ids:
            self.couple(first[0], in_ids)
            self.couple(first[1], out_ids)

    def keep(self, ids: np.ndarray, kind: str, text: str) -> None:
        """Channels ``ids`` (and their whole classes) must not be deleted, because of ``text``."""
        if len(ids) == 0:
            return
        self._keeps.append((np.asarray(ids, np.int64), self.reason_id(Reason(kind, text))))

    def keep_if(self, trigger: np.ndarray, ids: np.ndarray, kind: str, text: str) -> None:
        """Keep the classes of ``ids`` when any class of ``trigger`` is kept (resolved by the plan)."""
        if len(ids) and len(trigger):
            self.conditional.append((np.asarray(trigger, np.int64), np.asarray(ids, np.int64),
                                     self.reason_id(Reason(kind, text))))

    def reason_id(self, reason: Reason) -> int:
        rid = self._reason_ids.get(reason)
        if rid is None:
            rid = self._reason_ids[reason] = len(self.reasons)
            self.reasons.append(reason)
        return rid

    def barrier(self, node: onnx.NodeProto, why: str) -> None:
        """Keep every channel the node reads; its outputs get fresh ids that are kept too.

        Nodes that touch no feature map (shape arithmetic on small int tensors) keep nothing and are
        not reported.
        """
        label = f"barrier {node.op_type} '{self.index.node_name(node)}': {why}"
        touched = False
        for name in node.input:
            info = self.feature(name)
            if info is not None:
                self.keep(info.ids, BARRIER, label)
                touched = True
        for name in node.output:
            shape = self.index.shape(name)
            if name and shape and len(shape) >= 2 and shape[1]:
                info = self.fresh(None, name, shape[1], 1, len(shape))
                self.keep(info.ids, BARRIER, label)
                touched = True
        if touched:
            self.barriers.append((node, why))

    def note_mask(self, node: onnx.NodeProto, tensor: str, channels: int, zero_channels: np.ndarray) -> None:
        self.masks.append(MaskSite(node, tensor, channels, zero_channels))

    # -- running ---------------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        from onnxslim.graph.rules import rule_for

        index = self.index
        for value in index.inputs:
            shape = index.shape(value.name)
            if shape and len(shape) >= 2 and shape[1]:
                info = self.fresh(None, value.name, shape[1], 1, len(shape))
                self.keep(info.ids, BARRIER, f"graph input '{value.name}'")
        for node in index.nodes:
            rule_for(node).propagate(node, self)
        for name in sorted(index.outputs):
            info = self.info.get(name)
            if info is not None:
                self.keep(info.ids, BARRIER, f"graph output '{name}'")
        for name in sorted(index.subgraph_reads):
            info = self.info.get(name)
            if info is not None:
                self.keep(info.ids, BARRIER, f"read inside a control-flow body ('{name}')")
        return self

    def kept_reason(self) -> np.ndarray:
        """Per element id: index into ``reasons`` of the first reason its class is kept, or -1."""
        roots = self.uf.roots()
        reason_of_root = np.full(self.uf.size, -1, np.int64)
        for ids, rid in reversed(self._keeps):  # reversed: the earliest reason wins
            reason_of_root[roots[ids]] = rid
        return reason_of_root[roots]

    def kept_by(self, kind: str) -> np.ndarray:
        """Per element id: True when some reason of kind ``kind`` keeps its class."""
        roots = self.uf.roots()
        held = np.zeros(self.uf.size, bool)
        for ids, rid in self._keeps:
            if self.reasons[rid].kind == kind:
                held[roots[ids]] = True
        return held[roots]

    def plan(self, round_to: int = 1) -> RemovalPlan:
        reason = self.kept_reason()
        plan = RemovalPlan(self, reason < 0, reason)
        plan.settle()
        if round_to > 1:
            plan.round_layers(round_to)
            plan.settle()
        return plan


class RemovalPlan:
    """Which element ids are deleted; per-tensor keep masks derive from it."""

    def __init__(self, analysis: ChannelAnalysis, removed: np.ndarray, reason: np.ndarray):
        self.analysis = analysis
        self.removed = removed
        self.reason = reason
        self.roots = analysis.uf.roots()

    def keep(self, name: str) -> np.ndarray | None:
        info = self.analysis.info.get(name)
        if info is None:
            return None
        return ~self.removed[info.ids]

    def is_empty(self, name: str) -> bool:
        info = self.analysis.info.get(name)
        return info is not None and info.size > 0 and bool(self.removed[info.ids].all())

    def restore(self, ids: Iterable[int], why: str | int) -> bool:
        """Keep the classes of ``ids`` after all (always safe), recording ``why`` (a text, or the id of
        a recorded reason). Returns True when something was restored."""
        ids = np.asarray(list(ids), np.int64)
        if not len(ids):
            return False
        members = np.isin(self.roots, self.roots[ids]) & self.removed
        if not members.any():
            return False
        self.removed[members] = False
        self.reason[members] = why if isinstance(why, int) else self.analysis.reason_id(Reason(STRUCTURAL, why))
        return True

    def settle(self) -> None:
        """Restore channels until every constraint holds: conditional keeps, tensors that must not
        become empty, and the rules' own constraints (``Rule.settle``). Each step only keeps more."""
        from onnxslim.graph.rules import rule_for

        nodes = self.analysis.index.nodes
        changed = True
        while changed:
            changed = False
            for trigger, ids, rid in self.analysis.conditional:
                if not self.removed[trigger].all():
                    changed |= self.restore(ids, rid)
            changed |= self.fill_empty_tensors()
            for node in nodes:
                changed |= bool(rule_for(node).settle(node, self))

    @property
    def anything_removed(self) -> bool:
        used = np.zeros(len(self.removed), bool)
        for info in self.analysis.info.values():
            used[info.ids] = True
        return bool((self.removed & used).any())

    def deletes(self, node: onnx.NodeProto) -> bool:
        """The rewrite deletes ``node`` outright: every output it has loses every channel."""
        outputs = [name for name in node.output if name]
        return bool(outputs) and all(self.is_empty(name) for name in outputs)

    def fill_empty_tensors(self) -> bool:
        """Keep one channel of every tensor that would become empty where that is not allowed; returns
        True when it restored anything."""
        from onnxslim.graph.rules import rule_for

        analysis = self.analysis
        index = analysis.index
        changed, restored = True, False
        while changed:
            changed = False
            for node in index.nodes:
                rule = rule_for(node)
                for position, name in enumerate(node.output):
                    if not name or not self.is_empty(name):
                        continue
                    allowed = rule.allows_empty_output(node, position, self) and all(
                        rule_for(use.node).allows_empty_input(use.node, use.slot, self) or self.deletes(use.node)
                        for use in index.uses(name)
                    ) and name not in index.outputs
                    if not allowed:
                        self.restore(analysis.info[name].ids[:1], f"kept so that '{name}' does not become empty")
                        changed = restored = True
        return restored

    def round_layers(self, multiple: int) -> None:
        """Keep extra channels so every channel-creating layer keeps a multiple of ``multiple``.

        The extra channels are the removed ones whose producing filters have the largest L1 norm.
        """
        from onnxslim.graph.rules import rule_for

        analysis = self.analysis
        for _ in range(8):  # coupled layers can disturb each other; a few passes settle it
            changed = False
            for name, node in analysis.creators.items():
                info = analysis.info[name]
                keep = ~self.removed[info.ids]
                kept, total = int(keep.sum()), info.size
                if kept == 0 or kept % multiple == 0:
                    continue
                target = min(total, -(-kept // multiple) * multiple)
                if target == kept:
                    continue
                scores = rule_for(node).channel_scores(node, analysis)
                if scores is None:
                    scores = np.zeros(total)
                candidates = np.flatnonzero(~keep)
                candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
                self.restore(info.ids[candidates[: target - kept]], f"kept to round '{name}' to a multiple of {multiple}")
                changed = True
            if not changed:
                return
