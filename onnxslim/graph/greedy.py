"""Greedy per-layer allocation: which channel classes to remove to reach a cost target.

NetAdapt (Yang et al., ECCV 2018, Algorithm 1) and HALP (Shen et al., NeurIPS 2022, sec. 3): from the
full network, repeatedly remove the block of channels that loses the least importance per unit of cost
saved, the cost being each layer's measured latency (a lookup table,
:mod:`onnxslim.validate.latency_table`) or its MACs.

* Candidates: per layer (Conv, ConvTranspose, Gemm, MatMul creating channels), its ``block`` lowest-
  importance free classes — ``block`` = the rounding multiple times ``max(1, n // (32 * multiple))`` for
  ``n`` output channels, so a layer is thinned in about 32 steps at most. Classes are coupled as in
  :mod:`onnxslim.graph.selection`: a class goes from every layer it belongs to (residual groups), a
  grouped conv's classes go in bundles that keep its groups equal (``GroupStructures``), classes held
  by a barrier are never chosen, and no layer output nor input keeps fewer than ``min_channels``
  (``Tally``); no layer output loses more than ``max_layer_ratio`` of its channels (Torch-Pruning's
  ``max_pruning_ratio``: with flat importance — random or barely trained weights — the greedy would
  otherwise thin the layers that are cheapest to cut down to a handful of channels).
* Importance of a class: the sum over the layers creating it of its channel score divided by that
  layer's mean score (:func:`onnxslim.graph.selection.class_scores`).
* Cost saved by a candidate: ``sum over the layers it touches of cost(before) - cost(after)``, a layer's
  cost being ``cost(layer, removed inputs, removed outputs)``; the total is ``rest`` (what no layer
  choice changes) plus every layer's cost.
* The step taken is the candidate with the smallest ``importance lost / cost saved`` (candidates saving
  nothing go last); only candidates touching the layers of the last step are recomputed.

The trace records the total cost after every step, down to ``floor`` of the full cost, so any target is
a prefix of one trace (:meth:`GreedyTrace.cut`): correcting the target costs no new search.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import numpy as np

from onnxslim.graph.analysis import ChannelAnalysis
from onnxslim.graph.bundles import GroupStructures
from onnxslim.graph.selection import Layer, Tally, class_scores, layers_of
from onnxslim.graph.values import BARRIER


class LayerCost(Protocol):
    """Cost (ms, MACs ...) of ``layer`` with ``removed_in`` of its input channels and ``removed_out`` of
    its output channels removed (counts in the analysis' channel elements)."""

    def __call__(self, layer: Layer, removed_in: int, removed_out: int) -> float: ...


@dataclasses.dataclass(frozen=True)
class GreedyStep:
    """One step: the classes removed (their roots), the layer whose block they were, the total after."""

    roots: tuple[int, ...]
    layer: str
    total: float


@dataclasses.dataclass(frozen=True)
class GreedyTrace:
    """The full cost, every step of the greedy, and the layers (for kept counts)."""

    full: float
    steps: tuple[GreedyStep, ...]
    layers: tuple[Layer, ...]

    def cut(self, fraction: float) -> tuple[set[int], float]:
        """The classes of the prefix whose total is closest to ``fraction`` of the full cost (of the two
        around the first step reaching it; all steps when none does), and its estimated fraction."""
        goal = fraction * self.full
        totals = [self.full, *(step.total for step in self.steps)]
        end = next((k for k, total in enumerate(totals) if total <= goal), len(totals) - 1)
        if end > 0 and goal - totals[end] > totals[end - 1] - goal:
            end -= 1
        chosen = {root for step in self.steps[:end] for root in step.roots}
        return chosen, totals[end] / self.full if self.full else 1.0


@dataclasses.dataclass(frozen=True)
class _Candidate:
    roots: tuple[int, ...]
    lost: float  # importance
    saved: float  # cost
    touched: frozenset[str]  # layers whose input or output it changes

    def rank(self) -> tuple[bool, float]:
        return (self.saved <= 0, self.lost / self.saved if self.saved > 0 else self.lost)


class _State:
    """The greedy's running state: chosen classes, the tally of removed channels, each layer's cost."""

    def __init__(self, analysis: ChannelAnalysis, layers: list[Layer], importance: dict[int, float],
                 cost: LayerCost, min_channels: int, max_layer_ratio: float):
        self.layers = {layer.name: layer for layer in layers}
        self.importance = importance
        self.cost = cost
        self.tally = Tally(layers, min_channels)
        self.groups = GroupStructures(analysis)
        self.locked = analysis.kept_by(BARRIER)
        self.chosen: set[int] = set()
        self.dead: set[int] = set()  # classes that can never go (min_channels of some layer)
        self.least_out = {layer.name: max(min_channels, math.ceil(layer.size * (1 - max_layer_ratio) - 1e-9))
                          for layer in layers}
        self.layer_cost = {layer.name: cost(layer, 0, 0) for layer in layers}
        self.order = {layer.name: sorted((r for r in layer.units if not self.locked[r]),
                                         key=lambda r: -importance.get(r, 0.0)) for layer in layers}

    def free(self, root: int) -> bool:
        return not self.locked[root] and root not in self.chosen and root not in self.dead

    def candidate(self, layer: Layer, block: int) -> _Candidate | None:
        """The layer's next ``block`` channels of lowest-importance free classes that fit together."""
        roots: list[int] = []
        out: dict[str, int] = {}
        into: dict[str, int] = {}
        order = self.order[layer.name]
        while order and not self.free(order[-1]):  # order is reversed: the least important last
            order.pop()  # chosen and dead classes stay so: drop them for good
        for root in reversed(order):
            if out.get(layer.name, 0) >= block:
                break
            if not self.free(root) or root in roots:
                continue
            bundle = self.groups.bundle(root, self.free, self.importance)
            if not bundle or any(r in roots for r in bundle):
                continue
            bundle_out, bundle_in = self.tally.counts(bundle)
            if self._fits(bundle_out, bundle_in, out, into):
                roots += bundle
                for counts, extra in ((out, bundle_out), (into, bundle_in)):
                    for name, n in extra.items():
                        counts[name] = counts.get(name, 0) + n
            elif not self._fits(bundle_out, bundle_in, {}, {}):
                self.dead.add(root)  # removals only grow: it will never fit
            else:
                break
        if not roots:
            return None
        touched = frozenset(out) | frozenset(into)
        saved = sum(self.layer_cost[name] - self._cost_after(name, out, into) for name in touched)
        return _Candidate(tuple(roots), sum(self.importance.get(r, 0.0) for r in roots), saved, touched)

    def _fits(self, bundle_out: dict[str, int], bundle_in: dict[str, int], out: dict[str, int],
              into: dict[str, int]) -> bool:
        """``Tally.fits`` for a bundle on top of ``out``/``into`` already taken: every layer output and
        input it touches keeps ``min_channels`` (outputs: their ``max_layer_ratio`` share too)."""
        least, tally = self.tally.min_channels, self.tally
        return all(self.layers[name].size - tally.removed[name] - out.get(name, 0) - n >= self.least_out[name]
                   for name, n in bundle_out.items()) and \
            all(self.layers[name].in_size - tally.removed_in[name] - into.get(name, 0) - n >= least
                for name, n in bundle_in.items())

    def _cost_after(self, name: str, out: dict[str, int], into: dict[str, int]) -> float:
        return self.cost(self.layers[name], self.tally.removed_in[name] + into.get(name, 0),
                         self.tally.removed[name] + out.get(name, 0))

    def take(self, candidate: _Candidate) -> None:
        self.chosen.update(candidate.roots)
        self.tally.add(candidate.roots)
        for name in candidate.touched:
            self.layer_cost[name] = self.cost(self.layers[name], self.tally.removed_in[name], self.tally.removed[name])


def block_size(channels: int, multiple: int, steps_per_layer: int = 32) -> int:
    """Channels a layer loses per step: the multiple, times ``max(1, channels // (steps * multiple))``."""
    multiple = max(multiple, 1)
    return multiple * max(1, channels // (steps_per_layer * multiple))


def greedy_trace(analysis: ChannelAnalysis, scores: dict[str, np.ndarray], cost: LayerCost, *,
                 min_channels: int = 1, max_layer_ratio: float = 1.0, multiple: int = 1, rest: float = 0.0,
                 floor: float = 0.05, steps_per_layer: int = 32) -> GreedyTrace:
    """Run the greedy (see the module docstring) until the total is at most ``floor`` of the full cost
    or nothing can go. ``scores`` maps a layer's output tensor to one score per output channel."""
    roots = analysis.uf.roots()
    layers = layers_of(analysis, roots, scores)
    state = _State(analysis, layers, class_scores(analysis, roots, scores, True), cost, min_channels,
                   max_layer_ratio)
    full = rest + sum(state.layer_cost.values())
    total, steps = full, []
    candidates: dict[str, _Candidate | None] = {}
    while total > floor * full:
        for layer in layers:
            if layer.name not in candidates:
                candidates[layer.name] = state.candidate(layer, block_size(layer.size, multiple, steps_per_layer))
        found = [c for c in candidates.values() if c is not None]
        if not found:
            break
        best = min(found, key=_Candidate.rank)
        state.take(best)
        total = rest + sum(state.layer_cost.values())
        owner = next(name for name, c in candidates.items() if c is best)
        steps.append(GreedyStep(best.roots, owner, total))
        candidates = {name: c for name, c in candidates.items()
                      if c is not None and not (c.touched & best.touched) and name != owner}
    return GreedyTrace(full, tuple(steps), tuple(layers))


def kept_counts(trace: GreedyTrace, analysis: ChannelAnalysis, chosen: set[int]) -> dict[str, tuple[int, int]]:
    """Per layer node name: (kept output channels, output channels) for the classes ``chosen``."""
    roots = analysis.uf.roots()
    result = {}
    for layer in trace.layers:
        removed = int(np.isin(roots[analysis.info[layer.name].ids], list(chosen)).sum()) if chosen else 0
        result[layer.node] = (layer.size - removed, layer.size)
    return result


def macs_cost(analysis: ChannelAnalysis, layer_macs: dict[str, float]) -> LayerCost:
    """The MACs of a layer keeping a fraction ``(1 - a)`` of its outputs and ``(1 - b)`` of its inputs:
    ``macs * (1 - a) * (1 - b)``, or ``macs * (1 - max(a, b))`` for a depthwise layer
    (:meth:`Layer.kept_fraction`, the formula of ``Tally.remaining_cost``). ``layer_macs`` is keyed by output tensor."""

    def cost(layer: Layer, removed_in: int, removed_out: int) -> float:
        return layer_macs.get(layer.name, 0.0) * layer.kept_fraction(removed_in, removed_out)

    return cost

