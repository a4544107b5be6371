"""Targets instead of ratios: ``prune --target-macs F`` and ``--target-latency F``.

The result keeps a fraction ``F`` of the input's MACs (per sample, :func:`onnxslim.graph.stats.model_stats`)
or of its *measured* onnxruntime latency (``1 / speedup``, the median per-round ratio of a quick
interleaved A/B, :func:`onnxslim.validate.speedcheck.verify_speed`). Two allocations:

* ``greedy`` (default): channels are allocated per layer by the NetAdapt/HALP greedy of
  :mod:`onnxslim.graph.greedy` on each layer's cost — its MACs (exact), or its latency looked up in the
  per-machine table of :mod:`onnxslim.validate.latency_table` (measured once, cached). The greedy's
  trace is cut where the estimate reaches an internal target, the cut is pruned
  (:func:`onnxslim.graph.prune.prune_selection`: coupling settled, kept counts rounded), and the result
  measured: MACs counted, latency by the quick A/B. The internal target is then corrected by
  ``estimate * F / achieved`` (what the table misses — fused activations, reorders, the executor — is
  close to proportional), at most ``max_steps`` prunes, until ``|achieved - F| <= tolerance * F``; the
  closest result is returned. Every correction is a new cut of the same trace.
* ``uniform``: one prune ratio for every layer, with the caller's criterion and scope; the value ``v(r)``
  falls as ``r`` grows, so ``r`` is found by bisection on ``[0, r_max]``, started at ``1 - sqrt(F)`` (a
  conv keeping ``(1 - r)`` of its inputs and of its outputs keeps ``(1 - r)^2`` of its MACs), each
  probe a whole-model measurement.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any, Literal

from onnxslim.errors import OnnxSlimError

Metric = Literal["macs", "latency"]
Allocation = Literal["greedy", "uniform"]
ALLOCATIONS = ("greedy", "uniform")


@dataclasses.dataclass(frozen=True)
class TargetStep:
    """One prune of the search: ``ratio`` (uniform: the prune ratio; greedy: the internal target the
    greedy's estimate was cut at) and the kept fraction it gave."""

    ratio: float
    value: float


@dataclasses.dataclass(frozen=True)
class TargetResult:
    """The chosen candidate, the target and every step of the search; ``details``: the greedy's latency
    table (path, points measured and cached), its estimate and the kept channels per layer."""

    metric: str
    target: float
    achieved: float
    ratio: float
    steps: tuple[TargetStep, ...]
    allocation: str = "uniform"
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def note(self) -> str:
        what = "MACs" if self.metric == "macs" else "measured latency (quick A/B)"
        error = (self.achieved - self.target) / self.target
        how = (f"at ratio {self.ratio:.3f}" if self.allocation == "uniform"
               else f"by the greedy per-layer allocation (estimate cut at {self.ratio:.3f})")
        note = (f"target {self.metric}: keep {self.target:.3f} of the input's {what}; achieved {self.achieved:.3f} "
                f"({error:+.1%}) {how} after {len(self.steps)} prune(s)")
        if error > 0.1 and self.metric == "macs":
            note += (": out of reach, the model cannot lose more MACs than this (layers at --min-channels or "
                     "--max-layer-ratio, channels held by barriers, layers no ratio prunes such as the stem's input)")
        elif error < -0.1 and self.metric == "macs":  # MACs are exact: the steps between cuts are too coarse
            note += (": more MACs removed than asked, the channels go in coarse steps (kept counts rounded to "
                     "multiples, coupled groups); --round-to 1 gives finer ones")
        elif abs(error) > 0.1:
            note += ": not within 10 % (each step is a noisy quick A/B; the steps are in the JSON's target field)"
        return note

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def search_ratio(evaluate: Callable[[float], tuple[float, Any]], target: float, *, tolerance: float = 0.03,
                 max_steps: int = 8, max_ratio: float = 0.95) -> tuple[TargetResult, Any]:
    """Bisection for the ratio whose ``evaluate(r) -> (kept fraction, payload)`` is ``target``.

    Returns the closest step (as a :class:`TargetResult` with metric left empty) and its payload.
    Raises :class:`OnnxSlimError` for a target outside (0, 1].
    """
    _check_target(target)
    low, high = 0.0, max_ratio
    ratio = min(max(1.0 - math.sqrt(target), 0.0), max_ratio)
    steps, best, best_payload = [], None, None
    for _ in range(max_steps):
        value, payload = evaluate(ratio)
        steps.append(TargetStep(ratio, value))
        if best is None or abs(value - target) < abs(best.value - target):
            best, best_payload = steps[-1], payload
        if abs(value - target) <= tolerance * target:
            break
        low, high = (ratio, high) if value > target else (low, ratio)
        if high - low < 1e-3:
            break
        ratio = (low + high) / 2
    result = TargetResult("", target, best.value, best.ratio, tuple(steps))
    return result, best_payload


def correct_target(estimate_of: Callable[[float], float], evaluate: Callable[[float], tuple[float, Any]],
                   target: float, *, tolerance: float, max_steps: int) -> tuple[TargetResult, Any]:
    """The greedy's correction loop. ``estimate_of(t)``: the estimate of the cut at internal target ``t``
    (cheap); ``evaluate(t) -> (achieved, payload)`` prunes and measures it. The first ``t`` is the target;
    the next (:func:`next_internal`) interpolates between the closest cuts measured below and above the
    target, or scales the last estimate by ``target / achieved`` (by 2/3 to 3/2 at most: one noisy
    measurement moves it little) — until the achieved value is within ``tolerance * target``, a cut
    repeats, or ``max_steps`` prunes. Returns the closest step and its payload. Raises
    :class:`OnnxSlimError` for a target outside (0, 1]."""
    _check_target(target)
    internal, steps, best, best_payload = target, [], None, None
    measured: dict[float, float] = {}  # estimate -> achieved
    while len(steps) < max(max_steps, 1):
        estimate = estimate_of(internal)
        if estimate in measured:
            break
        achieved, payload = evaluate(internal)
        measured[estimate] = achieved
        steps.append(TargetStep(internal, achieved))
        if best is None or abs(achieved - target) < abs(best.value - target):
            best, best_payload = steps[-1], payload
        if abs(achieved - target) <= tolerance * target or achieved <= 0:
            break
        internal = next_internal(measured, estimate, target)
    return TargetResult("", target, best.value, best.ratio, tuple(steps), "greedy"), best_payload


def next_internal(measured: dict[float, float], last: float, target: float) -> float:
    """The next internal target from the cuts measured so far (``estimate -> achieved``, assumed to rise
    together): linear between the closest pair around ``target``, else ``last`` scaled; in [0.01, 1]."""
    below = [(e, a) for e, a in measured.items() if a < target]
    above = [(e, a) for e, a in measured.items() if a >= target]
    if below and above:
        (e0, a0), (e1, a1) = max(below), min(above)
        internal = e0 + (e1 - e0) * (target - a0) / (a1 - a0) if a1 != a0 else (e0 + e1) / 2
    else:
        internal = last * min(max(target / measured[last], 2 / 3), 3 / 2)
    return min(max(internal, 0.01), 1.0)


def _check_target(target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise OnnxSlimError(f"a target is a fraction of the input in (0, 1], got {target}")


def prune_to_target(model: Any, metric: Metric, target: float, *, allocation: Allocation = "greedy", rounds: int = 20,
                    threads: int = 1, tolerance: float | None = None, max_steps: int | None = None,
                    max_layer_ratio: float = 0.8, cache_dir: str | os.PathLike | None = None, measure: Callable | None = None,
                    progress: bool = False, **prune_options: Any):
    """:func:`onnxslim.graph.prune.prune` meeting ``target`` for ``metric`` (see the module docstring).

    Returns ``(slimmed, report, masked, TargetResult)``. ``prune_options`` are ``prune``'s (except
    ``ratio`` and the output paths, which the caller writes itself); the greedy uses its criterion,
    min_channels, placement, seed, rounding, shapes and rules. ``rounds``/``threads``: the quick A/B
    of the latency metric; ``max_layer_ratio``: the most of its output channels the greedy takes from
    any layer; ``cache_dir``/``measure``/``progress``: the latency table's
    (:class:`onnxslim.validate.latency_table.LatencyTable`). Raises :class:`OnnxSlimError` for a bad
    metric, allocation or target.
    """
    if metric not in ("macs", "latency"):
        raise OnnxSlimError(f"metric must be 'macs' or 'latency', got {metric!r}")
    if allocation not in ALLOCATIONS:
        raise OnnxSlimError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    _check_target(target)
    if not 0.0 < max_layer_ratio <= 1.0:
        raise OnnxSlimError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio}")
    tolerance = tolerance if tolerance is not None else 0.02 if metric == "macs" else 0.05
    measured = _measurer(model, metric, rounds, threads, prune_options.get("input_shapes"))
    if allocation == "uniform":
        result, payload = _uniform(model, measured, target, tolerance, max_steps or 8, prune_options)
    else:
        from onnxslim.graph.allocate_greedy import GreedyRequest, prune_greedy

        request = GreedyRequest(metric, max_layer_ratio, threads, cache_dir, measure, progress)
        result, payload = prune_greedy(model, measured, target, request, tolerance, max_steps or 4, prune_options)
    slimmed, report, masked = payload
    result = dataclasses.replace(result, metric=metric)
    report.notes.append(result.note())
    report.target = result.to_dict()
    return slimmed, report, masked, result


def _measurer(model: Any, metric: Metric, rounds: int, threads: int, shapes) -> Callable[[Any, Any], float]:
    """``f(slimmed, report) -> kept fraction``: MACs counted, or latency by the quick A/B.

    Raises OnnxSlimError for the MACs of a model some of whose layers' shapes are not static (a partial
    count is no fraction of the model's MACs): ``--input-shape`` makes them static.
    """
    from onnxslim.validate.speedcheck import verify_speed

    def kept(slimmed, report) -> float:
        if metric == "macs":
            if not report.macs_complete:
                raise OnnxSlimError("--target-macs needs every layer's MACs, but some layers' shapes are not "
                                    "static: give --input-shape (input_shapes= in Python)")
            return report.macs_after / report.macs_before if report.macs_before else 1.0
        check = verify_speed(model, slimmed, report.macs_before, report.macs_after, rounds=rounds,
                             threads=threads, input_shapes=shapes)
        return 1.0 / check.speedup

    return kept


def _uniform(model, measured, target, tolerance, max_steps, prune_options):
    from onnxslim.graph.prune import prune

    def evaluate(ratio: float):
        slimmed, report, masked = prune(model, None, ratio=ratio, **prune_options)
        return measured(slimmed, report), (slimmed, report, masked)

    return search_ratio(evaluate, target, max_steps=max_steps, tolerance=tolerance)

