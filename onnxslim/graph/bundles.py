"""Bundles: the classes that must be deleted together so that every grouped conv keeps equal groups.

A grouped reduction (Conv with ``group = g``, its QLinear form ...) reads ``g`` groups of ``a`` input
channels and writes ``g`` groups of ``b`` outputs; slim can delete channels of it only when every group
loses as many (the rules' ``settle`` gives back the others). ``prune``'s selections (per layer, global,
greedy) and its rounding of kept counts (:func:`onnxslim.graph.rounding.round_choice`) therefore take and
give back channel classes in bundles (:meth:`GroupStructures.bundle`). Classes are the union-find roots
of :class:`onnxslim.graph.analysis.ChannelAnalysis`; nothing here reads the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxslim.graph.analysis import ChannelAnalysis


class GroupStructures:
    """The groups of every grouped reduction (a grouped conv: g groups of ``a`` inputs and ``b`` outputs).

    Deleting keeps groups equal: a side with several channels per group loses the same number in every
    group, so a class there goes in a **bundle** with free classes of the other groups; a side with one
    channel per group (a depthwise input) loses only whole groups, so a class there goes with every class
    of its group, inputs and outputs. A class can sit in several such sides (ShuffleNet v1: a grouped 1x1
    conv's output channel, shuffled, is the input channel of the next grouped 1x1 conv, in a group of
    other channels): the bundle is closed over all of them, each side balanced in turn, the members
    added being the lowest-scoring free classes of the groups that lack them, preferring those that keep
    the bundle's other sides balanced (before, only a class's first side was balanced: the next grouped
    conv gave the bundle back and ShuffleNet v1 lost 1.4 % of its MACs at ratio 0.5)."""

    _LIMIT = 4096  # classes in one bundle: larger closures are given up (the bundle would not fit a budget)

    def __init__(self, analysis: ChannelAnalysis):
        roots = analysis.uf.roots()
        self.sides: list[list[list[int]]] = []  # every balanced side: its groups' classes
        self.partners: list[list[list[int]]] = []  # the other side of the same node, group by group
        self.side_of: dict[int, dict[int, dict[int, int]]] = {}  # root -> {side: {group: its channels}}
        self.pairs: dict[int, list[tuple[int, int]]] = {}  # root -> (side, group) of each of its channels
        self.whole: dict[int, list[int]] = {}  # root -> every class of its groups (one channel per group)
        for node in analysis.index.nodes:
            rule = analysis.rule_for(node)
            g = rule.channel_groups(node) if rule.reduction(node, 0) == "grouped" else 1
            x, y = analysis.feature(node.input[0]), analysis.info.get(node.output[0])
            if g < 2 or x is None or y is None or x.size % g or y.size % g:
                continue
            sides = [roots[x.ids].reshape(g, -1).tolist(), roots[y.ids].reshape(g, -1).tolist()]
            for side, partner in (sides, sides[::-1]):
                if len(side[0]) > 1:
                    self._add_side(side, partner)
                else:
                    for k, (root,) in enumerate(side):
                        whole = self.whole.setdefault(root, [])
                        whole.extend(r for r in sides[0][k] + sides[1][k] if r not in whole)

    def _add_side(self, side: list[list[int]], partner: list[list[int]]) -> None:
        index = len(self.sides)
        self.sides.append(side)
        self.partners.append(partner)
        for k, members in enumerate(side):
            for root in members:
                groups = self.side_of.setdefault(root, {}).setdefault(index, {})
                groups[k] = groups.get(k, 0) + 1  # a class can have channels in several groups
                self.pairs.setdefault(root, []).append((index, k))

    def bundle(self, root: int, free, score: dict[int, float], whole: bool = True) -> list[int]:
        """The classes that go with ``root`` (empty when some of them are not free or the closure does
        not balance within ``_LIMIT`` classes); ``whole=False`` leaves out the whole groups of depthwise
        inputs (the plan's settle brings those back consistently; rounding keeps to the balanced sides)."""
        wholes = self.whole if whole else {}
        if root not in self.side_of and root not in wholes:
            return [root]
        bundle: dict[int, None] = {}
        counts: dict[int, dict[int, int]] = {}  # side -> group -> the bundle's channels in it

        def add(r: int) -> None:
            bundle[r] = None
            for side, groups in self.side_of.get(r, {}).items():
                tally = counts.setdefault(side, {})
                for k, n in groups.items():
                    tally[k] = tally.get(k, 0) + n

        add(root)
        changed = True
        while changed:
            changed = False
            for w in [w for r in list(bundle) for w in wholes.get(r, ()) if w not in bundle]:
                if w in bundle:
                    continue
                if not free(w):
                    return []
                add(w)
                changed = True
            for side in list(counts):
                added = self._balance(side, counts, bundle, free, score, add)
                if added is None or len(bundle) > self._LIMIT:
                    return []
                changed |= added
        return list(bundle)

    def _balance(self, side: int, counts, bundle, free, score, add) -> bool | None:
        """Fill every group of ``side`` up to its fullest one, except the groups the bundle deletes whole
        (all their inputs and outputs: the conv loses that group); True when members were added, None
        when a group has too few free classes (or cannot be filled exactly)."""
        groups = counts[side]
        partner = self.partners[side]
        added = False
        for _ in range(self._LIMIT):
            # a group the bundle takes whole (every input and output of it) is dropped from the conv
            live = [k for k, members in enumerate(self.sides[side])
                    if groups.get(k, 0) < len(members) or not all(r in bundle for r in partner[k])]
            target = max((groups.get(k, 0) for k in live), default=0)
            short = [k for k in live if groups.get(k, 0) < target]
            if not short:
                return added
            k = short[0]
            fitting = [r for r in dict.fromkeys(self.sides[side][k]) if r not in bundle and free(r)
                       and all(groups.get(j, 0) + n <= target for j, n in self.side_of[r][side].items())]
            if not fitting:
                return None

            def crowding(r: int) -> tuple[int, float]:
                return (sum(counts[s].get(j, 0) for s, j in self.pairs[r] if s != side and s in counts),
                        score.get(r, 0.0))

            add(min(fitting, key=crowding))
            added = True
        return None
