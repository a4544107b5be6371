"""The removal plan: which element ids are deleted, derived from an analysis' keep reasons.

Every class that nothing keeps is removed (:func:`plan_removal`). Keeping a class is always safe (the
model's output never changes), so the plan then *restores* classes where deleting them is not allowed
or not wanted: a tensor that would become empty where its producer or a reader cannot take that
(:meth:`RemovalPlan.fill_empty_tensors`), and channels that round a layer's count up to a multiple
(:meth:`RemovalPlan.round_layers`). Each restore records a STRUCTURAL reason.

:meth:`RemovalPlan.settle` restores until every constraint holds at once: conditional keeps
(:meth:`ChannelAnalysis.keep_if`, recorded with their own reason), non-empty tensors, and each rule's
``settle`` (a grouped conv's groups stay equal). Each step only keeps more, so the loop ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from onnxslim.graph.names import layer_label, module_path
from onnxslim.graph.values import STRUCTURAL, Reason

_EMPTY_FILLER = "does not become empty"  # the reason of the one channel kept in a tensor that must not be empty

if TYPE_CHECKING:
    from onnxslim.graph.analysis import ChannelAnalysis


def plan_removal(analysis: ChannelAnalysis, round_to: int = 1) -> RemovalPlan:
    """Remove every class no reason keeps; then keep tensors non-empty and round layers to ``round_to``."""
    reason = analysis.kept_reason()
    plan = RemovalPlan(analysis, reason < 0, reason)
    plan.settle()
    if round_to > 1:
        plan.round_layers(round_to)
        plan.settle()
    return plan


class RemovalPlan:
    """Which element ids are deleted (``removed``, bool per id); per-tensor keep masks derive from it.

    ``reason`` holds, per id, the index into ``analysis.reasons`` of why its class is kept (-1: removed).
    """

    def __init__(self, analysis: ChannelAnalysis, removed: np.ndarray, reason: np.ndarray):
        self.analysis = analysis
        self.removed = removed
        self.reason = reason
        self.roots = analysis.uf.roots()

    def keep(self, name: str) -> np.ndarray | None:
        """Bool per channel of tensor ``name``: True where kept (None when it carries no channels)."""
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
        """Restore channels until every constraint holds, each kind only once the ones before it hold:
        conditional keeps, the rules' own constraints (``Rule.settle``: a grouped conv's groups stay
        equal), tensors that must not become empty. A chain of conditional keeps (AlexNet's grouped
        convs in a row, each input kept while its group's outputs are) reaches a tensor only after the
        keeps downstream of it; balanced or filled before that, its groups kept a masked channel back
        (and, balanced, 7 more: 9080 of 9088 masked channels deleted)."""
        rules = [(node, self.analysis.rule_for(node)) for node in self.analysis.index.nodes]
        while True:
            while True:
                while self._conditional_keeps():
                    pass
                if not any([bool(rule.settle(node, self)) for node, rule in rules]):
                    break
            if not self.fill_empty_tensors():
                return

    def _conditional_keeps(self) -> bool:
        """One pass over the conditional keeps whose trigger is kept, the last recorded first (a trigger is
        downstream of what it keeps: a chain settles in one pass); True when one restored anything."""
        changed = False
        for trigger, ids, rid in reversed(self.analysis.conditional):
            if not self.removed[trigger].all():
                changed |= self.restore(ids, rid)
        return changed

    def deletes(self, node) -> bool:
        """The rewrite deletes ``node`` outright: every output it has loses every channel."""
        outputs = [name for name in node.output if name]
        return bool(outputs) and all(self.is_empty(name) for name in outputs)

    @property
    def anything_removed(self) -> bool:
        used = np.zeros(len(self.removed), bool)
        for info in self.analysis.info.values():
            used[info.ids] = True
        return bool((self.removed & used).any())

    def fill_empty_tensors(self) -> bool:
        """Keep one channel of every tensor that would become empty where that is not allowed; returns
        True when it restored anything."""
        analysis = self.analysis
        index = analysis.index
        changed, restored = True, False
        while changed:
            changed = False
            for node in index.nodes:
                rule = analysis.rule_for(node)
                for position, name in enumerate(node.output):
                    if not name or not self.is_empty(name):
                        continue
                    allowed = rule.allows_empty_output(node, position, self) and all(
                        analysis.rule_for(use.node).allows_empty_input(use.node, use.slot, self)
                        or self.deletes(use.node) for use in index.uses(name)
                    ) and name not in index.outputs
                    if not allowed:
                        self.restore(analysis.info[name].ids[:1], f"kept so that '{name}' {_EMPTY_FILLER}")
                        changed = restored = True
        return restored

    def round_layers(self, multiple: int) -> None:
        """Keep extra channels so every channel-creating layer keeps a multiple of ``multiple``.

        The extra channels are the removed ones whose producing filters have the largest L1 norm, among the
        classes that no layer visited before has (in graph order): restoring them leaves the earlier layers
        as rounded. A layer narrower than ``multiple`` stays as masked (prune's ``rounded_kept`` leaves it
        so; rounding it up meant giving back every mask: SCI's 3-channel convs, 0 of 2 deleted). A layer
        that only classes of earlier layers could round stays as it is: a residual
        stream widened block by block with zero-padded channels (BlazeFace: 24, 28, 32 ... 96) would
        otherwise give back every channel, one layer after the other.
        """
        analysis = self.analysis
        for _ in range(8):  # coupled layers can disturb each other; a few passes settle it
            changed = False
            seen = np.zeros(len(self.removed), bool)  # classes (roots) of the layers visited before
            for name, node in analysis.creators.items():
                info = analysis.info[name]
                shared = seen[self.roots[info.ids]]
                seen[self.roots[info.ids]] = True
                keep = ~self.removed[info.ids]
                kept, total = int(keep.sum()), info.size
                if kept == 0 or kept % multiple == 0 or total < multiple:
                    continue  # a layer narrower than one block stays as masked, as prune leaves it
                if self.only_fillers(info.ids[keep]):
                    continue  # a dead layer keeps its one placeholder channel: 8 zero channels ran slower
                target = min(total, -(-kept // multiple) * multiple)
                if target == kept:
                    continue
                scores = analysis.rule_for(node).channel_scores(node, analysis)
                if scores is None:
                    scores = np.zeros(total)
                candidates = np.flatnonzero(~keep & ~shared)
                if len(candidates) < target - kept:
                    continue  # only restoring classes of earlier layers would reach it: they stay rounded
                candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
                changed |= self._round_layer(name, candidates, target, multiple)
            if not changed:
                return

    def only_fillers(self, ids: np.ndarray) -> bool:
        """Whether every class of ``ids`` is kept only so that a tensor does not become empty (a layer whose
        masks are all zero: rounding it up would add zero channels and nothing else)."""
        reasons = self.analysis.reasons
        return all(reasons[int(r)].text.endswith(_EMPTY_FILLER) for r in np.unique(self.reason[ids]))

    def _layer_label(self, tensor: str) -> str:
        """The layer writing ``tensor`` as the report's table names it (``features.conv1 (node_conv2d)``)."""
        node = self.analysis.index.producer.get(tensor)
        return f"'{tensor}'" if node is None else layer_label(self.analysis.index.node_name(node), module_path(node))

    def _round_layer(self, name: str, candidates: np.ndarray, target: int, multiple: int) -> bool:
        """Restore ``candidates`` (best first) of layer ``name`` until it keeps ``target`` channels, with
        the rules' constraints settled. Restoring the first ``target - kept`` at once is the usual case;
        where settling then keeps more than ``target`` (a grouped conv's groups stay equal: a channel
        restored in a group whose others are gone brings one back in every group), candidates are tried
        one at a time and those that overshoot are skipped (until the channels still wanted are fewer than
        any single restore has brought back: settling is the costly step). Kept only when the layer then keeps exactly
        ``target`` (the next multiple, or all), so a second slim finds nothing more to round or delete;
        otherwise the layer stays as it was, unrounded (before, a restore that settling carried past the
        target was kept when it landed on any multiple: a ShuffleNet v1 unit whose grouped convs, 3 groups
        around a channel shuffle, kept 12 of 24 went back to all 24 at round-to 8)."""
        ids = self.analysis.info[name].ids
        why = f"kept to round {self._layer_label(name)} to a multiple of {multiple}"
        before = self._state()
        self.restore(ids[candidates[: target - int((~self.removed[ids]).sum())]], why)
        self.settle()
        if int((~self.removed[ids]).sum()) == target:
            return True
        self._set_state(before)
        kept, smallest = int((~self.removed[ids]).sum()), target
        for candidate in candidates:
            step = self._state()
            self.restore(ids[[candidate]], why)
            self.settle()
            now = int((~self.removed[ids]).sum())
            smallest = min(smallest, now - kept)
            if now > target:
                self._set_state(step)
                if target - kept < smallest:
                    break  # no restore brought back fewer channels than this one needs: none will fit
            elif now == target:
                return True
            else:
                kept = now
        self._set_state(before)
        return False

    def _state(self) -> tuple[np.ndarray, np.ndarray]:
        return self.removed.copy(), self.reason.copy()

    def _set_state(self, state: tuple[np.ndarray, np.ndarray]) -> None:
        self.removed[:], self.reason[:] = state
