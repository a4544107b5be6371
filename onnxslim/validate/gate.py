"""The CI deployment gate: is a candidate model (e.g. slimmed) fit to replace a reference model?

Checks, each active only when its threshold is given:

* accuracy drop, in percentage points: ``100 * (metric_reference - metric_candidate) <= max_accuracy_drop``
  (top-1, or mIoU for segmentation data); needs labelled data.
* output difference: every output passes :mod:`onnxslim.validate.equivalence` with ``atol =
  max_abs_diff`` (0 when only ``rtol`` is given) and ``rtol`` (0 when only ``max_abs_diff`` is given).
  With no threshold at all the gate is an equivalence check at :data:`DEFAULT_ATOL` / :data:`DEFAULT_RTOL`
  (an element fails when it exceeds both; float16 outputs: 16 ulps of float16, ``default_tolerances``); when other thresholds are given without a tolerance, the
  output difference is reported at those defaults but not gated.
* speedup: the median over interleaved rounds of ``t_reference / t_candidate`` (see
  :mod:`onnxslim.validate.bench`) ``>= min_speedup``. The confidence interval is reported next to it.
* size ratio: ``bytes_candidate / bytes_reference <= max_size_ratio`` (files on disk including
  external data).
* MACs and parameter ratios: ``macs_candidate / macs_reference <= max_macs_ratio`` and the same for
  parameters (counted by :mod:`onnxslim.graph.stats`; MACs per sample need static shapes, see
  ``input_shapes``), so a model that comes out less slimmed than expected fails.

The inputs are the dataset's images when data is given, otherwise ``random_samples`` seeded random
inputs of the reference's input shapes. Outputs of both models are compared on the very same inputs
and, with data, the arg-max predictions' agreement is reported as well.

Bad input (a missing file, a file that is not a model, models whose inputs/outputs do not match, a
dataset the model cannot take) raises :class:`OnnxSlimError`; a failed threshold does not — it is a
result, reported in :class:`CheckReport`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxslim.data import ArrayDataset, load_dataset
from onnxslim.errors import OnnxSlimError
from onnxslim.report import format_bytes, format_count, markdown_table
from onnxslim.validate.accuracy import AccuracyMeter, AccuracyResult, run_batches
from onnxslim.validate.bench import BenchOptions, BenchReport, benchmark
from onnxslim.validate.equivalence import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    ERROR_STATS,
    EquivalenceResult,
    check_compatible,
    default_tolerances,
    make_meters,
    random_inputs,
    with_discrete_notes,
    with_noise_floor,
)
from onnxslim.validate.runtime import (
    ModelSource,
    SessionOptions,
    create_session,
    input_specs,
    model_name,
    model_size_bytes,
)

_RATIO_NAMES = ("max_size_ratio", "max_macs_ratio", "max_params_ratio")


@dataclasses.dataclass(frozen=True)
class GateThresholds:
    """None disables a check. ``max_accuracy_drop`` is in percentage points; ratios are candidate over
    reference."""

    max_accuracy_drop: float | None = None
    max_abs_diff: float | None = None
    rtol: float | None = None
    error_stat: str = "elemwise"
    min_speedup: float | None = None
    max_size_ratio: float | None = None
    max_macs_ratio: float | None = None
    max_params_ratio: float | None = None

    @property
    def none_given(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self) if f.name != "error_stat")

    @property
    def gates_outputs(self) -> bool:
        """Whether the output difference is a threshold (given tolerances, or the default check)."""
        return self.max_abs_diff is not None or self.rtol is not None or self.none_given

    def tolerances(self, defaults: tuple[float, float] = (DEFAULT_ATOL, DEFAULT_RTOL)) -> tuple[float, float]:
        """(atol, rtol) the outputs are compared with: ``defaults`` when neither is given."""
        if self.max_abs_diff is None and self.rtol is None:
            return defaults
        return (self.max_abs_diff if self.max_abs_diff is not None else 0.0,
                self.rtol if self.rtol is not None else 0.0)

    def validate(self) -> None:
        for name in ("max_accuracy_drop", "max_abs_diff", "rtol", "min_speedup", *_RATIO_NAMES):
            value = getattr(self, name)
            if value is not None and (not np.isfinite(value) or (value < 0 and name != "max_accuracy_drop")):
                raise OnnxSlimError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.error_stat not in ERROR_STATS:
            raise OnnxSlimError(f"unknown error statistic {self.error_stat!r}; use one of {', '.join(ERROR_STATS)}")


@dataclasses.dataclass(frozen=True)
class CheckOptions:
    """How to gather the figures: data, sample counts, and the speed measurement."""

    data: str | ArrayDataset | None = None
    limit: int | None = None
    batch_size: int = 64
    random_samples: int = 8
    seed: int = 0
    input_shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    threads: int = 1
    measure_speed: bool = False
    bench_warmup: int = 5
    bench_repeat: int = 50
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class GateCheck:
    """One threshold: its figure, the limit, and whether it holds."""

    name: str
    value: float
    limit: float
    passed: bool
    figure: str
    requirement: str
    detail: str = ""

    def message(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        text = f"{verdict}: {self.name} {self.figure} (required {self.requirement})"
        return text + (f" - {self.detail}" if self.detail and not self.passed else "")


@dataclasses.dataclass(frozen=True)
class CheckReport:
    reference: str
    candidate: str
    inputs: str
    checks: tuple[GateCheck, ...]
    equivalence: EquivalenceResult
    reference_accuracy: AccuracyResult | None
    candidate_accuracy: AccuracyResult | None
    agreement: float | None
    reference_size: int
    candidate_size: int
    bench: BenchReport | None
    model_stats: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> list[GateCheck]:
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "inputs": self.inputs,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "accuracy": {
                "reference": self.reference_accuracy.to_dict() if self.reference_accuracy else None,
                "candidate": self.candidate_accuracy.to_dict() if self.candidate_accuracy else None,
                "prediction_agreement": self.agreement,
            },
            "equivalence": self.equivalence.to_dict(),
            "size": {"reference_bytes": self.reference_size, "candidate_bytes": self.candidate_size,
                     "ratio": self.candidate_size / self.reference_size if self.reference_size else None},
            "speed": self.bench.to_dict(include_samples=False) if self.bench else None,
            "model_stats": self.model_stats,
        }

    def to_markdown(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"## onnxslim check: {verdict}", "",
                 f"Reference `{self.reference}` vs candidate `{self.candidate}` on {self.inputs}.", ""]
        if self.checks:
            if not any(c.name == "output difference" for c in self.checks):
                lines += [f"Output difference not gated (no --atol/--rtol); mismatches below are counted at "
                          f"atol {self.equivalence.atol:g}, rtol {self.equivalence.rtol:g}.", ""]
            lines.append(markdown_table(
                ("check", "value", "required", "result"),
                [(c.name, c.figure, c.requirement, "pass" if c.passed else "**FAIL**") for c in self.checks]))
        for check in self.failures():
            if check.detail:
                lines += ["", f"- {check.name}: {check.detail}"]
        lines += ["", "### Outputs", "", markdown_table(
            ("output", "shape", "max abs diff", "mean abs diff", "max rel diff", "mismatched elements"),
            [(o.name if o.name == o.candidate_name else f"{o.name} / {o.candidate_name}", _batch_shape(o.shape),
              f"{o.max_abs:.3g}", f"{o.mean_abs:.3g}", f"{o.max_rel:.3g}", f"{o.mismatches} / {o.elements}")
             for o in self.equivalence.outputs], align="llrrrr")]
        if self.reference_accuracy and self.candidate_accuracy:
            ref, cand = self.reference_accuracy, self.candidate_accuracy
            rows = [(ref.metric, f"{100 * ref.value:.2f}%", f"{100 * cand.value:.2f}%")]
            if ref.dice is not None and cand.dice is not None:
                rows.append(("dice", f"{100 * ref.dice:.2f}%", f"{100 * cand.dice:.2f}%"))
            if ref.pixel_accuracy is not None and cand.pixel_accuracy is not None:
                rows.append(("pixel accuracy", f"{100 * ref.pixel_accuracy:.2f}%", f"{100 * cand.pixel_accuracy:.2f}%"))
            if self.agreement is not None:
                rows.append(("same prediction", "", f"{100 * self.agreement:.2f}%"))
            lines += ["", "### Accuracy", "", markdown_table(("metric", "reference", "candidate"), rows, "lrr")]
        model_rows = [("file size", format_bytes(self.reference_size), format_bytes(self.candidate_size))]
        for key, label in (("params", "parameters"), ("macs", "MACs per sample")):
            ref_value = self.model_stats.get("reference", {}).get(key)
            cand_value = self.model_stats.get("candidate", {}).get(key)
            if ref_value is not None and cand_value is not None:
                model_rows.append((label, format_count(ref_value), format_count(cand_value)))
        if self.bench:
            ref_t, cand_t = self.bench.models[0], self.bench.models[1]
            model_rows.append((f"median latency ({ref_t.threads} thread(s), batch {ref_t.batch_size})",
                               f"{ref_t.median_ms:.3f} ms", f"{cand_t.median_ms:.3f} ms"))
            model_rows.append(("p90 latency", f"{ref_t.p90_ms:.3f} ms", f"{cand_t.p90_ms:.3f} ms"))
        lines += ["", "### Models", "", markdown_table(("", "reference", "candidate"), model_rows, "lrr")]
        if self.bench:
            c = self.bench.comparisons[0]
            lines += ["", f"Speedup {c.speedup:.3f}x, {c.confidence:.0%} CI [{c.ci_low:.3f}, {c.ci_high:.3f}] "
                          f"over {c.rounds} interleaved rounds (onnxruntime {self.bench.environment['onnxruntime']}, "
                          f"{self.bench.environment['processor']})."]
        return "\n".join(lines) + "\n"


def run_check(reference: ModelSource, candidate: ModelSource, thresholds: GateThresholds = GateThresholds(),
              options: CheckOptions = CheckOptions()) -> CheckReport:
    """Gather the figures and evaluate every given threshold; see the module docstring."""
    thresholds.validate()
    if options.limit is not None and options.limit < 1:
        raise OnnxSlimError(f"--limit must be >= 1, got {options.limit}")
    if options.random_samples < 1:
        raise OnnxSlimError(f"the number of random samples must be >= 1, got {options.random_samples}")
    if thresholds.max_accuracy_drop is not None and options.data is None:
        raise OnnxSlimError("--max-accuracy-drop needs labelled data (--data mnist, a folder or an .npz)")
    ref_label, cand_label = model_name(reference, 0), model_name(candidate, 1)
    if ref_label == cand_label:
        ref_label, cand_label = f"{ref_label} (reference)", f"{cand_label} (candidate)"
    session_options = SessionOptions(threads=options.threads)
    ref_session = create_session(reference, session_options)
    cand_session = create_session(candidate, session_options)
    pairs = check_compatible(ref_session, cand_session, ref_label, cand_label)
    atol, rtol = thresholds.tolerances(default_tolerances(ref_session, pairs))
    meters = make_meters(ref_session, cand_session, pairs, atol, rtol, thresholds.error_stat)

    ref_accuracy = cand_accuracy = agreement = None
    if options.data is not None:
        dataset = load_dataset(options.data) if isinstance(options.data, str) else options.data
        dataset = dataset.subset(options.limit)
        if len(dataset) == 0:
            raise OnnxSlimError(f"dataset {dataset.name} is empty")
        ref_meter, cand_meter = AccuracyMeter(dataset.is_segmentation), AccuracyMeter(dataset.is_segmentation)
        same = total = 0
        inputs = f"{dataset.name}, {len(dataset)} samples"
        batches = zip(run_batches(ref_session, dataset, options.batch_size, ref_label),
                      run_batches(cand_session, dataset, options.batch_size, cand_label))
        with _bar(len(dataset), "check", options.progress) as bar:
            for (ref_out, labels), (cand_out, _) in batches:
                for meter, (i, j) in zip(meters, pairs):
                    meter.update(cand_out[j], ref_out[i])
                ref_pred = ref_meter.update(ref_out[pairs[0][0]], labels)
                cand_pred = cand_meter.update(cand_out[pairs[0][1]], labels)
                same += int(np.count_nonzero(ref_pred == cand_pred))
                total += ref_pred.size
                bar.update(len(labels))
        ref_accuracy, cand_accuracy = ref_meter.result(), cand_meter.result()
        agreement = same / total if total else None
        compared = len(dataset)
    else:
        count = compared = options.limit or options.random_samples
        inputs = f"{count} seeded random inputs (seed {options.seed})"
        feeds = list(random_inputs(input_specs(ref_session), count, options.seed, options.input_shapes, ref_label))
        with _bar(count, "check", options.progress) as bar:
            for feed in feeds:
                ref_out, cand_out = ref_session.run(None, feed), cand_session.run(None, feed)
                for meter, (i, j) in zip(meters, pairs):
                    meter.update(cand_out[j], ref_out[i])
                bar.update(1)
    results = with_discrete_notes([m.result() for m in meters], reference)
    if options.data is None:
        results = with_noise_floor(results, reference, ref_session, feeds, pairs, session_options)
    equivalence = EquivalenceResult(results, atol, rtol, thresholds.error_stat, compared, inputs)
    del ref_session, cand_session

    bench = None
    if thresholds.min_speedup is not None or options.measure_speed:
        bench = benchmark([reference, candidate], BenchOptions(
            threads=(options.threads,), input_shapes=dict(options.input_shapes), warmup=options.bench_warmup,
            repeat=options.bench_repeat, measure_memory=False, seed=options.seed),
            progress=options.progress, names=[ref_label, cand_label])

    ref_size, cand_size = model_size_bytes(reference), model_size_bytes(candidate)
    stats = {"reference": _model_stats(reference, options.input_shapes),
             "candidate": _model_stats(candidate, options.input_shapes)}
    checks = _evaluate_thresholds(thresholds, equivalence, ref_accuracy, cand_accuracy, bench, ref_size, cand_size)
    checks += _ratio_checks(thresholds, stats)
    return CheckReport(ref_label, cand_label, inputs, tuple(checks), equivalence, ref_accuracy, cand_accuracy,
                       agreement, ref_size, cand_size, bench, stats)


def _evaluate_thresholds(thresholds: GateThresholds, equivalence: EquivalenceResult,
                         ref_accuracy: AccuracyResult | None, cand_accuracy: AccuracyResult | None,
                         bench: BenchReport | None, ref_size: int, cand_size: int) -> list[GateCheck]:
    checks = []
    if thresholds.max_accuracy_drop is not None and ref_accuracy and cand_accuracy:
        drop = 100.0 * (ref_accuracy.value - cand_accuracy.value)
        checks.append(GateCheck(
            "accuracy drop", drop, thresholds.max_accuracy_drop, drop <= thresholds.max_accuracy_drop,
            f"{drop:.2f} pt ({ref_accuracy.metric} {100 * ref_accuracy.value:.2f}% -> {100 * cand_accuracy.value:.2f}%)",
            f"<= {thresholds.max_accuracy_drop:g} pt"))
    if thresholds.gates_outputs:
        failing = [o for o in equivalence.outputs if not o.passed]
        mismatches = sum(o.mismatches for o in equivalence.outputs)
        elements = sum(o.elements for o in equivalence.outputs)
        stat = "" if equivalence.error_stat == "elemwise" else f", {equivalence.error_stat} statistic"
        checks.append(GateCheck(
            "output difference", equivalence.max_abs, equivalence.atol, not failing,
            f"max abs {equivalence.max_abs:.3g}, max rel {equivalence.max_rel:.3g}, "
            f"{mismatches} / {elements} elements mismatched",
            f"atol {equivalence.atol:g} or rtol {equivalence.rtol:g}{stat}",
            "; ".join(o.describe(equivalence.atol, equivalence.rtol) for o in failing)))
    if thresholds.min_speedup is not None and bench is not None:
        c = bench.comparisons[0]
        checks.append(GateCheck(
            "speedup", c.speedup, thresholds.min_speedup, c.speedup >= thresholds.min_speedup,
            f"{c.speedup:.3f}x ({c.confidence:.0%} CI {c.ci_low:.3f}-{c.ci_high:.3f}, "
            f"{bench.models[0].median_ms:.3f} -> {bench.models[1].median_ms:.3f} ms)",
            f">= {thresholds.min_speedup:g}x"))
    if thresholds.max_size_ratio is not None:
        ratio = cand_size / ref_size if ref_size else float("inf")
        checks.append(GateCheck(
            "size ratio", ratio, thresholds.max_size_ratio, ratio <= thresholds.max_size_ratio,
            f"{ratio:.3f} ({format_bytes(ref_size)} -> {format_bytes(cand_size)})",
            f"<= {thresholds.max_size_ratio:g}"))
    return checks


def _ratio_checks(thresholds: GateThresholds, stats: Mapping[str, Mapping[str, Any]]) -> list[GateCheck]:
    """The MACs and parameter-count ratios (candidate / reference); raises when they cannot be counted."""
    checks = []
    for key, label, limit in (("macs", "MACs ratio", thresholds.max_macs_ratio),
                              ("params", "params ratio", thresholds.max_params_ratio)):
        if limit is None:
            continue
        ref, cand = stats["reference"], stats["candidate"]
        if "error" in ref or "error" in cand:
            raise OnnxSlimError(f"--max-{key}-ratio: cannot count {key} ({ref.get('error') or cand.get('error')})")
        if key == "macs" and not (ref.get("macs_complete", True) and cand.get("macs_complete", True)):
            raise OnnxSlimError("--max-macs-ratio: some layers have dynamic shapes; fix them with --input-shape")
        ratio = cand[key] / ref[key] if ref[key] else float("inf")
        checks.append(GateCheck(label, ratio, limit, ratio <= limit,
                                f"{ratio:.3f} ({format_count(ref[key])} -> {format_count(cand[key])})", f"<= {limit:g}"))
    return checks


def _model_stats(model: ModelSource, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Parameters and MACs from the slim engine's counter when it is installed; informational only."""
    try:
        from onnxslim.graph.stats import model_stats
    except ImportError:
        return {}
    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        stats = model_stats(proto, input_shapes=dict(input_shapes) or None)
    except Exception as exc:  # noqa: BLE001 - the counts are extra information; never fail the gate on them
        return {"error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}
    if isinstance(stats, tuple):
        params, macs = stats[:2]
        return {"params": int(params), "macs": int(macs)}
    return {"params": int(stats.params), "macs": int(stats.macs), "macs_complete": bool(stats.macs_complete)}


def _batch_shape(shape: Sequence[int]) -> str:
    # the first batch's shape, batch dimension shown as N (the last batch may be smaller)
    return "x".join(["N", *map(str, shape[1:])]) if shape else "scalar"


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not progress, leave=False)
