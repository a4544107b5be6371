"""Never silently slower: a quick A/B after ``slim``/``prune``, and ``--ensure-faster``.

* :func:`verify_speed` — a few interleaved rounds of the input model against the result
  (:func:`onnxslim.validate.bench.benchmark`: random order per round, fresh sessions per block; 1 thread
  by default). When the result has fewer MACs but its median per-round speedup is not above 1, the
  returned note is a warning that names the fix; when it is faster but clearly short of its MACs ratio
  (the CI's upper end below 0.8 of it), the note says why and how to plan on time instead.
* :func:`ensure_faster` — builds the result with several channel roundings (``round_to`` 1, the NCHWc
  block ``b`` and ``2b``; every variant is exact for its own masks), times them all against the input
  in one interleaved benchmark, and keeps the one with the largest median speedup.

Few rounds on a shared machine give wide intervals: the verdict is a warning to look closer (with
``onnxslim bench --per-layer``), not a measurement to quote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from onnxslim.errors import OnnxSlimError
from onnxslim.validate.bench import BenchOptions, Comparison, benchmark

# Below this fraction of the MACs ratio a speedup is worth explaining: the bench of docs/latency.md has
# ResNet-50 / VGG-16 at 0.90-1.00 and the depthwise nets pruned hard at 0.49-0.68.
SHORT_OF_MACS = 0.8


@dataclasses.dataclass(frozen=True)
class SpeedCheck:
    """The quick A/B: ``speedup`` = median over rounds of t_input / t_result, with its CI."""

    speedup: float
    ci_low: float
    ci_high: float
    rounds: int
    threads: int
    macs_ratio: float  # MACs input / MACs result

    @property
    def slower(self) -> bool:
        """Not faster although it has fewer MACs."""
        return self.macs_ratio > 1.0 and self.speedup <= 1.0

    @property
    def short_of_macs(self) -> bool:
        """Faster, but even the CI's upper end is below ``SHORT_OF_MACS`` of the MACs ratio."""
        return not self.slower and self.macs_ratio > 1.0 and self.ci_high < SHORT_OF_MACS * self.macs_ratio

    def note(self, planned_on_time: bool = False) -> str:
        """One line for the report; ``planned_on_time``: the result already came from a latency target, so
        a speedup short of the MACs ratio needs no advice to plan on time."""
        figures = (f"{self.speedup:.2f}x (95 % CI {self.ci_low:.2f}-{self.ci_high:.2f}, {self.rounds} quick A/B rounds, "
                   f"{self.threads} thread(s))")
        if self.short_of_macs:
            return (f"speed check: {figures} faster than the input, {self.speedup / self.macs_ratio:.0%} of its MACs "
                    f"ratio {self.macs_ratio:.2f}: the layers that keep most of their MACs (depthwise convs, the "
                    "stem, element-wise ops) are the slow ones per MAC (docs/latency.md)"
                    + ("" if planned_on_time else ". To plan on time instead of MACs: --target-latency F; "
                       "`onnxslim bench --per-layer IN OUT` shows where the time goes"))
        if not self.slower:
            return f"speed check: {figures} faster than the input; MACs ratio {self.macs_ratio:.2f}"
        return (f"WARNING: the result is not faster than its input: {figures}, although it has "
                f"{1 - 1 / self.macs_ratio:.0%} fewer MACs. Fix: --ensure-faster (tries round-to 1, the NCHWc "
                "block and twice it, keeps the fastest), or a --round-to N; `onnxslim bench --per-layer IN OUT` "
                "shows which layers got slower")


def _compare(models: Sequence[Any], names: Sequence[str], rounds: int, threads: int,
             input_shapes: Mapping[str, Sequence[int]] | None) -> tuple[Comparison, ...]:
    options = BenchOptions(threads=(threads,), warmup=3, repeat=rounds, session_repeats=min(3, rounds),
                           measure_memory=False, input_shapes=dict(input_shapes or {}))
    return benchmark(list(models), options, progress=False, names=list(names)).comparisons


def verify_speed(source: Any, result: Any, macs_before: int, macs_after: int, *, rounds: int = 15,
                 threads: int = 1, input_shapes: Mapping[str, Sequence[int]] | None = None) -> SpeedCheck:
    """Quick A/B of ``source`` (path or ModelProto) against ``result``; raises OnnxSlimError when
    onnxruntime cannot run them (e.g. dynamic dims without ``input_shapes``)."""
    (comparison,) = _compare([source, result], ["input", "result"], rounds, threads, input_shapes)
    return SpeedCheck(comparison.speedup, comparison.ci_low, comparison.ci_high, rounds, threads,
                      macs_before / macs_after if macs_after else 1.0)


def ensure_faster(source: Any, build: Callable[[int], tuple], multiples: Sequence[int], *,
                  rounds: int = 20, threads: int = 1, input_shapes: Mapping[str, Sequence[int]] | None = None,
                  ) -> tuple[tuple, int, list[tuple[int, float]]]:
    """Build one result per ``round_to`` in ``multiples`` (``build(m)`` returns a tuple whose first item
    is the model), time the models against ``source``, keep the fastest:
    ``(that build's tuple, chosen multiple, [(multiple, median speedup)])``."""
    multiples = list(dict.fromkeys(multiples))
    if not multiples:
        raise OnnxSlimError("ensure_faster needs at least one rounding to try")
    built = [build(m) for m in multiples]
    comparisons = _compare([source, *(result[0] for result in built)],
                           ["input", *(f"round_to={m}" for m in multiples)], rounds, threads, input_shapes)
    speedups = [(m, c.speedup) for m, c in zip(multiples, comparisons)]
    best = max(range(len(multiples)), key=lambda i: comparisons[i].speedup)
    return built[best], multiples[best], speedups
