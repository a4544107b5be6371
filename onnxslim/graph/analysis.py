"""The channel analysis: run every node's rule in topological order and record what keeps channels.

Rules (see :mod:`onnxslim.graph.rules`) call the methods in the "API used by rules" section: they read
the :class:`~onnxslim.graph.values.ChannelInfo` of their inputs (:meth:`ChannelAnalysis.feature`), make
fresh element ids for channels they create, couple ids they tie, and keep the channels they need, with a
reason. The rule set is a value passed in: the analysis never looks rules up by itself.

A class is kept when something keeps it — a *barrier* (a graph input or output, an op without a rule,
a control-flow body reading it) or a *reducing consumer* reading it while it is live or a constant the
consumer cannot absorb (see :func:`onnxslim.graph.rules.base.block_reduced_channels`). Which classes go is
decided by :mod:`onnxslim.graph.plan`.

Rules may also ask whether a tensor is provably non-negative (:meth:`ChannelAnalysis.nonnegative`): a
reduction whose result a zero channel cannot change on such an input (ReduceMax over channels) lets
zero channels go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx

from onnxslim.graph.model import Graph
from onnxslim.graph.plan import RemovalPlan, plan_removal
from onnxslim.graph.unionfind import UnionFind
from onnxslim.graph.values import BARRIER, ChannelInfo, MaskSite, Reason

if TYPE_CHECKING:
    from onnxslim.graph.rules.base import Rule


class RuleLookup(Protocol):
    """What the analysis needs of a rule set (:class:`onnxslim.graph.rules.RuleSet`)."""

    def rule_for(self, node: onnx.NodeProto) -> Rule: ...


class ChannelAnalysis:
    """Runs every node's rule in topological order, then says which element ids are kept and why.

    ``index`` is the graph (normalised, with static shapes where known); ``rules`` the rule set.
    """

    def __init__(self, index: Graph, rules: RuleLookup):
        self.index = index
        self.rules = rules
        self.uf = UnionFind()
        self.info: dict[str, ChannelInfo] = {}
        self.reasons: list[Reason] = []
        self._reason_ids: dict[Reason, int] = {}
        self._keeps: list[tuple[np.ndarray, int]] = []
        self.conditional: list[tuple[np.ndarray, np.ndarray, int]] = []  # (trigger ids, ids, reason)
        self.masks: list[MaskSite] = []
        self.barriers: list[tuple[onnx.NodeProto, str]] = []
        self.creators: dict[str, onnx.NodeProto] = {}  # tensor -> node that made its ids fresh
        #: tensor -> the value its zero channels hold when it is not 0 (a quantized tensor's zero point)
        self.zero_points: dict[str, float] = {}
        self._weight_readers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._nonnegative: dict[str, bool] = {}  # tensor -> answer of nonnegative(), memoised
        self._positive: dict[str, bool] = {}  # tensor -> answer of positive(), memoised
        self._positions: dict[int, int] | None = None  # id(node) -> topological position

    def rule_for(self, node: onnx.NodeProto) -> Rule:
        """The rule of ``node`` in this analysis' rule set (a barrier rule for unknown ops)."""
        return self.rules.rule_for(node)

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

        (Slicing it differently would need one copy per reader and make the model larger.) A weight that
        is also a graph output is read as it is by the model's user: slicing it would add a sliced copy
        beside it (up to twice the weight), so its readers keep every channel.
        """
        if weight in self.index.outputs:
            for ids in (in_ids, out_ids):
                self.keep(ids, BARRIER, f"weight '{weight}' is a graph output")
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

    def nonnegative(self, name: str) -> bool:
        """True when every element of tensor ``name`` is >= 0 for every value of the graph inputs.

        Constants: when all their values are >= 0 (a mask trained by GAL may hold negative entries);
        graph inputs and absent names: False; a computed tensor: what the rule of its producer answers
        (:meth:`onnxslim.graph.rules.base.Rule.nonnegative`, False unless the rule proves it). Answers are
        memoised in this analysis; the unanswered producers are asked in topological order, so a rule's
        question about its own inputs is always answered from the memo (no recursion through the graph).
        """
        return self._sign_fact(name, self._nonnegative, lambda rule, node: rule.nonnegative(node, self),
                               lambda constant: constant >= 0)  # NaN: False

    def positive(self, name: str) -> bool:
        """True when every element of tensor ``name`` is > 0 (never 0, whatever the graph inputs): a
        divisor that cannot be 0 keeps a zero channel zero (``0 / d = 0``). As :meth:`nonnegative`,
        answered by the producers' rules (:meth:`onnxslim.graph.rules.base.Rule.positive`); constants
        when all their values are > 0."""
        return self._sign_fact(name, self._positive, lambda rule, node: rule.positive(node, self),
                               lambda constant: constant > 0)

    def _sign_fact(self, name: str, memo: dict[str, bool], ask, holds) -> bool:
        """``memo[name]``, asking the unanswered producers (``ask(rule, node)``) in topological order;
        a constant answers by ``holds(values)`` for all its values; a graph input: False."""
        if name not in memo:
            for node in self._unanswered_producers(name, memo):
                answer = bool(ask(self.rule_for(node), node))
                for output in node.output:
                    if output:
                        memo[output] = answer
            if name not in memo:
                constant = self.index.constant(name)
                memo[name] = constant is not None and bool(np.all(holds(constant)))
        return memo[name]

    def _unanswered_producers(self, name: str, memo: dict[str, bool]) -> list[onnx.NodeProto]:
        """The nodes ``name`` depends on whose answer is not in ``memo`` yet, in topological order."""
        if self._positions is None:
            self._positions = {id(node): position for position, node in enumerate(self.index.nodes)}
        found: dict[int, onnx.NodeProto] = {}
        stack, seen = [name], set()
        while stack:
            tensor = stack.pop()
            if not tensor or tensor in seen or tensor in memo or self.index.is_const(tensor):
                continue
            seen.add(tensor)
            node = self.index.producer.get(tensor)
            if node is not None and id(node) in self._positions:
                found[id(node)] = node
                stack.extend(node.input)
        return sorted(found.values(), key=lambda node: self._positions[id(node)])

    def barrier(self, node: onnx.NodeProto, why: str) -> None:
        """Keep every channel the node reads; its outputs get fresh ids that are kept too.

        An output of the shape of a feature input has that input's channel axis (LayerNormalization
        over the last axis of an NHWC map, as ConvNeXt writes it, keeps the layout, so the Linear layers
        after it read their channels on the last axis); any other output has it at axis 1. Nodes that
        touch no feature map (shape arithmetic on small int tensors) keep nothing and are not reported.
        """
        label = f"barrier {node.op_type} '{self.index.node_name(node)}': {why}"
        touched = False
        axes = {}
        for name in node.input:
            info = self.feature(name)
            if info is not None:
                self.keep(info.ids, BARRIER, label)
                touched = True
                for out in node.output:
                    if out and out not in axes and self.index.same_shape(name, out):
                        axes[out] = info.axis
        for name in node.output:
            shape = self.index.shape(name)
            axis = axes.get(name, 1)
            if name and shape and len(shape) >= 2 and shape[axis]:
                info = self.fresh(None, name, shape[axis], axis, len(shape))
                self.keep(info.ids, BARRIER, label)
                touched = True
        if touched:
            self.barriers.append((node, why))

    def note_mask(self, node: onnx.NodeProto, tensor: str, channels: int, zero_channels: np.ndarray) -> None:
        self.masks.append(MaskSite(node, tensor, channels, zero_channels))

    # -- running ---------------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        """Propagate through every node; graph inputs, outputs and control-flow reads are barriers."""
        index = self.index
        for value in index.inputs:
            shape = index.shape(value.name)
            if shape and len(shape) >= 2 and shape[1]:
                info = self.fresh(None, value.name, shape[1], 1, len(shape))
                self.keep(info.ids, BARRIER, f"graph input '{value.name}'")
        for node in index.nodes:
            self.rule_for(node).propagate(node, self)
        for name in sorted(index.outputs):
            info = self.info.get(name)
            if info is not None:
                self.keep(info.ids, BARRIER, f"graph output '{name}'")
        for name in sorted(index.subgraph_reads):
            info = self.info.get(name)
            if info is not None:
                self.keep(info.ids, BARRIER, f"read inside a control-flow body ('{name}')")
        return self

    def kept_reason(self, kind: str | None = None) -> np.ndarray:
        """Per element id: index into ``reasons`` of the first reason (of ``kind``, when given) its class
        is kept, or -1."""
        roots = self.uf.roots()
        reason_of_root = np.full(self.uf.size, -1, np.int64)
        for ids, rid in reversed(self._keeps):  # reversed: the earliest reason wins
            if kind is None or self.reasons[rid].kind == kind:
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
        """The removal plan (see :func:`onnxslim.graph.plan.plan_removal`)."""
        return plan_removal(self, round_to)
