"""Sparsity methods: how masks (and weights) are trained so that whole channels become exactly zero.

A method is a subclass of :class:`SparsityMethod` in its own module of this package, decorated with
:func:`register`; :func:`get_method` finds it by name (modules here are discovered automatically, so a
new method is one new file). Its hyper-parameters are a frozen dataclass ``Params`` whose defaults are
the paper's.

The trainer (:mod:`onnxslim.training.trainer`) runs phases ``dense -> sparse -> finetune`` and calls the
method's hooks; everything a hook may need is passed in, methods keep no global state:

======================================  ============================================================
hook                                    when / what
======================================  ============================================================
``setup(model, ctx: SetupContext)``     once, before any optimizer is built or a checkpoint is
                                        loaded: may add modules (e.g. structure masks) or build
                                        auxiliary state (teacher, discriminator, ADMM variables).
                                        ``ctx`` holds the training data, task, device, an example
                                        input and the dense reference model (if any).
``param_groups(model, phase)``          parameter groups for the trainer's optimizer in the sparse
                                        phase; default: weights with the phase's weight decay, masks
                                        without. A group's ``lr_scale`` multiplies the scheduled lr.
                                        Return a subset to own some parameters (e.g. GAL's FISTA
                                        updates masks itself). Dense/finetune phases use the default.
``regularization(model, ctx)``          sparse phase, default step: a scalar added to the task loss
                                        (or None). ``ctx`` is the :class:`StepContext`.
``train_step(ctx, inputs, targets)``    sparse phase: return a :class:`StepOutput` to replace the
                                        default step (forward, loss + regularization, backward,
                                        optimizer step) entirely, or None to use it (GAL: D and G
                                        steps; joint methods: alternating updates).
``after_step(model, ctx)``              after every sparse-phase step: proximal/soft-threshold
                                        updates, ADMM F/Y updates every K iterations.
``after_epoch(model, ctx)``             after every sparse-phase epoch.
``finalize_masks(model) -> report``     between sparse and fine-tune ("zero masks"): set the mask
                                        entries of pruned channels to exactly 0. The trainer then
                                        freezes all masks, so zeros stay zero while fine-tuning.
``state_dict() / load_state_dict(s)``   the method's own state (ADMM variables, discriminator and
                                        its optimizer, ...) saved in every checkpoint.
======================================  ============================================================

The default step is ``loss = task.loss(model(x), y) + regularization``, ``backward``, ``optimizer.step``,
``after_step``; ``Trainer.step(ctx, x, y)`` runs exactly that (or the method's ``train_step``) and
``Trainer.optimizer_for(phase)`` builds the phase's optimizer, for tools that drive single steps.
In eager training mode masks are applied through the BN affine parameters / producer weights
(:class:`~onnxslim.training.masks.MaskedSite`); graphs traced in any mode see explicit ``Mul`` nodes.

:class:`StepContext` carries ``model, task, optimizer, phase, epoch, step (within the phase),
global_step, lr, device`` — enough for lr-scaled proximal steps and every-K-iterations schedules — and
``forward_model`` (call it for a training forward: the ``DistributedDataParallel`` wrapper under DDP) and
``dist`` (:class:`~onnxslim.training.distributed.DistContext`).

**Distributed lockstep.** Under DDP every rank runs every hook on its own shard of the batch. Gradients
(``.grad`` after ``backward``) are averaged over ranks by DDP, so weights and masks stay identical; any
other state a hook keeps or decides from must be identical on every rank too: compute it from
parameters/gradients, or ``ctx.dist.all_reduce_mean_`` / ``ctx.dist.broadcast_`` it (no-ops with one
process). BatchNorm running statistics are averaged by the controller at epoch ends and before
``finalize_masks``; a hook that probes the model in eval mode calls ``ctx.dist.sync_norm_statistics``
first. Each method's docstring says what it does.

Helpers for methods: :func:`mask_filter_scores` (per mask, per channel, a score over all coupled
producers), :func:`zero_lowest` (set a channel set to zero keeping at least ``min_channels`` per mask),
:func:`soft_threshold_` (the L1 proximal operator), :func:`params_from_mapping` (recipe tables to Params).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.training.distributed import DistContext
from onnxslim.training.masks import ChannelMask, MaskSite, iter_masks

_REGISTRY: dict[str, type[SparsityMethod]] = {}


@dataclasses.dataclass
class SetupContext:
    train_data: Any  # onnxslim.data.ArrayDataset
    task: Any  # onnxslim.training.tasks.Task
    device: torch.device
    example_input: torch.Tensor
    reference_model: nn.Module | None = None  # the dense model mask training started from, when known


@dataclasses.dataclass
class StepContext:
    model: nn.Module
    task: Any
    optimizer: torch.optim.Optimizer
    phase: Any  # onnxslim.training.trainer.PhaseConfig
    epoch: int  # 0-based within the phase
    step: int  # 0-based within the phase
    global_step: int  # 0-based over all phases of the run
    lr: float  # the learning rate used for this step
    device: torch.device
    forward_model: nn.Module | None = None  # what to call for the training forward: the DDP wrapper under DDP
    dist: DistContext = dataclasses.field(default_factory=DistContext)  # ranks; collectives for lockstep state

    def __post_init__(self) -> None:
        if self.forward_model is None:
            self.forward_model = self.model


@dataclasses.dataclass
class StepOutput:
    loss: float  # the task loss of the batch (for progress and history)
    outputs: torch.Tensor | None = None  # model outputs (for the running train metric), optional
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MaskReport:
    """What ``finalize_masks`` did: zero channels per mask (by first name) and in total."""

    per_mask: dict[str, tuple[int, int]]  # name -> (live channels, channels)
    zeroed: int  # entries set to zero by this call
    zero_total: int  # zero entries after the call
    channels: int

    @property
    def dead_masks(self) -> list[str]:
        """Masks with every channel zero: their layers' outputs (and what only they feed) go from the graph."""
        return [name for name, (live, channels) in self.per_mask.items() if live == 0 and channels > 0]

    def format_table(self) -> str:
        """One line per mask, ``name  live / channels``, then the totals."""
        width = max((len(name) for name in self.per_mask), default=4)
        lines = [f"{name:<{width}}  {live} / {channels} live" for name, (live, channels) in self.per_mask.items()]
        return "\n".join([*lines, f"zero channels: {self.zero_total} of {self.channels}"])

    def to_dict(self) -> dict:
        return {"per_mask": {k: list(v) for k, v in self.per_mask.items()}, "zeroed": self.zeroed,
                "zero_total": self.zero_total, "channels": self.channels}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MaskReport:
        return cls({k: tuple(v) for k, v in data["per_mask"].items()}, data["zeroed"], data["zero_total"],
                   data["channels"])


@dataclasses.dataclass(frozen=True)
class NoParams:
    pass


class SparsityMethod:
    """Base class: every hook is a no-op; ``finalize_masks`` only reports."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise OnnxSlimError(f"method {self.name}: params must be {self.Params.__name__}")

    # -- lifecycle -------------------------------------------------------------------------------------
    def applicable(self, model: nn.Module) -> str | None:
        """Why this method cannot train ``model`` (masks attached), or None when it can; asked before
        any training so that a run never fails after its dense phase."""
        return None

    def setup(self, model: nn.Module, ctx: SetupContext) -> None:
        pass

    def param_groups(self, model: nn.Module, phase: Any) -> list[dict]:
        return default_param_groups(model, phase.weight_decay)

    def regularization(self, model: nn.Module, ctx: StepContext) -> torch.Tensor | None:
        return None

    def train_step(self, ctx: StepContext, inputs: torch.Tensor, targets: torch.Tensor) -> StepOutput | None:
        return None

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        pass

    def after_epoch(self, model: nn.Module, ctx: StepContext) -> None:
        pass

    def finalize_masks(self, model: nn.Module) -> MaskReport:
        return mask_report(model, zeroed=0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "params": dataclasses.asdict(self.params)}


# ----------------------------------------------------------------------------------------------------
# registry


def register(cls: type[SparsityMethod]) -> type[SparsityMethod]:
    """Class decorator: make ``cls`` available to :func:`get_method` under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty 'name'")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available_methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[SparsityMethod]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OnnxSlimError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def get_method(name: str, params: Mapping[str, Any] | Any | None = None) -> SparsityMethod:
    """Instantiate method ``name``; ``params`` is its Params instance or a mapping of Params fields."""
    cls = method_class(name)
    if params is None or isinstance(params, cls.Params):
        return cls(params)
    return cls(params_from_mapping(cls.Params, params, f"method {name}"))


def params_from_mapping(cls: type, values: Mapping[str, Any], what: str) -> Any:
    """Build frozen dataclass ``cls`` from ``values``; unknown keys and wrong types are one-line errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise OnnxSlimError(f"{what}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    converted = {}
    for key, value in values.items():
        default = getattr(cls(), key) if _has_default(fields[key]) else None
        converted[key] = _coerce(value, default, f"{what}: {key}")
    try:
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        raise OnnxSlimError(f"{what}: {exc}") from None


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def _coerce(value: Any, default: Any, what: str) -> Any:
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise OnnxSlimError(f"{what} must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(default, str) and isinstance(value, str):
        return value
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    raise OnnxSlimError(f"{what} must be a {type(default).__name__}, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# helpers shared by methods


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable weights with ``weight_decay``; trainable masks in their own group without decay."""
    mask_ids = {id(mask.weight) for _, mask in iter_masks(model)}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in mask_ids]
    masks = [p for p in model.parameters() if p.requires_grad and id(p) in mask_ids]
    groups = [{"params": weights, "weight_decay": weight_decay, "name": "weights"}]
    if masks:
        groups.append({"params": masks, "weight_decay": 0.0, "name": "masks"})
    return groups


def site_filters(site: MaskSite) -> torch.Tensor:
    """The producer's weights as (out_channels, fan_in): one row per output channel (filter / neuron)."""
    weight = site.producer.weight.detach()
    if isinstance(site.producer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1)


def mask_filter_scores(model: nn.Module, score: Callable[[torch.Tensor, torch.Tensor, MaskSite], torch.Tensor],
                       combine: str = "max") -> dict[str, torch.Tensor]:
    """Per mask name, a (C,) score: ``score(mask weight, filters (C, fan_in), site)`` combined over the
    mask's sites (coupled producers) by ``max`` or ``sum``."""
    scores: dict[str, torch.Tensor] = {}
    for name, mask in iter_masks(model):
        per_site = [score(mask.weight.detach(), site_filters(site), site) for site in mask.sites]
        if not per_site:
            continue
        stacked = torch.stack(per_site)
        scores[name] = stacked.amax(0) if combine == "max" else stacked.sum(0)
    return scores


def zero_channels(model: nn.Module, prune: Mapping[str, torch.Tensor], min_channels: int = 1,
                  scores: Mapping[str, torch.Tensor] | None = None) -> MaskReport:
    """Set mask entries to 0 where ``prune[name]`` (bool (C,)) is true, keeping at least ``min_channels``
    live channels per mask (those with the highest ``scores``, else the largest |mask|)."""
    zeroed = 0
    with torch.no_grad():
        for name, mask in iter_masks(model):
            if name not in prune:
                continue
            keep = ~prune[name].to(mask.weight.device) & mask.live()
            if int(keep.sum()) < min_channels:
                ranking = scores[name] if scores is not None and name in scores else mask.weight.detach().abs()
                ranking = torch.where(mask.live(), ranking.to(mask.weight.device), torch.full_like(ranking, -1.0))
                top = torch.topk(ranking, min(min_channels, mask.channels)).indices
                keep[top] = True
            before = mask.live_count()
            mask.weight.copy_(torch.where(keep, mask.weight, torch.zeros_like(mask.weight)))
            zeroed += before - mask.live_count()
    return mask_report(model, zeroed)


def mask_report(model: nn.Module, zeroed: int) -> MaskReport:
    per_mask = {name: (mask.live_count(), mask.channels) for name, mask in iter_masks(model)}
    channels = sum(total for _, total in per_mask.values())
    return MaskReport(per_mask, zeroed, channels - sum(live for live, _ in per_mask.values()), channels)


def soft_threshold_(tensor: torch.Tensor, threshold: float) -> None:
    """In place: ``t <- sign(t) * max(|t| - threshold, 0)`` (the proximal operator of threshold*|t|)."""
    with torch.no_grad():
        tensor.copy_(torch.nn.functional.softshrink(tensor, threshold))


def l1_of_masks(model: nn.Module) -> torch.Tensor:
    """Sum of |m| over every distinct mask entry (shared masks counted once)."""
    terms = [mask.weight.abs().sum() for _, mask in iter_masks(model)]
    if not terms:
        raise OnnxSlimError("the model has no channel masks (attach_masks first)")
    return torch.stack(terms).sum()


__all__ = [
    "ChannelMask", "MaskReport", "SetupContext", "SparsityMethod", "StepContext", "StepOutput", "available_methods",
    "default_param_groups", "get_method", "l1_of_masks", "mask_filter_scores", "mask_report", "method_class",
    "params_from_mapping", "register", "site_filters", "soft_threshold_", "zero_channels",
]
