"""Which channel classes ``prune`` removes: per-layer budgets over coupled units, or a global ranking.

Terms. A *class* is a set of coupled channels, deleted all-or-nothing (a residual group, the channels of
one grouped-conv group, a depthwise conv's input and outputs, the two operands of a gate ``x1 * x2``).
A *layer* is a channel-creating node (Conv, ConvTranspose, Gemm, MatMul) with ``n`` output channels; the
channels of one class in one layer are that layer's *unit* of the class (``u`` channels: 1 for a plain
conv, the group size for a grouped one). Classes held by a barrier are never chosen.

* ``scope="layer"``: every layer's budget is ``B = floor(ratio * n)`` channels. Layers are visited in graph
  order; each takes its lowest-scoring free classes while **every** layer the class touches stays within
  budget rounded to the nearest unit, ``removed + u <= B + (u - 1) // 2``, and keeps ``min_channels``. A class
  chosen for one layer counts against every other layer it belongs to, so no layer loses more than the
  ratio plus half a unit (Torch-Pruning's per-group budget, DepGraph, Fang et al. CVPR 2023, sec. 3.3).
  Around a grouped conv the groups must stay equal: a class goes in a *bundle* with one class of every
  other group (or, one input per group as in a depthwise conv with a channel multiplier, with its whole
  group); the bundle's channels in a layer are that layer's unit. The choice is then settled against
  the removal plan's structural constraints (channels given back, never taken) and topped up, a few
  rounds.
* ``scope="global"``: classes are ranked by importance per unit of cost — importance is the sum over
  its layers of the channel scores divided by that layer's mean score; cost is the MACs (or params) that
  deleting it saves: per layer ``u_out * cost/n_out + u_in * cost/n_in`` (a residual class is both), or
  the larger of the two for a depthwise layer (its unit is one group's input and outputs: the cost falls
  once). The cheapest-to-lose classes go, each in its bundle around a grouped conv (as above; before,
  one at a time: spread unevenly over the groups, slim gave them back, 0 % removed where 48 % was
  estimated), until ``ratio`` of the layers' total cost is removed, counted
  per layer as ``cost * (1-a)(1-b)`` left for fractions ``a`` of outputs and ``b`` of inputs removed
  (``cost * (1 - max(a, b))`` for a depthwise layer); every layer output and input keeps
  ``min_channels``. When the kept counts are rounded next (``multiple``), the choice is the prefix of
  that ranking whose *rounded* result removes the cost closest to ``ratio`` (a bisection over the
  prefix length; rounding each layer to its nearest multiple alone moves a residual stream's layers
  all the same way: BlazeFace lost 76 % of its MACs at ratio 0.5 and round-to 8).

Notes (returned with the choice): a layer whose budget a barrier makes unreachable (layers writing a
graph output are not mentioned), MACs unknown so params were used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np

from onnxslim.graph.analysis import ChannelAnalysis
from onnxslim.graph.bundles import GroupStructures
from onnxslim.graph.plan import RemovalPlan
from onnxslim.graph.rounding import round_choice
from onnxslim.graph.stats import count_macs
from onnxslim.graph.values import BARRIER, STRUCTURAL, Reason

_ROUNDS = 4  # choose, settle, choose again in place of what the structure gave back
Scope = Literal["layer", "global"]
Cost = Literal["macs", "params"]


@dataclasses.dataclass
class Selection:
    """The chosen classes (one element id, the root, per class) and what the user should know."""

    roots: np.ndarray
    notes: list[str]


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str  # the output tensor
    node: str  # the node's name
    size: int
    units: dict[int, int]  # root -> channels of that class in this layer's output
    in_size: int  # channels of its feature input (0 when it reads a constant or shape-less tensor)
    in_units: dict[int, int]  # root -> channels of that class in its feature input
    depthwise: bool = False  # one input channel per group: an output channel reads its group's input only

    def kept_fraction(self, removed_in: int, removed_out: int) -> float:
        """The fraction of the layer's cost (MACs, params) left with ``removed_out`` of its output and
        ``removed_in`` of its input channels removed: ``(1 - a) * (1 - b)`` for fractions ``a`` and ``b``,
        ``1 - max(a, b)`` for a depthwise layer (a group's input and outputs go together, so its cost
        falls once; a residual class that is both input and output of a dense conv removes both)."""
        a = removed_out / self.size
        b = removed_in / self.in_size if self.in_size else 0.0
        return 1 - max(a, b) if self.depthwise else (1 - a) * (1 - b)


def _units(roots: np.ndarray, ids: np.ndarray) -> dict[int, int]:
    found, counts = np.unique(roots[ids], return_counts=True)
    return dict(zip(found.tolist(), counts.tolist()))


def layers_of(analysis: ChannelAnalysis, roots: np.ndarray, names) -> list[Layer]:
    layers = []
    for name in names:
        node = analysis.creators[name]
        x = analysis.feature(node.input[0])
        layers.append(Layer(name, analysis.index.node_name(node), analysis.info[name].size,
                             _units(roots, analysis.info[name].ids), x.size if x is not None else 0,
                             _units(roots, x.ids) if x is not None else {},
                             x is not None and _depthwise(analysis, node, x.size)))
    return layers


def _depthwise(analysis: ChannelAnalysis, node, in_size: int) -> bool:
    """A grouped reduction with one input channel per group (a depthwise conv, with or without a multiplier)."""
    rule = analysis.rule_for(node)
    return in_size > 1 and rule.reduction(node, 0) == "grouped" and rule.channel_groups(node) == in_size


class Tally:
    """Channels removed so far per layer output and per layer input; a class fits when no layer output
    nor input would keep fewer than ``min_channels`` (a layer fed only zeros would be deleted whole)."""

    def __init__(self, layers: list[Layer], min_channels: int, chosen: set[int] = frozenset()):
        self.min_channels = min_channels
        self.layers = layers
        self.removed = {layer.name: 0 for layer in layers}
        self.removed_in = {layer.name: 0 for layer in layers}
        self.members: dict[int, list[Layer]] = {}
        self.readers: dict[int, list[Layer]] = {}
        for layer in layers:
            for root in layer.units:
                self.members.setdefault(root, []).append(layer)
            for root in layer.in_units:
                self.readers.setdefault(root, []).append(layer)
        self.add(chosen)

    def counts(self, bundle: Iterable[int]) -> tuple[dict[str, int], dict[str, int]]:
        """Channels of ``bundle`` per layer output and per layer input."""
        out: dict[str, int] = {}
        into: dict[str, int] = {}
        for root in bundle:
            for member in self.members.get(root, ()):
                out[member.name] = out.get(member.name, 0) + member.units[root]
            for reader in self.readers.get(root, ()):
                into[reader.name] = into.get(reader.name, 0) + reader.in_units[root]
        return out, into

    def fits(self, bundle: Iterable[int], budget: dict[str, int] | None) -> bool:
        """Removing the classes of ``bundle`` together keeps every layer within its budget (when given),
        rounded to the nearest unit, and leaves every layer output and input ``min_channels``."""
        out, into = self.counts(bundle)
        sizes = {layer.name: (layer.size, layer.in_size) for layer in self.layers}
        return all(sizes[name][0] - self.removed[name] - n >= self.min_channels
                   and (budget is None or self.removed[name] + n <= budget[name] + (n - 1) // 2)
                   for name, n in out.items()) and \
            all(sizes[name][1] - self.removed_in[name] - n >= self.min_channels for name, n in into.items())

    def remaining_cost(self, layer_cost: dict[str, float]) -> float:
        """The cost left in the layers (:meth:`Layer.kept_fraction` of each layer's cost)."""
        return sum(layer_cost.get(layer.name, 0.0) * layer.kept_fraction(self.removed_in[layer.name],
                                                                        self.removed[layer.name])
                   for layer in self.layers)

    def add(self, bundle: Iterable[int]) -> None:
        out, into = self.counts(bundle)
        for name, n in out.items():
            self.removed[name] += n
        for name, n in into.items():
            self.removed_in[name] += n


def class_scores(analysis: ChannelAnalysis, roots: np.ndarray, scores: dict[str, np.ndarray],
                 normalise: bool) -> dict[int, float]:
    """Per class: the sum of its channels' scores over the layers that create it (each layer's scores
    divided by their mean when ``normalise``)."""
    result: dict[int, float] = {}
    for name, layer_scores in scores.items():
        values = layer_scores / (float(np.mean(layer_scores)) or 1.0) if normalise else layer_scores
        for root, value in zip(roots[analysis.info[name].ids].tolist(), values.tolist()):
            result[root] = result.get(root, 0.0) + float(value)
    return result


def choose(analysis: ChannelAnalysis, scores: dict[str, np.ndarray], ratio: float, scope: Scope = "layer",
           min_channels: int = 1, cost: Cost = "macs", multiple: int = 1) -> Selection:
    """The classes to remove (see the module docstring); ``scores`` maps a layer's output tensor to one
    score per output channel (higher = more important). ``multiple``: the kept-count rounding that
    follows (:func:`onnxslim.graph.rounding.round_choice`); ``scope="global"`` sizes its choice so that
    the rounded one removes ``ratio`` of the cost."""
    roots = analysis.uf.roots()
    locked = analysis.kept_by(BARRIER)
    layers = layers_of(analysis, roots, scores)
    notes: list[str] = []
    if scope == "global":
        def rounded(chosen: set[int]) -> set[int]:
            return {int(r) for r in round_choice(analysis, np.array(sorted(chosen), np.int64), scores, multiple, locked)}

        chosen = _choose_global(analysis, layers, class_scores(analysis, roots, scores, True), locked, ratio,
                                min_channels, cost, notes, rounded if multiple > 1 else None)
    else:
        chosen = _choose_per_layer(analysis, layers, class_scores(analysis, roots, scores, False), locked, ratio,
                                   min_channels)
        notes.extend(_unreachable_budgets(analysis, roots, layers, locked, chosen, ratio))
    return Selection(np.array(sorted(chosen), np.int64), notes)


def _choose_per_layer(analysis: ChannelAnalysis, layers: list[Layer], score: dict[int, float], locked: np.ndarray,
                      ratio: float, min_channels: int) -> set[int]:
    budget = {layer.name: int(ratio * layer.size) for layer in layers}
    groups = GroupStructures(analysis)
    chosen: set[int] = set()
    tried: set[int] = set()  # classes the structure gave back: not chosen again

    def free(root: int) -> bool:
        return not locked[root] and root not in chosen and root not in tried

    for _ in range(_ROUNDS):
        tally = Tally(layers, min_channels, chosen)
        added = False
        for layer in layers:
            for root in sorted(filter(free, layer.units), key=lambda r: score[r]):
                if tally.removed[layer.name] >= budget[layer.name]:
                    break
                bundle = groups.bundle(root, free, score) if free(root) else []
                if bundle and tally.fits(bundle, budget):
                    chosen.update(bundle)
                    tally.add(bundle)
                    added = True
        settled = settle_choice(analysis, chosen)
        tried |= chosen - settled
        chosen &= settled
        if not added:
            break
    return chosen


def settle_choice(analysis: ChannelAnalysis, chosen: set[int]) -> set[int]:
    """The chosen classes that the graph's structure lets go together: the removal plan's structural
    constraints (tensors that must not become empty, each rule's ``settle``: a grouped conv's groups stay
    equal) give back the others. Only ever fewer: budgets still hold."""
    roots = analysis.uf.roots()
    removed = np.isin(roots, np.fromiter(chosen, np.int64, len(chosen)))
    rid = analysis.reason_id(Reason(STRUCTURAL, "not chosen by prune"))
    plan = RemovalPlan(analysis, removed, np.where(removed, -1, rid))
    changed = True
    while changed:
        changed = plan.fill_empty_tensors()
        for node in analysis.index.nodes:
            changed |= bool(analysis.rule_for(node).settle(node, plan))
    return {r for r in chosen if plan.removed[r]}


def _choose_global(analysis, layers, importance, locked, ratio, min_channels, cost, notes,
                   rounded: Callable[[set[int]], set[int]] | None = None) -> set[int]:
    layer_cost = _layer_costs(analysis, cost, notes)
    class_cost = _class_costs(layers, layer_cost)
    total = sum(layer_cost.values())
    ranked = sorted((r for r in importance if not locked[r]),
                    key=lambda r: importance[r] / max(class_cost.get(r, 0.0), 1e-12))
    groups = GroupStructures(analysis)

    def bundle(root: int, taken: set[int]) -> list[int]:
        def free(r: int) -> bool:
            return not locked[r] and r not in taken
        return groups.bundle(root, free, importance) if free(root) else []

    sequence, saved = _global_sequence(layers, ranked, layer_cost, min_channels, total, ratio if rounded is None else 1.0,
                                       bundle)
    end = next((k for k, value in enumerate(saved) if value >= ratio * total), len(sequence))
    if rounded is None or not total:  # no cost to remove (no prunable layer): nothing to size
        achieved = saved[end]
    else:
        end, achieved = _rounded_prefix(sequence, saved, ratio * total, rounded,
                                        lambda chosen: total - Tally(layers, min_channels, chosen).remaining_cost(layer_cost))
        notes.append(f"--scope global with rounding: the choice is sized so that the rounded kept counts remove "
                     f"{100 * achieved / total:.1f}% of the {cost} ({100 * ratio:.1f}% asked)")
    if total and achieved < ratio * total - 1e-9 and end == len(sequence):
        notes.append(f"--scope global: {100 * achieved / total:.1f}% of the {cost} removed instead of "
                     f"{100 * ratio:.1f}% (the rest is held by barriers or min_channels)")
    return settle_choice(analysis, _union(sequence[:end])) if end else set()


def _union(bundles: list[list[int]]) -> set[int]:
    return {root for bundle in bundles for root in bundle}


def _global_sequence(layers: list[Layer], ranked: list[int], layer_cost: dict[str, float], min_channels: int,
                     total: float, up_to: float, bundle: Callable[[int, set[int]], list[int]]
                     ) -> tuple[list[list[int]], list[float]]:
    """The bundles of the classes of ``ranked`` (``bundle(root, taken)``: the classes that go with it around
    grouped convs, :class:`GroupStructures`; empty when one is taken) that fit one after the other
    (``min_channels``), until ``up_to`` of the cost is removed, and the cost removed after each prefix
    (``saved[k]`` for the first ``k`` bundles)."""
    tally = Tally(layers, min_channels)
    sequence, saved, taken = [], [0.0], set()
    for root in ranked:
        if saved[-1] >= up_to * total:
            break
        members = bundle(root, taken)
        if members and tally.fits(members, None):
            sequence.append(members)
            taken.update(members)
            tally.add(members)
            saved.append(total - tally.remaining_cost(layer_cost))
    return sequence, saved


def _rounded_prefix(sequence: list[list[int]], saved: list[float], goal: float, rounded: Callable[[set[int]], set[int]],
                    saved_by: Callable[[set[int]], float]) -> tuple[int, float]:
    """The prefix length ``k`` of ``sequence`` whose choice, once ``rounded``, removes the cost closest to
    ``goal`` (``saved_by``): a bisection for the shortest prefix reaching it (the rounded cost grows with
    ``k``, though not strictly: every probe is a candidate). Returns ``(k, cost removed)``."""
    probes: dict[int, float] = {}

    def probe(k: int) -> float:
        if k not in probes:
            probes[k] = saved_by(rounded(_union(sequence[:k])))
        return probes[k]

    low, high = 0, len(sequence)
    if probe(high) >= goal:
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if probe(middle) >= goal else (middle, high)
        probe(low)
    best = min(probes, key=lambda k: (abs(probes[k] - goal), k))
    return best, probes[best]


def _class_costs(layers: list[Layer], layer_cost: dict[str, float]) -> dict[int, float]:
    """Per class: the cost its deletion saves in the layers that create or read it (first-order estimate):
    per layer ``u_out * cost / n_out + u_in * cost / n_in`` (a residual class is both), the larger of the
    two for a depthwise layer, whose unit is one group's input and outputs."""
    result: dict[int, float] = {}
    for layer in layers:
        total = layer_cost.get(layer.name, 0.0)
        saving = {root: count * total / layer.size for root, count in layer.units.items()}
        for root, count in layer.in_units.items():
            share = count * total / layer.in_size
            saving[root] = max(saving.get(root, 0.0), share) if layer.depthwise else saving.get(root, 0.0) + share
        for root, value in saving.items():
            result[root] = result.get(root, 0.0) + value
    return result


def _layer_costs(analysis: ChannelAnalysis, cost: Cost, notes: list[str]) -> dict[str, float]:
    """MACs (per sample, static shapes) or params of every layer, keyed by its output tensor."""
    index = analysis.index
    if cost == "macs":
        _, complete, per_node = count_macs(index.model, index.shapes, analysis.rules)
        if complete:
            return {name: float(per_node.get(index.node_name(node), 0)) for name, node in analysis.creators.items()}
        notes.append("MACs are unknown for some layers (dynamic shapes; see --input-shape): ranked by params")
    result = {}
    for name, node in analysis.creators.items():
        result[name] = float(analysis.rule_for(node).params(node, index))
    return result


def _output_bound(analysis: ChannelAnalysis, roots: np.ndarray) -> set[int]:
    """Classes out of reach by definition: those of graph outputs, and those a barrier reads whose outputs
    are all graph outputs (a classifier's Softmax over its classes)."""
    index = analysis.index
    names = [name for name in index.outputs if name in analysis.info]
    for node, _ in analysis.barriers:
        if all(not name or name in index.outputs for name in node.output):
            names.extend(name for name in node.input if analysis.feature(name) is not None)
    return {int(r) for name in names for r in roots[analysis.info[name].ids]}


def _unreachable_budgets(analysis, roots, layers, locked, chosen, ratio) -> list[str]:
    """A note per layer whose budget cannot be met because a barrier holds too many of its channels."""
    reasons = analysis.kept_reason(BARRIER)
    outputs = _output_bound(analysis, roots)
    notes = []
    for layer in layers:
        held = [r for r in layer.units if locked[r]]
        held_channels = sum(layer.units[r] for r in held)
        target = int(ratio * layer.size)
        if not held or layer.size - held_channels >= target or all(r in outputs for r in held):
            continue
        removed = sum(n for r, n in layer.units.items() if r in chosen)
        why = analysis.reasons[reasons[held[0]]].text if reasons[held[0]] >= 0 else "a barrier"
        if why.startswith("graph output"):
            continue  # the model's outputs are out of reach by definition: not worth a note
        notes.append(f"'{layer.node}': {held_channels} of {layer.size} channels are out of reach ({why}); "
                     f"{removed} removed instead of {target}")
    return notes
