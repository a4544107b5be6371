"""Mask training inside your own PyTorch loop: :class:`MaskController`.

The controller owns what a sparsity method needs around a training loop that you write — masks,
phases, the method's hooks, step counters, distributed lockstep — and nothing else: you keep your
model, optimizer, data loader, loss, scheduler, logging, AMP. :class:`~onnxslim.training.trainer.Trainer`
is itself a loop over this controller. A loop calls::

    ctl = MaskController(model, "l1_mask", {"lam": 0.015}, example_input=x)   # attaches masks, method setup
    groups = ctl.begin_phase("sparse", lr=0.01, weight_decay=5e-4)            # masks trainable
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    for x, y in loader:
        loss = F.cross_entropy(ctl.net(x), y) + ctl.regularization()          # method's penalty
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        ctl.after_step(optimizer)                                             # proximal / counting hooks
    ctl.end_epoch()                                                           # per-epoch hook
    groups = ctl.begin_phase("finetune", lr=0.01)   # finalize: pruned masks -> exact 0, all masks frozen
    ...                                             # fine-tune as above (regularization() is then 0)
    ctl.export("masked.onnx")                       # masks as per-channel Mul; then onnxslim slim

``ctl.step(x, y, optimizer)`` does a whole default step (forward, loss + regularization, backward,
optimizer step, hooks) and is required by methods that replace the step (``gal``: discriminator, student
and FISTA mask steps). Parameter groups carry each group's ``lr`` (``lr * lr_scale`` of the method, e.g.
``l1_mask``'s ``mask_lr_scale``); the base lr a method sees (``StepContext.lr``) is read back from the
optimizer, so torch schedulers work unchanged.

Distributed (see :mod:`onnxslim.training.distributed`): under torchrun the controller joins nothing
itself — initialise the process group first (``onnxslim.training.distributed.init_from_env``) — and
``begin_phase`` wraps the model in ``DistributedDataParallel``: forward through ``ctl.net`` so that
gradients are averaged; ``end_epoch``/``finalize`` average BatchNorm statistics and keep the method's
state in lockstep; ``export`` writes on rank 0 only. Shard the data with ``DistributedSampler`` and use the
per-rank batch ``B / world_size``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.training.batches import as_source
from onnxslim.training.distributed import DistContext
from onnxslim.training.masks import attach_masks, channel_masks, freeze_masks, has_masks
from onnxslim.training.methods import (
    MaskReport,
    SetupContext,
    SparsityMethod,
    StepContext,
    StepOutput,
    default_param_groups,
    get_method,
)
from onnxslim.training.tasks import Task, get_task, task_for_dataset


class MaskController:
    """Drives one sparsity method through ``sparse`` and ``finetune`` phases of a caller's loop.

    ``model``: an ``nn.Module`` (masks are attached from ``example_input``, one batch (N, C, H, W), unless
    it has them or ``attach=False``); ``method``: a registered name (``l1_mask``, ``bn_slimming``,
    ``l1_norm``, ``ssr_l21``, ``ssr_l20``, ``gal``, ``joint``) with ``params`` (a mapping of its Params
    fields, paper defaults otherwise), or a :class:`SparsityMethod`, or None for plain dense training.
    ``train_data`` (an ArrayDataset, ``(images, labels)`` arrays or a torch Dataset) is needed by methods that
    probe the data (``joint``); ``task`` defaults to the data's (classification otherwise);
    ``reference_model`` is the dense model the method may use as a teacher (``gal``). Raises
    OnnxSlimError for an unknown method, bad params or a phase that needs masks without them.
    """

    def __init__(self, model: nn.Module, method: str | SparsityMethod | None = None,
                 params: Mapping[str, Any] | None = None, *, example_input: torch.Tensor | None = None,
                 train_data: Any = None, task: Task | None = None, reference_model: nn.Module | None = None,
                 device: str | torch.device | None = None, attach: bool = True, dist: DistContext | None = None):
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.dist = dist if dist is not None else DistContext.current()
        self.method = get_method(method, params) if isinstance(method, str) else method
        source = as_source(train_data) if train_data is not None else None
        self.task = task or (task_for_dataset(source) if source is not None else get_task("classification"))
        if example_input is None and source is not None:
            example_input = source.fetch(torch.arange(min(2, len(source))).numpy())[0]
        if attach and self.method is not None and not has_masks(model):
            if example_input is None:
                raise OnnxSlimError("attaching masks needs example_input (one batch the model accepts)")
            attach_masks(model.cpu(), example_input.cpu())
        self.model = model.to(self.device)
        self.example_input = example_input  # the default of export()
        self.phase = None  # the PhaseConfig of the current phase
        self.epoch = self.step_in_phase = self.global_step = 0
        self.finalized = False
        self.finalize_report: MaskReport | None = None
        self.net: nn.Module = self.model  # what to call for the training forward (DDP wrapper when distributed)
        if self.method is not None:
            example = example_input.to(self.device) if example_input is not None else None
            self.method.setup(self.model, SetupContext(source, self.task, self.device, example, reference_model))

    # -- phases ----------------------------------------------------------------------------------------
    def begin_phase(self, phase: Any, *, lr: float | None = None, weight_decay: float = 5e-4) -> list[dict]:
        """Enter ``phase`` (a ``PhaseConfig`` or ``"dense"``, ``"sparse"``, ``"finetune"``) and return the
        optimizer's parameter groups (each with its ``lr`` when ``lr`` is given).

        ``finetune`` first finalizes the masks (once); masks are trainable only in ``sparse``. Under DDP the
        model is (re)wrapped here, since DDP reduces only parameters that require grad when it is built.
        """
        from onnxslim.training.trainer import PhaseConfig

        if isinstance(phase, str):
            phase = PhaseConfig(phase, 0, lr=lr or 0.01, weight_decay=weight_decay)
        if phase.kind in ("sparse", "finetune"):
            if self.method is None:
                raise OnnxSlimError(f"a {phase.kind} phase needs a sparsity method")
            if not has_masks(self.model):
                raise OnnxSlimError(f"a {phase.kind} phase needs a model with channel masks (attach_masks)")
        if phase.kind == "finetune" and not self.finalized:
            self.finalize()
        freeze_masks(self.model, frozen=phase.kind != "sparse")
        groups = self.param_groups(phase)
        self.phase, self.epoch, self.step_in_phase = phase, 0, 0
        self.net = self.dist.wrap(self.model, self.device)
        if lr is not None:
            for group in groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        return groups

    def param_groups(self, phase: Any) -> list[dict]:
        """The method's groups in a sparse phase, weights (with decay) and masks (without) otherwise."""
        if phase.kind == "sparse" and self.method is not None:
            return self.method.param_groups(self.model, phase)
        return default_param_groups(self.model, phase.weight_decay)

    @property
    def sparse(self) -> bool:
        return self.phase is not None and self.phase.kind == "sparse" and self.method is not None

    # -- steps -----------------------------------------------------------------------------------------
    def context(self, optimizer: torch.optim.Optimizer | None, lr: float | None = None) -> StepContext:
        """The :class:`StepContext` of the current step (lr read from ``optimizer`` when not given)."""
        if self.phase is None:
            raise OnnxSlimError("call begin_phase before training steps")
        lr = lr if lr is not None else _base_lr(optimizer, self.phase.lr)
        return StepContext(self.model, self.task, optimizer, self.phase, self.epoch, self.step_in_phase,
                           self.global_step, lr, self.device, self.net, self.dist)

    def regularization(self, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """The method's penalty to add to the loss (a zero tensor outside the sparse phase)."""
        if not self.sparse:
            return torch.zeros((), device=self.device)
        if type(self.method).train_step is not SparsityMethod.train_step:
            raise OnnxSlimError(f"method {self.method.name} replaces the training step: call ctl.step(x, y, optimizer)")
        penalty = self.method.regularization(self.model, self.context(optimizer))
        return penalty if penalty is not None else torch.zeros((), device=self.device)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None, lr: float | None = None) -> None:
        """After ``optimizer.step()``: the method's per-step hook (sparse phase), then the step counters."""
        if self.phase is None:
            raise OnnxSlimError("call begin_phase before training steps")
        if self.sparse:
            self.method.after_step(self.model, self.context(optimizer, lr))
        self.step_in_phase += 1
        self.global_step += 1

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
             lr: float | None = None) -> StepOutput:
        """One whole training step on a batch: the method's own step or forward, task loss +
        regularization, backward, ``optimizer.step()``; then :meth:`after_step`."""
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        ctx = self.context(optimizer, lr)
        result = run_step(self.method if self.sparse else None, ctx, inputs, targets)
        self.after_step(optimizer, ctx.lr)
        return result

    def end_epoch(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """End of an epoch: average BN statistics over ranks, the method's per-epoch hook (sparse phase)."""
        self.dist.sync_norm_statistics(self.model)
        if self.sparse:
            self.method.after_epoch(self.model, self.context(optimizer))
        self.epoch += 1

    # -- the end ---------------------------------------------------------------------------------------
    def finalize(self) -> MaskReport:
        """Zero the pruned channels' masks (the method's ``finalize_masks``) and freeze every mask.

        Under DDP the decisions are rank 0's (mask values broadcast), identical on every rank by construction.
        """
        if self.method is None:
            raise OnnxSlimError("finalize needs a sparsity method")
        self.dist.sync_norm_statistics(self.model)
        self.finalize_report = self.method.finalize_masks(self.model)
        self.dist.broadcast_(mask.weight for mask in channel_masks(self.model))
        freeze_masks(self.model, True)
        self.finalized = True
        dead = self.finalize_report.dead_masks
        if dead and self.dist.is_main:
            warnings.warn(f"{self.method.name} zeroed every channel of {len(dead)} mask(s): {', '.join(dead)}; "
                          f"slim removes those layers whole (a residual branch becomes its bias, an SE gate a "
                          f"constant). If that is not intended, weaken the method (lam, ratio, percent ...)",
                          UserWarning, stacklevel=2)
        return self.finalize_report

    def export(self, path: str | Path, example_input: torch.Tensor | None = None, **options: Any):
        """Rank 0: :func:`onnxslim.training.export.export` of the masked model (eval mode, CPU example) to
        ``path``; other ranks wait and get None. ``example_input`` defaults to the controller's (the one the
        masks were attached from); ``options`` are that function's keywords (``dynamo=False`` ...)."""
        from onnxslim.training.export import export

        result = None
        example_input = example_input if example_input is not None else self.example_input
        if self.dist.is_main:
            if example_input is None:
                raise OnnxSlimError("export needs example_input (one batch the model accepts)")
            result = export(self.model, example_input, path, **options)
        self.dist.barrier()
        return result

    def state_dict(self) -> dict:
        """Method state, counters and the finalize report (the model's own state_dict holds the masks)."""
        return {"method": self.method.state_dict() if self.method is not None else None,
                "finalized": self.finalized,
                "finalize_report": self.finalize_report.to_dict() if self.finalize_report else None,
                "counters": [self.epoch, self.step_in_phase, self.global_step]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.method is not None and state.get("method") is not None:
            self.method.load_state_dict(state["method"])
        self.finalized = bool(state.get("finalized", False))
        report = state.get("finalize_report")
        self.finalize_report = MaskReport.from_dict(report) if report else None
        self.epoch, self.step_in_phase, self.global_step = state.get("counters", [0, 0, 0])


def run_step(method: SparsityMethod | None, ctx: StepContext, inputs: torch.Tensor,
             targets: torch.Tensor) -> StepOutput:
    """The default step (the method's ``train_step`` when it has one); ``method`` None: plain training."""
    if method is not None:
        custom = method.train_step(ctx, inputs, targets)
        if custom is not None:
            return custom
    outputs = ctx.forward_model(inputs)
    loss = ctx.task.loss(outputs, targets)
    total = loss
    if method is not None:
        penalty = method.regularization(ctx.model, ctx)
        if penalty is not None:
            total = loss + penalty
    ctx.optimizer.zero_grad(set_to_none=True)
    total.backward()
    ctx.optimizer.step()
    return StepOutput(float(loss.detach()), outputs)


def _base_lr(optimizer: torch.optim.Optimizer | None, default: float) -> float:
    if optimizer is None or not optimizer.param_groups:
        return default
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


__all__ = ["MaskController", "run_step"]
