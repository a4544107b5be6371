"""``onnxslim run RECIPE``: dense baseline -> mask training -> export -> slim -> validate -> report.

Each step is a stage function a user can also call alone from Python (``start_run`` first, then
``train``, ``export``, ``slim``, ``validate``, ``report``; :func:`run_recipe` chains them). Everything is
written into the output folder, every file atomically. The folder must be empty (or new) unless
``overwrite=True`` (the run's own files are deleted first) or ``resume=True``: the training steps then
continue from their per-epoch checkpoints, each of which records :func:`recipe_fingerprint` and is
refused, naming the changed keys, when the recipe differs. Steps 4-7 are recomputed on every run
(their old files are deleted when the run starts), so a report always belongs to its checkpoints.

1. **dense** (``dense.pt``): the zoo model, seeded, trained for ``training.dense.epochs``.
2. **baseline** (``baseline.pt``): the dense model trained on for ``sparse.epochs + finetune.epochs``
   more epochs with the same learning-rate settings as the mask run, but no masks — the dense
   reference with the *same total epoch budget* as the pruned model.
3. **masked** (``masked.pt``): the dense model from step 1 with masks attached, trained by the
   recipe's method: sparse phase -> zero masks -> fine-tune with frozen masks. Steps 2 and 3 can run
   side by side in two processes (:func:`train_models` ``side_by_side=True``).
4. **export**: ``dense.onnx`` (the baseline) and ``masked.onnx`` (masks as per-channel ``Mul``), each
   checked against PyTorch with onnxruntime.
5. **slim**: ``slim.onnx`` from ``masked.onnx`` (:func:`onnxslim.graph.slim.slim`).
6. **validate**: accuracy of dense / masked / slimmed ONNX with onnxruntime on the test split,
   ``max_abs_diff`` between the PyTorch masked model and ``slim.onnx`` over the whole test split,
   latency of the three ONNX files (interleaved rounds, median).
7. **report**: a table on stdout, ``REPORT.json`` and ``REPORT.md`` with the figures, the targets and
   whether each holds, ``slim_report.txt``, and the plots ``layers.png`` (channels per layer before and
   after) and ``latency.png`` (latency distributions of the three models).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnxslim.data import ArrayDataset, load_dataset
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.report import SlimReport
from onnxslim.graph.slim import slim as slim_onnx
from onnxslim.graph.stats import ModelStats, model_stats
from onnxslim.io import write_text_atomic
from onnxslim.plots import plot_latency, plot_layer_channels
from onnxslim.recipes import Recipe
from onnxslim.report import markdown_table, write_report
from onnxslim.training.baseline import BaselineJob, train_baseline, train_baseline_timed
from onnxslim.training.distributed import DistContext
from onnxslim.training.export import ExportResult
from onnxslim.training.export import export as export_onnx
from onnxslim.training.masks import attach_masks, masked_summary
from onnxslim.training.methods import get_method
from onnxslim.training.side import SideProcess
from onnxslim.training.trainer import (
    PhaseConfig,
    Trainer,
    TrainOptions,
    TrainResult,
    load_checkpoint,
    resolve_device,
)
from onnxslim.validate.accuracy import AccuracyResult, evaluate
from onnxslim.validate.bench import BenchOptions, BenchReport, benchmark
from onnxslim.zoo import model_parameters

REPORT_FILE = "REPORT.json"


@dataclasses.dataclass(frozen=True)
class TargetCheck:
    name: str
    target: float
    value: float
    ok: bool


@dataclasses.dataclass
class RunReport:
    """The figures of one run, as written to ``REPORT.json`` (:meth:`to_dict`) and read back by :func:`read_report`.

    Units: ``accuracy_*`` are fractions of the test split (0.981 = 98.1 %; mIoU for segmentation),
    ``accuracy_drop_pt`` is dense baseline minus slimmed in percentage points (as ``[targets]
    max_accuracy_drop_pt`` and ``onnxslim check --max-accuracy-drop``), ``params_removed`` /
    ``macs_removed`` are fractions of the dense model's, latencies are milliseconds, ``seconds`` per stage.
    """

    recipe: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    accuracy_before: float
    accuracy_masked: float
    accuracy_after: float
    accuracy_metric: str
    latency_ms_before: float
    latency_ms_masked: float
    latency_ms_after: float
    max_abs_diff: float
    max_abs_diff_onnx: float
    params_removed: float
    macs_removed: float
    accuracy_drop_pt: float  # dense baseline accuracy - slimmed accuracy, in percentage points (0.5 = half a point)
    masked_channels: int
    deleted_masked_channels: int
    live_channels: dict[str, list[int]]
    targets: list[TargetCheck]
    targets_met: bool
    seconds: dict[str, float]
    files: dict[str, str]
    torch_accuracy: dict[str, float | None]
    latency_details: dict[str, Any] = dataclasses.field(default_factory=dict)
    wall_seconds: float | None = None  # the run from start_run to its report (None in older reports)
    side_by_side: bool = False  # baseline and mask training ran at once: their seconds overlap
    onnx_nodes: dict[str, str] = dataclasses.field(default_factory=dict)  # PyTorch module -> ONNX node (slim.onnx)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        """The report :meth:`to_dict` wrote. Reports written before the drop was kept in points, with a
        fraction ``accuracy_drop``, are read with it converted to ``accuracy_drop_pt``.

        Raises :class:`OnnxSlimError` naming the missing fields when ``data`` is not a run report.
        """
        data = dict(data)
        if "accuracy_drop_pt" not in data and "accuracy_drop" in data:  # older reports: a fraction
            data["accuracy_drop_pt"] = 100.0 * data.pop("accuracy_drop")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        required = [name for name, field in fields.items() if field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise OnnxSlimError(f"not an onnxslim run report (no {', '.join(missing[:4])}"
                                f"{' ...' if len(missing) > 4 else ''})")
        known = {name: value for name, value in data.items() if name in fields}
        known["targets"] = [TargetCheck(**check) for check in known["targets"]]
        return cls(**known)

    def to_markdown(self) -> str:
        """REPORT.md: the same figures as REPORT.json, for people."""
        pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
        verdict = "all targets met" if self.targets_met else "**a target FAILED**"
        lines = [f"# onnxslim run: {self.recipe.get('name', '')} ({verdict})", "",
                 markdown_table(("", "dense baseline", "masked", "slimmed"), self._figure_rows(), align="lrrr"), "",
                 f"Params removed {pct(self.params_removed)}, MACs removed {pct(self.macs_removed)}, accuracy drop "
                 f"{self.accuracy_drop_pt:.2f} pt; max |PyTorch masked - slimmed ONNX| = {self.max_abs_diff:.3g} "
                 f"({self.deleted_masked_channels} of {self.masked_channels} masked channels deleted).", ""]
        if self.targets:
            lines += ["## Targets", "", markdown_table(("target", "required", "measured", "result"), [
                (c.name, f"{c.target:.4g}", f"{c.value:.4g}", "ok" if c.ok else "**FAILED**") for c in self.targets]), ""]
        lines += ["## Live channels per layer", "", markdown_table(("layer (PyTorch module)", "ONNX node", "live", "channels"), [
            (name, self.onnx_nodes.get(name, ""), str(live), str(total))
            for name, (live, total) in self.live_channels.items()], align="llrr"), ""]
        hints = self.advice()
        lines += [f"**Note:** {hint}." for hint in hints] + ([""] if hints else [])
        lines += ["Plots: `layers.png` (channels per layer), `latency.png` (latency distributions)."]
        return "\n".join(lines) + "\n"

    def _figure_rows(self) -> list[tuple[str, str, str, str]]:
        """(figure, dense, masked, slimmed) rows shared by the terminal table and REPORT.md."""
        pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
        return [
            ("params", f"{self.params_before:,}", "", f"{self.params_after:,}"),
            ("MACs", f"{self.macs_before:,}", "", f"{self.macs_after:,}"),
            (f"accuracy ({self.accuracy_metric})", pct(self.accuracy_before), pct(self.accuracy_masked),
             pct(self.accuracy_after)),
            ("latency (ms, median)", f"{self.latency_ms_before:.4f}", f"{self.latency_ms_masked:.4f}",
             f"{self.latency_ms_after:.4f}"),
        ]

    def advice(self) -> list[str]:
        """Hints for figures that look wrong to a user, each with what to try."""
        hints = []
        round_to = str(self.recipe.get("slim", {}).get("round_to", "auto"))
        if self.macs_after < self.macs_before and self.latency_ms_after > self.latency_ms_before:
            slower = (f"the slimmed model is slower than the dense one ({self.latency_ms_after:.4f} vs "
                      f"{self.latency_ms_before:.4f} ms) although it has fewer MACs: ")
            if round_to == "1":
                hints.append(slower + "onnxruntime's CPU convolutions are slow for channel counts off their NCHWc "
                             'block (4, 8 or 16 by CPU); try [slim] round_to = "auto"')
            else:
                hints.append(slower + "try `onnxslim slim masked.onnx slim.onnx --ensure-faster` (keeps the fastest "
                             "of round-to 1, the block and twice it) and `onnxslim bench --per-layer dense.onnx "
                             "slim.onnx` to see which layers")
        return hints

    def format_table(self) -> str:
        pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
        rows = [("", "dense", "masked", "slimmed"), *self._figure_rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.append("")
        lines.append(f"params removed {pct(self.params_removed)}, MACs removed {pct(self.macs_removed)}, "
                     f"accuracy drop {self.accuracy_drop_pt:.2f} pt, max |PyTorch masked - slimmed ONNX| "
                     f"{self.max_abs_diff:.3g}")
        lines.append("live channels per layer: " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in self.live_channels.items()))
        for check in self.targets:
            lines.append(f"target {check.name}: {check.value:.4g} vs {check.target:.4g} -> {'ok' if check.ok else 'FAILED'}")
        lines += [f"note: {hint}" for hint in self.advice()]
        stages = ", ".join(f"{k} {v:.0f}s" + (" (side by side)" if k == "masked" and self.side_by_side else "")
                           for k, v in self.seconds.items())
        if self.wall_seconds is None:
            lines.append(f"time: {stages} (total {sum(self.seconds.values()):.0f}s)")
        else:
            lines.append(f"time: {stages}; run {self.wall_seconds:.0f}s wall")
        return "\n".join(lines)


def load_data(recipe: Recipe) -> tuple[ArrayDataset, ArrayDataset]:
    """The recipe's (train, test) datasets, cut to ``train_samples`` / ``test_samples`` when set."""
    spec = recipe.data
    train = load_dataset(spec.dataset, "train", seed=spec.split_seed)
    test = load_dataset(spec.test, "test", seed=spec.split_seed) if spec.test else \
        load_dataset(spec.dataset, "test", seed=spec.split_seed)
    if spec.dataset.startswith("synthetic:"):
        raise OnnxSlimError("a recipe needs labelled data, not a synthetic spec")
    if spec.train_samples:
        train = train.subset(spec.train_samples)
    if spec.test_samples:
        test = test.subset(spec.test_samples)
    return train, test


CHECKPOINTS = ("dense.pt", "baseline.pt", "masked.pt")
# written after training from the checkpoints: removed when a run starts, so a report is never older
# than the checkpoints beside it
DERIVED = ("dense.onnx", "masked.onnx", "slim.onnx", "REPORT.json", "REPORT.md", "slim_report.txt", "layers.png",
           "latency.png")


@dataclasses.dataclass
class Run:
    """One run of a recipe: its folder, data and options. Every stage function reads it and adds its time.

    Build it with :func:`start_run`; ``seconds`` collects the wall time of each stage (seconds).
    """

    recipe: Recipe
    out: Path
    train_data: ArrayDataset
    test_data: ArrayDataset
    resume: bool = False
    progress: bool = True
    device: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)  # perf_counter() at start_run
    created: Path | None = None  # the topmost folder start_run created for ``out`` (None: ``out`` existed)

    @property
    def example(self) -> torch.Tensor:
        """Two training images (N=2, C, H, W): the example input for tracing and export."""
        return torch.from_numpy(np.ascontiguousarray(self.train_data.images[:2]))

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        return {"input": [1, *self.recipe.model.input_shape()]}

    def path(self, name: str) -> Path:
        return self.out / name


def start_run(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True, device: str | None = None) -> Run:
    """Check and prepare the output folder, load the recipe's data: the step before the stage functions.

    Without ``resume`` a folder that is not empty is refused unless ``overwrite`` (which deletes the
    files a run writes, and nothing else); with ``resume`` every checkpoint there must have been
    written for this recipe (:func:`check_resumable`). Files derived from the checkpoints (ONNX models,
    reports, plots) are deleted either way, so a report always belongs to the checkpoints beside it.
    Raises :class:`OnnxSlimError` (one line) for a folder it may not use.
    """
    out = Path(out_dir)

    def prepare() -> None:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
        if resume:
            check_resumable(out, recipe_fingerprint(recipe))
        for name in DERIVED:
            (out / name).unlink(missing_ok=True)

    # data first: a bad data spec must not leave an empty output folder behind
    train_data, test_data = load_data(recipe)
    created = _first_missing(out)
    DistContext.current().on_main(prepare)  # under torchrun: rank 0 decides, every rank raises its error
    return Run(recipe, out, train_data, test_data, resume=resume, progress=progress, device=device,
               created=created)


def _first_missing(out: Path) -> Path | None:
    """The topmost folder of ``out`` (itself or an ancestor) that does not exist yet; None when it exists."""
    missing = None
    for folder in [out, *out.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def discard_unused_run_dir(run: Run) -> None:
    """Remove the folders :func:`start_run` created for ``run`` while they are still empty (a run that
    failed before writing anything leaves nothing behind); on the main rank only. Never raises."""
    if run.created is None or not DistContext.current().is_main:
        return
    for folder in [run.out, *run.out.parents]:
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            return
        if folder == run.created:
            return


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty one without ``resume``/``overwrite``; ``overwrite`` clears a run."""
    if resume and overwrite:
        raise OnnxSlimError("--resume and --overwrite exclude each other: continue the run, or start it again")
    if out.exists() and not out.is_dir():
        raise OnnxSlimError(f"{out} is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if entries and not resume and not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OnnxSlimError(f"{out} is not empty ({shown}); pass --resume to continue its run or --overwrite to "
                            f"start again")
    if overwrite:
        for name in CHECKPOINTS + DERIVED:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def recipe_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """Everything in ``recipe`` that shapes the trained checkpoints, as ``{"method.params.lam": 0.015, ...}``.

    The model with its resolved parameters, the data spec and sample counts, the method with all of its
    parameters (defaults included), seed, batch size and the three phases. Export, slim, validation and
    targets are not in it: a resumed run recomputes them. Nor is the device.
    """
    method = get_method(recipe.method.name, recipe.method.params)
    training = recipe.training
    payload = {
        "model": {**recipe.model.to_dict(), "params": model_parameters(recipe.model.name, recipe.model.params)},
        "data": dataclasses.asdict(recipe.data),
        "method": {"name": method.name, "params": dataclasses.asdict(method.params)},
        "training": {"seed": training.seed, "batch_size": training.batch_size,
                     **{kind: dataclasses.asdict(getattr(training, kind)) for kind in ("dense", "sparse", "finetune")}},
    }
    return _flatten(json.loads(json.dumps(payload, default=str)))


def _flatten(payload: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(payload, dict) or not payload:
        return {prefix: payload}
    flat: dict[str, Any] = {}
    for key, value in payload.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def check_resumable(out: Path, fingerprint: Mapping[str, Any]) -> None:
    """Refuse to resume from a checkpoint in ``out`` written for another recipe; name the keys that differ."""
    for name in CHECKPOINTS:
        path = out / name
        if not path.exists():
            continue
        extra = load_checkpoint(path).get("extra")
        recorded = extra.get("fingerprint") if isinstance(extra, Mapping) else None
        if not isinstance(recorded, Mapping):
            raise OnnxSlimError(f"{path}: the checkpoint does not record the recipe it was trained with; run "
                                f"without --resume (with --overwrite) to start again")
        changed = [key for key in sorted(set(recorded) | set(fingerprint))
                   if recorded.get(key, _MISSING) != fingerprint.get(key, _MISSING)]
        if changed:
            shown = ", ".join(f"{key} {_show(recorded.get(key, _MISSING))} -> {_show(fingerprint.get(key, _MISSING))}"
                              for key in changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise OnnxSlimError(f"{path}: trained with another recipe ({shown}); run without --resume (with "
                                f"--overwrite) to start again")


_MISSING = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value)


@dataclasses.dataclass
class TrainedModels:
    dense: torch.nn.Module  # after the dense phase (the start of mask training)
    baseline: torch.nn.Module | None  # dense, trained for the same total budget as the masked model
    masked: torch.nn.Module  # with masks, after sparse training and fine-tuning
    dense_result: TrainResult | None
    baseline_result: TrainResult | None
    mask_result: TrainResult
    seconds: dict[str, float]
    side_by_side: bool = False  # baseline trained in a second process while the masked model trained here


def train(run: Run, *, baseline: bool = True) -> TrainedModels:
    """Stage 1-3: dense (``dense.pt``), baseline (``baseline.pt``), masked (``masked.pt``) in ``run.out``.

    A failure before the first checkpoint (a model that does not fit the data, a method that does not
    apply) removes the folders :func:`start_run` created (:func:`discard_unused_run_dir`) and re-raises."""
    try:
        trained = train_models(run.recipe, run.out, run.train_data, run.test_data, resume=run.resume,
                               progress=run.progress, device=run.device, baseline=baseline)
    except BaseException:
        discard_unused_run_dir(run)
        raise
    run.seconds.update(trained.seconds)
    return trained


def train_models(recipe: Recipe, out_dir: str | Path, train: ArrayDataset, test: ArrayDataset | None, *,
                 resume: bool = False, progress: bool = True, device: str | None = None,
                 baseline: bool = True, side_by_side: bool = False) -> TrainedModels:
    """Steps 1-3: dense (``dense.pt``), baseline (``baseline.pt``), masked (``masked.pt``) in ``out_dir``.

    The baseline and the mask training both start from the dense model and are independent: with
    ``side_by_side`` (on the CPU, in one process, neither checkpoint finished) the baseline trains in a
    second process (:class:`SideProcess`) with N // 2 of this process' N PyTorch threads while this one
    trains the masked model with the other N - N // 2. The weights are those of training each with that
    thread count one after the other; ``seconds["baseline"]`` is then the wall time of the baseline's
    process, which overlaps ``seconds["masked"]``. Not the default: on an otherwise idle 2-core machine
    it was slower than one process with 2 threads (``tools/bench_side_by_side.py``, README).
    """
    out = Path(out_dir)
    spec, cfg = recipe.model, recipe.training
    expected = spec.input_shape()
    if tuple(train.images.shape[1:]) != expected:
        raise OnnxSlimError(f"model {spec.name} expects inputs {expected} but {train.name} has "
                            f"{tuple(train.images.shape[1:])}; set in_channels/input_size in [model.params] "
                            f"(or [model] input_shape)")
    # no test accuracy after every epoch: nothing is chosen by it (the final one is still measured)
    options = TrainOptions(batch_size=cfg.batch_size, seed=cfg.seed, device=device or cfg.device, progress=progress,
                           evaluate_every_epoch=False)
    extra = {"model_spec": spec.to_dict(), "recipe": recipe.name, "fingerprint": recipe_fingerprint(recipe)}
    example = torch.from_numpy(np.ascontiguousarray(train.images[:2]))
    method = get_method(recipe.method.name, recipe.method.params)
    _refuse_inapplicable(method, spec, example)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    dense = spec.build()
    dense_trainer = Trainer(dense, train, test_data=test, options=options, checkpoint=out / "dense.pt", extra=extra)
    dense_result = dense_trainer.fit([cfg.dense], resume=resume) if cfg.dense.epochs else None
    seconds["dense"] = time.perf_counter() - started

    job = BaselineJob(spec, dense.state_dict(), [dataclasses.replace(cfg.sparse, kind="dense"),
                      dataclasses.replace(cfg.finetune, kind="dense")], train, test, options, out / "baseline.pt",
                      extra, resume)
    masked = copy.deepcopy(dense).cpu()
    attach_masks(masked, example)
    mask_trainer = Trainer(masked, train, test_data=test, method=method, options=options,
                           checkpoint=out / "masked.pt", extra={**extra, "masked": True}, reference_model=dense)
    train_masked = lambda: mask_trainer.fit([cfg.sparse, cfg.finetune], resume=resume)  # noqa: E731
    if not baseline:
        baseline_model = baseline_result = None
        mask_result = _timed(train_masked, seconds, "masked")
    elif side_by_side := (side_by_side and _can_run_side_by_side(options, out, resume)):
        baseline_model, baseline_result, mask_result = _train_side_by_side(job, train_masked, seconds)
    else:
        baseline_model, baseline_result = _timed(lambda: train_baseline(job), seconds, "baseline")
        mask_result = _timed(train_masked, seconds, "masked")
    seconds = {name: seconds[name] for name in ("dense", "baseline", "masked") if name in seconds}
    return TrainedModels(dense, baseline_model, masked, dense_result, baseline_result, mask_result, seconds,
                         side_by_side=bool(baseline and side_by_side))


def _timed(fn, seconds: dict[str, float], name: str):
    started = time.perf_counter()
    try:
        return fn()
    finally:
        seconds[name] = time.perf_counter() - started


def _can_run_side_by_side(options: TrainOptions, out: Path, resume: bool) -> bool:
    if resolve_device(options.device).type != "cpu":
        return False
    if DistContext.current().world_size > 1:
        return False
    # a finished checkpoint trains nothing: a second process would only cost its start-up
    return not (resume and any(_finished(out / name) for name in ("baseline.pt", "masked.pt")))


def _finished(path: Path) -> bool:
    return path.exists() and bool(load_checkpoint(path).get("completed"))


def _train_side_by_side(job: BaselineJob, train_masked, seconds: dict[str, float]):
    """The baseline in a side process with N // 2 threads, the mask training here with the rest."""
    threads = torch.get_num_threads()
    side_threads = max(1, threads // 2)
    with SideProcess(train_baseline_timed, (job,), threads=side_threads, what="training the dense baseline") as side:
        torch.set_num_threads(max(1, threads - side_threads))
        try:
            mask_result = _timed(train_masked, seconds, "masked")
        finally:
            torch.set_num_threads(threads)
        try:
            state, baseline_result, seconds["baseline"] = side.result()
        except OnnxSlimError as exc:
            raise OnnxSlimError(f"{exc}; {job.checkpoint.name} keeps its last finished epoch: run again with "
                                f"--resume") from None
    model = job.spec.build()
    model.load_state_dict(state)
    return model, baseline_result, mask_result


def _refuse_inapplicable(method, spec, example: torch.Tensor) -> None:
    """Ask the method, before any training, whether it can train this model (with masks attached)."""
    probe = spec.build()
    attach_masks(probe, example)
    reason = method.applicable(probe)
    if reason:
        raise OnnxSlimError(f"method {method.name} cannot train model {spec.name}: {reason}")


@dataclasses.dataclass(frozen=True)
class ExportedModels:
    dense: Path  # dense.onnx: the baseline (the dense model when no baseline was trained)
    masked: Path  # masked.onnx: masks as per-channel Mul nodes
    results: dict[str, ExportResult]


def export(run: Run, trained: TrainedModels) -> ExportedModels:
    """Stage 4: ``dense.onnx`` and ``masked.onnx``, each checked against PyTorch with onnxruntime (a progress
    bar names the model being exported: a dynamo export of a large model takes minutes)."""
    from tqdm import tqdm

    started = time.perf_counter()
    spec = run.recipe.export
    results = {}
    models = (("dense", trained.baseline or trained.dense), ("masked", trained.masked))
    with tqdm(total=len(models), desc=f"export ({'dynamo' if spec.dynamo else 'torchscript'})", unit="model",
              disable=not run.progress, leave=False) as bar:
        for name, model in models:
            bar.set_postfix_str(f"{name}.onnx")
            model.cpu().eval()
            results[name] = export_onnx(model, run.example, run.path(f"{name}.onnx"), dynamo=spec.dynamo,
                                        opset=spec.opset)
            bar.update()
    run.seconds["export"] = time.perf_counter() - started
    return ExportedModels(results["dense"].path, results["masked"].path, results)


@dataclasses.dataclass(frozen=True)
class SlimmedModel:
    path: Path  # slim.onnx
    report: SlimReport
    dense_stats: ModelStats  # params and MACs of dense.onnx at the recipe's input shape


def slim(run: Run, exported: ExportedModels) -> SlimmedModel:
    """Stage 5: ``slim.onnx`` from ``masked.onnx`` (:func:`onnxslim.graph.slim.slim`), exactly equivalent."""
    started = time.perf_counter()
    path = run.path("slim.onnx")
    _, report = slim_onnx(exported.masked, path, input_shapes=run.input_shapes, round_to=run.recipe.slim.round_to,
                          target_device=run.recipe.slim.target_device)
    dense_stats = model_stats(onnx.load(str(exported.dense)), run.input_shapes)
    run.seconds["slim"] = time.perf_counter() - started
    return SlimmedModel(path, report, dense_stats)


@dataclasses.dataclass(frozen=True)
class Validation:
    accuracy: dict[str, AccuracyResult]  # "dense", "masked", "slim" (onnxruntime on the test split)
    max_abs_diff: float  # |PyTorch masked - slim.onnx| over the test split
    max_abs_diff_onnx: float  # |masked.onnx - slim.onnx|
    bench: BenchReport  # latency of dense / masked / slim

    @property
    def timings(self) -> dict[str, Any]:
        return {timing.name: timing for timing in self.bench.models}


def validate(run: Run, trained: TrainedModels, exported: ExportedModels, slimmed: SlimmedModel) -> Validation:
    """Stage 6: accuracy of the three ONNX files, max |PyTorch masked - slimmed ONNX|, latency."""
    started = time.perf_counter()
    val = run.recipe.validate
    paths = {"dense": exported.dense, "masked": exported.masked, "slim": slimmed.path}
    accuracy = {name: evaluate(str(path), run.test_data, batch_size=val.eval_batch_size, progress=run.progress)
                for name, path in paths.items()}
    max_diff, max_diff_onnx = _max_abs_diff(trained.masked, exported.masked, slimmed.path, run.test_data,
                                            val.eval_batch_size)
    bench = benchmark([str(path) for path in paths.values()],
                      BenchOptions(threads=(val.latency_threads,), batch_sizes=(val.latency_batch,),
                                   warmup=val.warmup, repeat=val.repeat, measure_memory=False),
                      progress=run.progress, names=list(paths))
    run.seconds["validate"] = time.perf_counter() - started
    return Validation(accuracy, max_diff, max_diff_onnx, bench)


def report(run: Run, trained: TrainedModels, exported: ExportedModels, slimmed: SlimmedModel,
           validation: Validation) -> RunReport:
    """Stage 7: ``REPORT.json``, ``REPORT.md``, ``slim_report.txt``, ``layers.png``, ``latency.png``."""
    result = _run_report(run, trained, exported, slimmed, validation)
    result.targets = check_targets(run.recipe, result)
    result.targets_met = all(check.ok for check in result.targets)
    name = run.recipe.name
    write_text_atomic(run.path("slim_report.txt"), slimmed.report.format_table() + "\n")
    plot_layer_channels(slimmed.report.layers, run.path("layers.png"), title=f"Channels per layer: {name}")
    plot_latency(validation.bench, run.path("latency.png"), title=f"onnxruntime latency: {name}")
    result.wall_seconds = time.perf_counter() - run.started
    write_report(run.out, Path(REPORT_FILE).stem, result.to_markdown(), result.to_dict())
    return result


def _run_report(run: Run, trained: TrainedModels, exported: ExportedModels, slimmed: SlimmedModel,
                validation: Validation) -> RunReport:
    """The figures of a run (targets not yet checked)."""
    dense, slim_report, accuracy, timings = slimmed.dense_stats, slimmed.report, validation.accuracy, validation.timings
    summary = masked_summary(trained.masked, run.example)
    out = run.out
    return RunReport(
        recipe=run.recipe.to_dict(),
        params_before=dense.params, params_after=slim_report.params_after,
        macs_before=dense.macs, macs_after=slim_report.macs_after,
        accuracy_before=accuracy["dense"].value, accuracy_masked=accuracy["masked"].value,
        accuracy_after=accuracy["slim"].value, accuracy_metric=accuracy["slim"].metric,
        latency_ms_before=timings["dense"].median_ms, latency_ms_masked=timings["masked"].median_ms,
        latency_ms_after=timings["slim"].median_ms,
        max_abs_diff=validation.max_abs_diff, max_abs_diff_onnx=validation.max_abs_diff_onnx,
        params_removed=1.0 - slim_report.params_after / dense.params if dense.params else 0.0,
        macs_removed=1.0 - slim_report.macs_after / dense.macs if dense.macs else 0.0,
        accuracy_drop_pt=100.0 * (accuracy["dense"].value - accuracy["slim"].value),
        masked_channels=slim_report.masked_channels, deleted_masked_channels=slim_report.deleted_masked_channels,
        live_channels={layer.name: [layer.out_live, layer.out_channels] for layer in summary.layers},
        targets=[], targets_met=True, seconds=dict(run.seconds), side_by_side=trained.side_by_side,
        files={"dense_onnx": str(exported.dense), "masked_onnx": str(exported.masked), "slim_onnx": str(slimmed.path),
               "dense_checkpoint": str(out / "dense.pt"), "baseline_checkpoint": str(out / "baseline.pt"),
               "masked_checkpoint": str(out / "masked.pt")},
        torch_accuracy={"dense_start": trained.dense_result.test_metric if trained.dense_result else None,
                        "baseline": trained.baseline_result.test_metric if trained.baseline_result else None,
                        "masked": trained.mask_result.test_metric},
        latency_details={name: {"median_ms": t.median_ms, "p90_ms": t.p90_ms, "threads": t.threads,
                                "batch_size": t.batch_size} for name, t in timings.items()},
        onnx_nodes={layer.module: layer.node for layer in slim_report.layers if layer.module},
    )


def run_recipe(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
               progress: bool = True, device: str | None = None) -> RunReport | None:
    """Run every stage of ``recipe`` into ``out_dir`` and return the report (also written as REPORT.json);
    None on ranks > 0 of a torchrun launch, which only train (:mod:`onnxslim.training.distributed`).

    The same as calling the stage functions one by one::

        run = start_run(recipe, out_dir)
        trained = train(run)
        exported = export(run, trained)
        slimmed = slim(run, exported)
        return report(run, trained, exported, slimmed, validate(run, trained, exported, slimmed))
    """
    run = start_run(recipe, out_dir, resume=resume, overwrite=overwrite, progress=progress, device=device)
    trained = train(run)
    if not DistContext.current().is_main:
        return None
    exported = export(run, trained)
    slimmed = slim(run, exported)
    return report(run, trained, exported, slimmed, validate(run, trained, exported, slimmed))


def check_targets(recipe: Recipe, report: RunReport) -> list[TargetCheck]:
    targets = recipe.targets
    checks = []
    if targets.min_params_removed is not None:
        checks.append(TargetCheck("min_params_removed", targets.min_params_removed, report.params_removed,
                                  report.params_removed >= targets.min_params_removed))
    if targets.min_macs_removed is not None:
        checks.append(TargetCheck("min_macs_removed", targets.min_macs_removed, report.macs_removed,
                                  report.macs_removed >= targets.min_macs_removed))
    if targets.max_accuracy_drop_pt is not None:  # both in percentage points
        drop_pt = report.accuracy_drop_pt
        checks.append(TargetCheck("max_accuracy_drop_pt", targets.max_accuracy_drop_pt, drop_pt,
                                  drop_pt <= targets.max_accuracy_drop_pt + 1e-10))
    if targets.max_abs_diff is not None:
        checks.append(TargetCheck("max_abs_diff", targets.max_abs_diff, report.max_abs_diff,
                                  report.max_abs_diff <= targets.max_abs_diff))
    return checks


def _max_abs_diff(masked: torch.nn.Module, masked_path: Path, slim_path: Path, data: ArrayDataset,
                  batch_size: int) -> tuple[float, float]:
    """Largest |PyTorch masked - slimmed ONNX| and |masked ONNX - slimmed ONNX| over ``data``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    slim_session = ort.InferenceSession(str(slim_path), options, providers=["CPUExecutionProvider"])
    masked_session = ort.InferenceSession(str(masked_path), options, providers=["CPUExecutionProvider"])
    name = slim_session.get_inputs()[0].name
    masked_name = masked_session.get_inputs()[0].name
    worst_torch = worst_onnx = 0.0
    masked.eval()
    with torch.no_grad():
        for images, _ in data.batches(batch_size):
            images = np.ascontiguousarray(images)
            slimmed = slim_session.run(None, {name: images})[0]
            reference = masked(torch.from_numpy(images)).numpy()
            onnx_reference = masked_session.run(None, {masked_name: images})[0]
            worst_torch = max(worst_torch, float(np.max(np.abs(slimmed - reference))))
            worst_onnx = max(worst_onnx, float(np.max(np.abs(slimmed - onnx_reference))))
    return worst_torch, worst_onnx


def read_report(path: str | Path) -> RunReport:
    """Read a run's ``REPORT.json`` (old reports with a fraction ``accuracy_drop`` too: :meth:`RunReport.from_dict`).

    Raises :class:`OnnxSlimError` (one line) for a file that is missing, not JSON, or not a run report.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxSlimError(f"{path}: cannot read a run report ({exc})") from None
    if not isinstance(data, dict):
        raise OnnxSlimError(f"{path}: not an onnxslim run report (a JSON {type(data).__name__})")
    try:
        return RunReport.from_dict(data)
    except OnnxSlimError as exc:
        raise OnnxSlimError(f"{path}: {exc}") from None


def write_summary(report: RunReport, path: str | Path) -> None:
    write_text_atomic(path, report.format_table() + "\n")


__all__ = ["ExportedModels", "PhaseConfig", "Run", "RunReport", "SlimmedModel", "TargetCheck", "TrainedModels",
           "Validation", "check_targets", "export", "load_data", "read_report", "report", "run_recipe", "slim", "start_run", "train",
           "validate"]
