"""Latency benchmark of one or more models with onnxruntime, built to compare models on a noisy machine.

Procedure, for every configuration (thread count x batch size):

1. Session creation time: every model's session is created ``session_repeats`` times, in a random
   order each time, and the median is reported (the first creation in a process also pays for
   onnxruntime's environment set-up; the median keeps that out). The timed rounds are split into
   ``session_repeats`` blocks, each run with that creation's fresh sessions: a session's memory
   placement can make it a steady ~1 % faster or slower than an identical one, and fresh sessions
   per block keep one placement from deciding the comparison.
2. Warm-up: ``warmup`` runs per model, interleaved, at the start of every block.
3. Timed rounds: ``repeat`` rounds; each round times one ``session.run`` per model, in an order
   drawn at random for every round (seeded by ``order_seed``; the orders are recorded in the JSON), so
   slow drift (thermal, other processes) hits every model alike and no model holds a fixed position.
   A fixed A B C / C B A alternation is biased: the model at the turn runs twice in a row with warm
   caches and "wins" by a few per cent even against a byte-identical copy of itself. Right before its
   timed run, each model runs ``round_warmup`` times untimed (default 1), so every timed run finds the
   model's own weights and buffers in the caches, as when a deployed model runs frame after frame. With
   ``round_warmup=0`` every timed run follows the other models' runs instead, which is biased against
   the smaller model: a slimmed model whose weights would stay in cache is timed after the dense model
   has evicted them (measured: docs/latency.md, "Warm rounds"). Garbage collection is paused while
   timing.
4. Per model: median, p90, p99, mean and standard deviation of the per-run latency (wall clock,
   ``time.perf_counter_ns``, including onnxruntime's output allocation).
5. A/B: for every model i > 0 and every round r, the ratio ``t_0[r] / t_i[r]`` (> 1: model i is
   faster than model 0). The reported speedup is the median of these per-round ratios, with a
   distribution-free confidence interval for that median from order statistics: with n ratios sorted,
   ``[x_(k), x_(n-k+1)]`` covers the true median with probability ``1 - 2 P(B <= k-1)``,
   ``B ~ Binomial(n, 1/2)``; k is the largest index reaching the requested confidence (the sign-test
   interval). Pairing by round cancels load that affects both models of the round.
6. Peak memory: measured in a fresh child process per model and configuration
   (:mod:`onnxslim.validate.memprobe`): the peak resident set size reached while creating the session
   and running it a few times, minus the resident set size just before. On Linux the kernel's
   high-water mark is reset at the baseline (``/proc/self/clear_refs``) and read back as VmHWM;
   elsewhere ``getrusage().ru_maxrss`` growth is used. It includes the weights onnxruntime holds,
   its memory arena and kernel work buffers, not the interpreter, numpy or the input arrays.
   Not available where ``resource`` is missing (Windows): reported as None.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim.errors import OnnxSlimError
from onnxslim.validate.runtime import (
    ModelSource,
    SessionOptions,
    TensorSpec,
    create_session,
    input_specs,
    model_name,
    model_size_bytes,
    random_feeds,
    resolve_providers,
    resolve_shapes,
)

MEMORY_METHOD = ("peak RSS while creating and running the session minus RSS just before, in a fresh child "
                 "process (Linux: VmHWM after resetting it via /proc/self/clear_refs; else ru_maxrss growth)")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What to measure. ``batch_sizes`` entries of None keep the model's (or ``input_shapes``') batch."""

    threads: tuple[int, ...] = (1,)
    batch_sizes: tuple[int | None, ...] = (None,)
    input_shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    opt_level: str = "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    warmup: int = 10
    repeat: int = 100
    session_repeats: int = 3
    measure_memory: bool = True
    confidence: float = 0.95
    seed: int = 0
    order_seed: int = 0
    round_warmup: int = 1

    def validate(self) -> None:
        if not self.threads or any(t < 0 for t in self.threads):
            raise OnnxSlimError(f"thread counts must be >= 0 (0 = onnxruntime's default), got {self.threads}")
        if not self.batch_sizes or any(b is not None and b < 1 for b in self.batch_sizes):
            raise OnnxSlimError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.warmup < 0 or self.repeat < 1 or self.session_repeats < 1 or self.round_warmup < 0:
            raise OnnxSlimError(f"need warmup >= 0, repeat >= 1, session_repeats >= 1 and round_warmup >= 0, "
                                f"got {self.warmup}, {self.repeat}, {self.session_repeats}, {self.round_warmup}")
        if not 0.0 < self.confidence < 1.0:
            raise OnnxSlimError(f"confidence must be in (0, 1), got {self.confidence}")


@dataclasses.dataclass(frozen=True)
class ModelTiming:
    """One model at one configuration; times in milliseconds."""

    name: str
    threads: int
    batch_size: int
    input_shapes: dict[str, list[int]]
    size_bytes: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    session_ms: float
    peak_memory_mb: float | None
    samples_ms: tuple[float, ...]

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return 1000.0 * self.batch_size / self.median_ms if self.median_ms > 0 else float("inf")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Paired A/B result: ``speedup`` = median over rounds of ``t_baseline / t_candidate``."""

    baseline: str
    candidate: str
    threads: int
    batch_size: int
    speedup: float
    ci_low: float
    ci_high: float
    confidence: float
    coverage: float
    rounds: int
    candidate_faster_fraction: float


@dataclasses.dataclass(frozen=True)
class ConfigResult:
    threads: int
    batch_size: int
    models: tuple[ModelTiming, ...]
    comparisons: tuple[Comparison, ...]
    orders: tuple[tuple[int, ...], ...] = ()  # per timed round: the model indices in the order they ran


@dataclasses.dataclass(frozen=True)
class BenchReport:
    options: BenchOptions
    configs: tuple[ConfigResult, ...]
    environment: dict[str, Any]
    memory_method: str = MEMORY_METHOD

    @property
    def models(self) -> tuple[ModelTiming, ...]:
        """Per-model results at the first configuration (first thread count and batch size)."""
        return self.configs[0].models

    @property
    def comparisons(self) -> tuple[Comparison, ...]:
        """A/B results (every model against the first) at the first configuration."""
        return self.configs[0].comparisons

    def to_dict(self, include_samples: bool = True) -> dict[str, Any]:
        def timing(t: ModelTiming) -> dict[str, Any]:
            data = dataclasses.asdict(t)
            data["throughput_per_s"] = t.throughput
            if not include_samples:
                data.pop("samples_ms")
            return data

        return {
            "options": {**dataclasses.asdict(self.options), "input_shapes": dict(self.options.input_shapes)},
            "environment": self.environment,
            "memory_method": self.memory_method,
            "configs": [{"threads": c.threads, "batch_size": c.batch_size,
                         "models": [timing(t) for t in c.models],
                         "comparisons": [dataclasses.asdict(x) for x in c.comparisons],
                         "round_orders": [list(o) for o in c.orders]} for c in self.configs],
        }

    def format_table(self) -> str:
        """Plain-text table: one row per model and configuration, then the A/B ratios."""
        header = ("threads", "batch", "model", "median ms", "p90 ms", "p99 ms", "mean ± std ms",
                  "session ms", "peak MB")
        rows = []
        for config in self.configs:
            for t in config.models:
                memory = f"{t.peak_memory_mb:.1f}" if t.peak_memory_mb is not None else "n/a"
                rows.append((str(t.threads), str(t.batch_size), t.name, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}",
                             f"{t.p99_ms:.3f}", f"{t.mean_ms:.3f} ± {t.std_ms:.3f}", f"{t.session_ms:.1f}", memory))
        lines = _text_table(header, rows)
        comparisons = [c for config in self.configs for c in config.comparisons]
        if comparisons:
            lines.append("")
            lines.append(f"A/B (speedup = median over rounds of t_{comparisons[0].baseline} / t_candidate, "
                         f"{comparisons[0].confidence:.0%} CI):")
            lines.extend(_text_table(
                ("threads", "batch", "candidate", "speedup", "CI", "rounds", "candidate faster"),
                [(str(c.threads), str(c.batch_size), c.candidate, f"{c.speedup:.3f}x",
                  f"[{c.ci_low:.3f}, {c.ci_high:.3f}]" + ("*" if c.coverage < c.confidence else ""),
                  str(c.rounds), f"{c.candidate_faster_fraction:.0%}")
                 for c in comparisons]))
            short = [c for c in comparisons if c.coverage < c.confidence]
            if short:
                lines.append(f"* too few rounds for a {short[0].confidence:.0%} interval: the full range, "
                             f"covering the median with probability {short[0].coverage:.1%}")
        if any(t.peak_memory_mb is not None for config in self.configs for t in config.models):
            lines.append("")
            lines.append(f"peak MB: {self.memory_method}")
        return "\n".join(lines)


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free CI of the median: ``(low, high, achieved_confidence)``; see the module docstring.

    With too few values for the requested confidence the full range is returned with its (lower)
    achieved confidence.
    """
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    total = 2 ** n
    cumulative = 0  # sum_{i < k} C(n, i): P(B <= k-1) * 2^n
    best_k, best_coverage = 1, 1.0 - 2.0 / total
    for k in range(1, (n + 1) // 2 + 1):
        cumulative += math.comb(n, k - 1)
        coverage = 1.0 - 2.0 * cumulative / total
        if coverage < confidence:
            break
        best_k, best_coverage = k, coverage
    return x[best_k - 1], x[n - best_k], best_coverage


def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "std_ms": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min_ms": float(a.min()),
    }


def benchmark(models: Sequence[ModelSource], options: BenchOptions = BenchOptions(),
              progress: bool = True, names: Sequence[str] | None = None) -> BenchReport:
    """Measure every model at every configuration of ``options``; see the module docstring."""
    from tqdm import tqdm

    if not models:
        raise OnnxSlimError("benchmark needs at least one model")
    options.validate()
    providers = resolve_providers(options.providers)
    labels = list(names) if names is not None else _unique_names(models)
    if len(labels) != len(models):
        raise OnnxSlimError(f"{len(labels)} names for {len(models)} models")
    sizes = [model_size_bytes(m) if not isinstance(m, onnx.ModelProto) else m.ByteSize() for m in models]
    configs = [(t, b) for t in options.threads for b in options.batch_sizes]
    total_runs = len(configs) * len(models) * (options.warmup + options.repeat)
    results = []
    with tqdm(total=total_runs, desc="bench", unit="run", disable=not progress, leave=False) as bar:
        for threads, batch_size in configs:
            session_options = SessionOptions(threads=threads, opt_level=options.opt_level, providers=providers)
            results.append(_measure_config(models, labels, sizes, session_options, batch_size, options, bar))
    import onnxruntime as ort

    environment = {
        "onnxruntime": ort.__version__,
        "providers": list(providers),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    return BenchReport(options, tuple(results), environment)


def _measure_config(models, labels, sizes, session_options: SessionOptions, batch_size: int | None,
                    options: BenchOptions, bar) -> ConfigResult:
    count = len(models)
    rng = np.random.default_rng([options.order_seed, session_options.threads, batch_size or 0])
    creation_ms: list[list[float]] = [[] for _ in models]
    samples = np.zeros((count, options.repeat), dtype=np.float64)
    orders = [tuple(rng.permutation(count).tolist()) for _ in range(options.repeat)]
    blocks = np.array_split(np.arange(options.repeat), min(options.session_repeats, options.repeat))
    feeds: list[dict] = []
    for block_index, block in enumerate(blocks):
        sessions = _create_sessions(models, session_options, rng.permutation(count).tolist(), creation_ms)
        if block_index == 0:
            feeds, shapes, all_specs = _feeds(sessions, labels, batch_size, options)
            for i, session in enumerate(sessions):
                _run(session, feeds[i], labels[i])  # one checked run, so a shape problem is reported clearly
        for _ in range(options.warmup):
            for i, session in enumerate(sessions):
                session.run(None, feeds[i])
            if block_index == 0:
                bar.update(count)
        _time_rounds(sessions, feeds, [orders[r] for r in block], samples[:, block[0]:block[-1] + 1],  # a view
                     options.round_warmup)
        bar.update(count * len(block))
        del sessions
    for _ in range(options.session_repeats - len(blocks)):  # more creations asked for than rounds
        _create_sessions(models, session_options, rng.permutation(count).tolist(), creation_ms)
    actual_batch = [next(iter(s.values()))[0] if s else 1 for s in shapes]

    timings = []
    for i in range(count):
        memory = (_peak_memory_mb(models[i], session_options, all_specs[i], shapes[i], options)
                  if options.measure_memory else None)
        stats = latency_stats(samples[i])
        timings.append(ModelTiming(
            name=labels[i], threads=session_options.threads, batch_size=int(actual_batch[i]),
            input_shapes={k: list(v) for k, v in shapes[i].items()}, size_bytes=sizes[i],
            session_ms=float(np.median(creation_ms[i])), peak_memory_mb=memory,
            samples_ms=tuple(float(v) for v in samples[i]), **stats))
    comparisons = []
    for i in range(1, count):
        ratios = samples[0] / samples[i]
        low, high, achieved = median_ci(ratios.tolist(), options.confidence)
        comparisons.append(Comparison(
            baseline=labels[0], candidate=labels[i], threads=session_options.threads, batch_size=int(actual_batch[i]),
            speedup=float(np.median(ratios)), ci_low=float(low), ci_high=float(high),
            confidence=options.confidence, coverage=float(achieved),
            rounds=options.repeat, candidate_faster_fraction=float(np.mean(ratios > 1.0))))
    return ConfigResult(session_options.threads, int(actual_batch[0]), tuple(timings), tuple(comparisons),
                        tuple(orders))


def _create_sessions(models, session_options: SessionOptions, order: list[int], creation_ms: list[list[float]]) -> list:
    """Fresh sessions, created (and timed) in ``order``."""
    sessions: list[Any] = [None] * len(models)
    for i in order:
        start = time.perf_counter_ns()
        sessions[i] = create_session(models[i], session_options)
        creation_ms[i].append((time.perf_counter_ns() - start) / 1e6)
    return sessions


def _feeds(sessions, labels, batch_size: int | None, options: BenchOptions):
    feeds, shapes, all_specs = [], [], []
    for i, session in enumerate(sessions):
        specs = input_specs(session)
        resolved = resolve_shapes(specs, options.input_shapes, batch_size, label=labels[i])
        shapes.append(resolved)
        all_specs.append(specs)
        feeds.append(random_feeds(specs, resolved, seed=options.seed))
    return feeds, shapes, all_specs


def _time_rounds(sessions, feeds, orders, out: np.ndarray, round_warmup: int) -> None:
    """One timed ``session.run`` per model per round, in that round's order, each right after
    ``round_warmup`` untimed ones of the same model; ms into ``out[model, round]``."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index, order in enumerate(orders):
            for i in order:
                session, feed = sessions[i], feeds[i]
                for _ in range(round_warmup):
                    session.run(None, feed)
                start = time.perf_counter_ns()
                session.run(None, feed)
                out[i, round_index] = (time.perf_counter_ns() - start) / 1e6
    finally:
        if gc_was_enabled:
            gc.enable()


def _run(session, feed, label):
    try:
        return session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors for bad shapes/types are not one type
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxSlimError(f"{label}: onnxruntime could not run the model with inputs "
                            f"{ {k: list(v.shape) for k, v in feed.items()} } ({message[:300]})") from None


def _unique_names(models: Sequence[ModelSource]) -> list[str]:
    names = [model_name(m, i) for i, m in enumerate(models)]
    if len(set(names)) == len(names):
        return names
    seen: dict[str, int] = {}
    unique = []
    for i, (model, name) in enumerate(zip(models, names)):
        if names.count(name) > 1 and not isinstance(model, onnx.ModelProto):
            name = str(Path(model))
        if name in seen:
            name = f"{name}#{i}"
        seen[name] = i
        unique.append(name)
    return unique


def _peak_memory_mb(model: ModelSource, session_options: SessionOptions, specs: Sequence[TensorSpec],
                    shapes: Mapping[str, Sequence[int]], options: BenchOptions) -> float | None:
    try:
        import resource  # noqa: F401 - POSIX only
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="onnxslim-mem-") as tmp:
        if isinstance(model, onnx.ModelProto):
            path = Path(tmp) / "model.onnx"
            path.write_bytes(model.SerializeToString())
        else:
            path = Path(model).resolve()
        request = {
            "model": str(path),
            "threads": session_options.threads,
            "opt_level": session_options.opt_level,
            "providers": list(session_options.providers),
            "inputs": [[spec.name, spec.dtype, list(shapes[spec.name])] for spec in specs],
            "shapes": {k: list(v) for k, v in shapes.items()},
            "runs": min(options.warmup, 3) + 1,
            "seed": options.seed,
        }
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        completed = subprocess.run([sys.executable, "-m", "onnxslim.validate.memprobe", json.dumps(request)],
                                   capture_output=True, text=True, env=env, timeout=600)
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        raise OnnxSlimError(f"memory probe failed for {path.name}: {tail[0][:300]}")
    return float(json.loads(completed.stdout.strip().splitlines()[-1])["peak_growth_mb"])


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)
    return lines
