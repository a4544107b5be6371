"""Targets instead of ratios: ``prune --target-macs F`` and ``--target-latency F``.

The pruning amount is searched so that the result keeps a fraction ``F`` of the input's MACs (per
sample, :func:`onnxslim.graph.stats.model_stats`) or of its *measured* onnxruntime latency (the
median per-round ratio of a quick interleaved A/B, :func:`onnxslim.validate.bench.benchmark`).

Search: the value ``v(r)`` (kept MACs or latency fraction) of :func:`onnxslim.graph.prune.prune` at
ratio ``r`` falls as ``r`` grows, so ``r`` is found by bisection on ``[0, r_max]``, started at
``1 - sqrt(F)`` (a conv keeping ``(1 - r)`` of its inputs and of its outputs keeps ``(1 - r)^2`` of its
MACs), until ``|v - F| <= tolerance * F`` or ``max_steps`` prunes; the closest result is returned with
every step. Every candidate is pruned with the caller's options (criterion, scope, rounding), so the
per-layer allocation is the criterion's; the target only sets the amount.

Not (yet) the NetAdapt/HALP per-layer greedy allocation on per-layer latency tables: the latency
target is met by measuring whole candidates, which also counts what a per-layer table misses
(layout reorders, fused activations, the executor's overhead).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

from onnxslim.errors import OnnxSlimError

Metric = Literal["macs", "latency"]


@dataclasses.dataclass(frozen=True)
class TargetStep:
    """One candidate of the search: the ratio tried and the kept fraction it gave."""

    ratio: float
    value: float


@dataclasses.dataclass(frozen=True)
class TargetResult:
    """The chosen candidate, the target and every step of the search."""

    metric: str
    target: float
    achieved: float
    ratio: float
    steps: tuple[TargetStep, ...]

    def note(self) -> str:
        what = "MACs" if self.metric == "macs" else "measured latency (quick A/B)"
        error = (self.achieved - self.target) / self.target
        return (f"target {self.metric}: keep {self.target:.3f} of the input's {what}; achieved {self.achieved:.3f} "
                f"({error:+.1%}) at ratio {self.ratio:.3f} after {len(self.steps)} prune(s)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def search_ratio(evaluate: Callable[[float], tuple[float, Any]], target: float, *, tolerance: float = 0.03,
                 max_steps: int = 8, max_ratio: float = 0.95) -> tuple[TargetResult, Any]:
    """Bisection for the ratio whose ``evaluate(r) -> (kept fraction, payload)`` is ``target``.

    Returns the closest step (as a :class:`TargetResult` with metric left empty) and its payload.
    Raises :class:`OnnxSlimError` for a target outside (0, 1].
    """
    if not 0.0 < target <= 1.0:
        raise OnnxSlimError(f"a target is a fraction of the input in (0, 1], got {target}")
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


def prune_to_target(model: Any, metric: Metric, target: float, *, rounds: int = 20, threads: int = 1,
                    tolerance: float | None = None, max_steps: int = 8, **prune_options: Any):
    """:func:`onnxslim.graph.prune.prune` at the ratio that meets ``target`` for ``metric``.

    Returns ``(slimmed, report, masked, TargetResult)``; ``prune_options`` go to ``prune`` unchanged
    (except ``ratio`` and ``output_path``/``masked_path``, which the caller writes itself).
    """
    from onnxslim.graph.prune import prune
    from onnxslim.validate.speedcheck import verify_speed

    if metric not in ("macs", "latency"):
        raise OnnxSlimError(f"metric must be 'macs' or 'latency', got {metric!r}")
    shapes = prune_options.get("input_shapes")

    def evaluate(ratio: float):
        slimmed, report, masked = prune(model, None, ratio=ratio, **prune_options)
        if metric == "macs":
            return report.macs_after / report.macs_before, (slimmed, report, masked)
        check = verify_speed(model, slimmed, report.macs_before, report.macs_after, rounds=rounds,
                             threads=threads, input_shapes=shapes)
        return 1.0 / check.speedup, (slimmed, report, masked)

    default_tolerance = 0.02 if metric == "macs" else 0.05
    result, (slimmed, report, masked) = search_ratio(evaluate, target, max_steps=max_steps,
                                                     tolerance=tolerance if tolerance is not None else default_tolerance)
    result = dataclasses.replace(result, metric=metric)
    report.notes.append(result.note())
    report.target = result.to_dict()
    return slimmed, report, masked, result
