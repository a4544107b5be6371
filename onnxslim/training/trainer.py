"""Training in phases — ``dense``, ``sparse``, ``finetune`` — with per-epoch atomic checkpoints and resume.

* ``dense``: plain training of the task loss; masks (if any) are frozen at their values.
* ``sparse``: masks trainable; the sparsity method's hooks run (regularisation added to the loss, or its
  own train step; ``after_step``/``after_epoch``).
* ``finetune``: on entry the method's ``finalize_masks`` zeroes the pruned channels (once), then every
  mask is frozen and the model is trained on the task loss alone, so zeros stay zero.

Each phase builds a fresh optimizer (SGD with momentum/Nesterov or Adam) with the method's parameter
groups; the learning rate follows ``schedule`` per step within the phase (``constant``, ``cosine`` to 0
or ``step``: x0.1 at 50 % and 75 %).

Determinism: epoch ``e`` of phase ``p`` shuffles with ``numpy.random.default_rng([seed, p, e])`` and
seeds torch with a value derived from the same triple, so an interrupted run resumed from its last
checkpoint gives the same weights as an uninterrupted one (on the same device and thread count).

Distributed (``torchrun``, :mod:`onnxslim.training.distributed`): ``batch_size`` is the global batch;
each of ``W`` ranks trains on ``B / W`` samples of it (:func:`onnxslim.training.batches.epoch_indices`,
DistributedSampler's sharding of the same permutation), DDP averages the gradients, and rank 0 alone
evaluates (the result is broadcast) and writes checkpoints. Compared with one process on the same global
batch, the result is close but not bit-exact: BatchNorm normalises each rank's ``B / W`` samples with their
own batch statistics (DDP has no cross-rank BN on the CPU), and float sums are taken in another order.
A checkpoint (``torch.save``, written atomically) holds the model state (masks included), optimizer,
method state, phase/epoch position, history and the RNG states; ``extra`` lets callers store e.g. the
model spec to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from onnxslim.errors import OnnxSlimError
from onnxslim.io import atomic_open
from onnxslim.training.batches import as_source, epoch_indices, iterate, per_rank_batch, rank_batches
from onnxslim.training.batches import steps_per_epoch as steps_per_epoch_of
from onnxslim.training.controller import MaskController, run_step
from onnxslim.training.distributed import DistContext
from onnxslim.training.masks import freeze_masks, has_masks
from onnxslim.training.methods import (
    MaskReport,
    SparsityMethod,
    StepContext,
    StepOutput,
    mask_report,
)
from onnxslim.training.tasks import Task, task_for_dataset

CHECKPOINT_FORMAT = "onnxslim-checkpoint/1"
# what resuming reads from a checkpoint
_RESUME_KEYS = ("phases", "phase_index", "epoch", "model", "seed", "batch_size", "method_name", "history",
                "finalized", "torch_rng")
PHASE_KINDS = ("dense", "sparse", "finetune")


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    kind: str  # "dense", "sparse" or "finetune"
    epochs: int
    lr: float = 0.01
    optimizer: str = "sgd"  # "sgd" or "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "constant", "cosine" or "step"

    def __post_init__(self) -> None:
        if self.kind not in PHASE_KINDS:
            raise OnnxSlimError(f"unknown phase kind {self.kind!r}; use one of {', '.join(PHASE_KINDS)}")
        if self.epochs < 0:
            raise OnnxSlimError(f"{self.kind} phase: epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0:
            raise OnnxSlimError(f"{self.kind} phase: lr must be positive, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise OnnxSlimError(f"{self.kind} phase: optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine", "step"):
            raise OnnxSlimError(f"{self.kind} phase: schedule must be constant, cosine or step, got {self.schedule!r}")

    def lr_at(self, step: int, total_steps: int) -> float:
        progress = step / max(1, total_steps)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return self.lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
        return self.lr


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    evaluate_every_epoch: bool = True
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise OnnxSlimError(f"batch size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass
class EpochRecord:
    phase: int
    kind: str
    epoch: int  # 1-based within the phase
    train_loss: float
    train_metric: float
    test_metric: float | None
    lr: float
    seconds: float
    live_channels: int | None


@dataclasses.dataclass
class TrainResult:
    history: list[EpochRecord]
    test_metric: float | None
    metric_name: str
    finalize: MaskReport | None
    seconds: float

    def to_dict(self) -> dict:
        return {"history": [dataclasses.asdict(r) for r in self.history], "test_metric": self.test_metric,
                "metric_name": self.metric_name, "finalize": self.finalize.to_dict() if self.finalize else None,
                "seconds": self.seconds}


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OnnxSlimError(f"unknown device {name!r} (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OnnxSlimError("device 'cuda' requested but CUDA is not available")
    return device


def _epoch_seed(seed: int, phase: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, phase, epoch]).integers(0, 2 ** 62))


class Trainer:
    """Trains ``model`` on ``train_data`` through a list of phases (see the module docstring): a loop over
    :class:`~onnxslim.training.controller.MaskController`, which runs the method's hooks.

    ``train_data``: an ArrayDataset, ``(images, labels)`` arrays or a map-style torch Dataset of
    ``(input, target)`` pairs; ``options.batch_size`` is the global batch (split over DDP ranks).
    ``method`` is required for ``sparse``/``finetune`` phases. ``checkpoint`` (a path) is written after
    every epoch (by rank 0); ``fit(phases, resume=True)`` continues from it when it exists, with any
    number of processes. ``dist`` defaults to the initialised process group (one process otherwise).
    """

    def __init__(self, model: nn.Module, train_data: Any, *, test_data: Any = None,
                 task: Task | None = None, method: SparsityMethod | None = None,
                 options: TrainOptions = TrainOptions(), checkpoint: str | Path | None = None,
                 extra: Mapping[str, Any] | None = None, reference_model: nn.Module | None = None,
                 dist: DistContext | None = None):
        self.source = as_source(train_data)
        if len(self.source) == 0:
            raise OnnxSlimError(f"{self.source.name}: no training samples")
        self.dist = dist if dist is not None else DistContext.current()
        per_rank_batch(options.batch_size, self.dist.world_size)
        self.device = resolve_device(options.device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.test_data = test_data
        self.task = task or task_for_dataset(self.source)
        self.method = method
        self.options = options
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.extra = dict(extra or {})
        self.reference_model = reference_model
        self.history: list[EpochRecord] = []
        self._controller: MaskController | None = None

    @property
    def controller(self) -> MaskController:
        """The controller of this run (created on first use: the method's ``setup`` runs then)."""
        if self._controller is None:
            self._controller = MaskController(self.model, self.method, train_data=self.source, task=self.task,
                                              reference_model=self.reference_model, device=self.device,
                                              attach=False, dist=self.dist)
        return self._controller

    @property
    def finalize_report(self) -> MaskReport | None:
        return self.controller.finalize_report if self._controller is not None else None

    # -- public ----------------------------------------------------------------------------------------
    def fit(self, phases: Sequence[PhaseConfig], resume: bool = False) -> TrainResult:
        phases = list(phases)
        for phase in phases:
            if phase.kind in ("sparse", "finetune") and self.method is None:
                raise OnnxSlimError(f"a {phase.kind} phase needs a sparsity method")
            if phase.kind in ("sparse", "finetune") and not has_masks(self.model):
                raise OnnxSlimError(f"a {phase.kind} phase needs a model with channel masks (attach_masks)")
        started = time.perf_counter()
        self.controller  # noqa: B018 — the method's setup, before a checkpoint restores its state
        position = (0, 0)  # (phase index, completed epochs in it)
        state = None
        if resume and self.checkpoint is not None:
            state = self.dist.on_main(lambda: self._read_checkpoint(phases))
            if state is not None:
                self._restore(state)
                position = (state["phase_index"], state["epoch"])
        for index, phase in enumerate(phases):
            if index < position[0]:
                continue
            start_epoch = position[1] if index == position[0] else 0
            self._run_phase(index, phase, phases, start_epoch, state if index == position[0] else None)
        if phases:  # also when every phase was restored from a completed checkpoint
            freeze_masks(self.model, frozen=phases[-1].kind != "sparse")
        test_metric = self.evaluate(self.test_data) if self.test_data is not None else None
        return TrainResult(self.history, test_metric, self.task.metric_name, self.finalize_report,
                           time.perf_counter() - started)

    def evaluate(self, dataset: Any) -> float:
        """The task metric of the model (eval mode) on ``dataset`` (computed by rank 0, given to all ranks:
        every rank must call it)."""
        return self.dist.on_main(lambda: self._evaluate(as_source(dataset)))

    def _evaluate(self, source) -> float:
        metric = self.task.new_metric()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for inputs, targets in iterate(source, self.options.eval_batch_size):
                    metric.update(self.model(inputs.to(self.device)), targets.to(self.device))
        finally:
            self.model.train(was_training)
        return metric.compute()

    # -- phases ----------------------------------------------------------------------------------------
    def _run_phase(self, index: int, phase: PhaseConfig, phases: list[PhaseConfig], start_epoch: int,
                   state: dict | None) -> None:
        optimizer = _make_optimizer(phase, self.controller.begin_phase(phase))
        if state is not None and state.get("optimizer") is not None and start_epoch > 0:
            optimizer.load_state_dict(state["optimizer"])
        if start_epoch >= phase.epochs:
            return
        steps_per_epoch = steps_per_epoch_of(len(self.source), self.options.batch_size, self.dist.world_size)
        total_steps = steps_per_epoch * phase.epochs
        global_offset = sum(p.epochs for p in phases[:index]) * steps_per_epoch
        for epoch in range(start_epoch, phase.epochs):
            record = self._run_epoch(index, phase, optimizer, epoch, steps_per_epoch, total_steps, global_offset)
            self.history.append(record)
            if self.checkpoint is not None and self.dist.is_main:
                self._save_checkpoint(phases, index, epoch + 1, optimizer)

    def _run_epoch(self, index, phase, optimizer, epoch, steps_per_epoch, total_steps, global_offset) -> EpochRecord:
        seed, ctl, dist = self.options.seed, self.controller, self.dist
        torch.manual_seed(_epoch_seed(seed, index, epoch) + dist.rank)  # per-rank dropout; rank 0 as one process
        indices = epoch_indices(len(self.source), seed, index, epoch, dist.rank, dist.world_size)
        ctl.epoch, ctl.step_in_phase = epoch, epoch * steps_per_epoch
        ctl.global_step = global_offset + ctl.step_in_phase
        self.model.train()
        metric = self.task.new_metric()
        started = time.perf_counter()
        loss_sum, batches, lr = 0.0, 0, phase.lr
        bar = tqdm(rank_batches(indices, per_rank_batch(self.options.batch_size, dist.world_size)),
                   desc=f"{phase.kind} {epoch + 1}/{phase.epochs}", leave=False,
                   disable=not self.options.progress or not dist.is_main, unit="batch")
        for batch_index, chosen in enumerate(bar):
            lr = phase.lr_at(epoch * steps_per_epoch + batch_index, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            inputs, targets = (t.to(self.device) for t in self.source.fetch(chosen))
            result = ctl.step(inputs, targets, optimizer, lr)
            if not math.isfinite(result.loss):
                raise OnnxSlimError(f"{phase.kind} phase, epoch {epoch + 1}: the loss is {result.loss} "
                                    f"(training diverged; lower the learning rate)")
            loss_sum += result.loss
            batches += 1
            if result.outputs is not None:
                metric.update(result.outputs.detach(), targets)
            if batch_index % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / batches:.4f}")
        bar.close()
        ctl.end_epoch(optimizer)
        loss_sum, batches = dist.all_reduce_sum([loss_sum, batches])
        test_metric = None
        if self.options.evaluate_every_epoch and self.test_data is not None:
            test_metric = self.evaluate(self.test_data)
        live = None
        if has_masks(self.model):
            report = mask_report(self.model, 0)
            live = report.channels - report.zero_total
        return EpochRecord(index, phase.kind, epoch + 1, loss_sum / max(1, batches), metric.compute(), test_metric, lr,
                           time.perf_counter() - started, live)

    def optimizer_for(self, phase: PhaseConfig) -> torch.optim.Optimizer:
        """The optimizer ``fit`` builds for ``phase`` (the method's parameter groups in a sparse phase)."""
        return _make_optimizer(phase, self.controller.param_groups(phase))

    def step(self, ctx: StepContext, inputs: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        """One training step on a batch, exactly as ``fit`` runs it (method hooks included)."""
        sparse = ctx.phase.kind == "sparse" and self.method is not None
        result = run_step(self.method if sparse else None, ctx, inputs, targets)
        if sparse:
            self.method.after_step(self.model, ctx)
        return result

    # -- checkpoints -----------------------------------------------------------------------------------
    def _save_checkpoint(self, phases, index: int, epoch: int, optimizer) -> None:
        ctl = self.controller
        payload = {
            "format": CHECKPOINT_FORMAT,
            "phases": [dataclasses.asdict(p) for p in phases],
            "phase_index": index if epoch < phases[index].epochs else index + 1,
            "epoch": epoch if epoch < phases[index].epochs else 0,
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict() if epoch < phases[index].epochs else None,
            "method_name": self.method.name if self.method is not None else None,
            "method_params": dataclasses.asdict(self.method.params) if self.method is not None else None,
            "method_state": self.method.state_dict() if self.method is not None else None,
            "finalized": ctl.finalized,
            "finalize_report": ctl.finalize_report.to_dict() if ctl.finalize_report else None,
            "history": [dataclasses.asdict(r) for r in self.history],
            "torch_rng": torch.get_rng_state(),
            "seed": self.options.seed,
            "batch_size": self.options.batch_size,  # global: the same for any number of processes
            "world_size": self.dist.world_size,  # informative only
            "masked": has_masks(self.model),
            "completed": index == len(phases) - 1 and epoch >= phases[index].epochs,
            "extra": self.extra,
        }
        with atomic_open(self.checkpoint) as handle:  # a Python file: a full disk is an OSError, not a C++ one
            torch.save(payload, handle)

    def _read_checkpoint(self, phases: list[PhaseConfig]) -> dict | None:
        """Rank 0: the checkpoint to resume from, checked against this run (None when there is none)."""
        if not self.checkpoint.exists():
            return None
        state = load_checkpoint(self.checkpoint)
        missing = [key for key in _RESUME_KEYS if key not in state]
        if missing:
            raise OnnxSlimError(f"{self.checkpoint}: incomplete checkpoint (no {', '.join(missing)}); remove it or "
                                f"run without --resume")
        if state["phases"] != [dataclasses.asdict(p) for p in phases]:
            raise OnnxSlimError(f"{self.checkpoint}: written for different phases; remove it or run without --resume")
        if state["seed"] != self.options.seed or state["batch_size"] != self.options.batch_size:
            raise OnnxSlimError(f"{self.checkpoint}: written with another seed or batch size")
        method_name = self.method.name if self.method is not None else None
        if state["method_name"] != method_name:
            raise OnnxSlimError(f"{self.checkpoint}: written for method {state['method_name']}, not {method_name}")
        return state

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise OnnxSlimError(f"{self.checkpoint}: does not fit this model ({str(exc).splitlines()[0]})") from None
        ctl = self.controller
        if self.method is not None and state.get("method_state") is not None:
            self.method.load_state_dict(state["method_state"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        ctl.finalized = bool(state["finalized"])
        if state.get("finalize_report"):
            ctl.finalize_report = MaskReport.from_dict(state["finalize_report"])
        torch.set_rng_state(state["torch_rng"])


def load_checkpoint(path: str | Path) -> dict:
    """Read a trainer checkpoint (any device's tensors are mapped to the CPU).

    Loaded with ``torch.load(weights_only=True)``: only tensors and plain containers/scalars are
    unpickled, so a crafted file can never run code. Raises :class:`OnnxSlimError` when the file is
    missing, unreadable, holds any other object, or is not an onnxslim checkpoint.
    """
    import pickle
    import warnings

    path = Path(path)
    if not path.exists():
        raise OnnxSlimError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise OnnxSlimError(f"checkpoint {path} is a directory")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused: never fall back to full unpickling
        refused = _refused_global(exc)
        if refused is None:
            raise OnnxSlimError(f"{path}: not a readable checkpoint (UnpicklingError)") from None
        raise OnnxSlimError(f"{path}: refusing to load a checkpoint holding objects other than tensors and "
                            f"plain values ({refused})") from None
    except Exception as exc:  # torch.load raises zip/runtime/EOF errors
        raise OnnxSlimError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise OnnxSlimError(f"{path}: not an onnxslim checkpoint")
    return state


def _refused_global(exc: BaseException) -> str | None:
    """The line of torch's weights_only message naming the refused global (None: the file is garbage)."""
    named = [line.strip().rstrip(".") for line in str(exc).splitlines() if "GLOBAL" in line]
    return named[0] if named else None


def _make_optimizer(phase: PhaseConfig, groups: list[dict]) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise OnnxSlimError(f"{phase.kind} phase: nothing to train")
    if phase.optimizer == "adam":
        return torch.optim.Adam(groups, lr=phase.lr)
    return torch.optim.SGD(groups, lr=phase.lr, momentum=phase.momentum, nesterov=phase.nesterov and phase.momentum > 0)


def model_from_checkpoint(path: str | Path, model_name: str | None = None,
                          params: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a trainer checkpoint was written for and load its weights (eval mode, CPU).

    The zoo model comes from the checkpoint's ``extra["model_spec"]`` unless ``model_name`` (and
    ``params``) are given; channel masks (and structure masks, when saved) are attached first when the
    checkpoint holds a masked model.
    Returns the model and the checkpoint dict.
    """
    from onnxslim.training.masks import attach_masks
    from onnxslim.training.structure import restore_structure_masks
    from onnxslim.zoo import ModelSpec

    state = load_checkpoint(path)
    recorded = state.get("extra", {}).get("model_spec")
    if model_name is not None:
        spec = ModelSpec(model_name, dict(params or {}), ModelSpec.from_dict(recorded).sample_shape if recorded else None)
    elif recorded is not None:
        spec = ModelSpec.from_dict(recorded)  # a zoo name, or a factory (a user's model) imported and called
        if params:
            spec = dataclasses.replace(spec, params={**spec.params, **params})
    else:
        raise OnnxSlimError(f"{path}: the checkpoint does not record its model; pass the model name")
    model = spec.build()
    if state.get("masked"):
        example = torch.zeros((2, *spec.input_shape()))
        attach_masks(model, example)
        restore_structure_masks(model, state["model"], example)  # GAL's per-block / per-branch scalars
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise OnnxSlimError(f"{path}: weights do not fit model {spec.name} ({str(exc).splitlines()[0]})") from None
    state.setdefault("extra", {})["model_spec"] = spec.to_dict()
    return model.eval(), state
