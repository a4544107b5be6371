"""GAL: generative adversarial learning of a sparse soft mask (Lin et al., "Towards Optimal Structured CNN
Pruning via Generative Adversarial Learning", CVPR 2019).

A frozen baseline ``f_b`` (the teacher: the dense reference model, or a snapshot of the model when the
sparse phase starts) and a student ``f_g(W, m)`` initialised from it. The soft mask ``m >= 0`` is the
student's per-channel masks ``m_c`` (:mod:`onnxslim.training.masks`) **and** one scalar ``m_s`` per
structure — residual branch or Inception branch (:mod:`onnxslim.training.structure`). ``f`` is the
network's output (the logits of the final layer, as in the paper; an output with spatial axes is averaged
over them), and a discriminator ``D`` (a small MLP on ``f``, one logit) tells baseline outputs ("real")
from student outputs ("fake"). The objective is::

    min_{W, m} max_D   E[log D(f_b(x))] + E[log(1 - D(f_g(x)))]           (adversarial)
                     + mu * MSE(f_b(x), f_g(x))                           (data term, no labels)
                     + lam_channel * ||m_c||_1 + lam_structure * ||m_s||_1 (sparsity)
                     + R(W) + R(D)                                         (weight decay)

and, as the paper's adversarial regulariser on D (and the authors' code), ``R_adv(D) = -E[log D(f_g(x))]``
added to D's loss so that D does not overpower the student. The paper has one ``lambda`` per experiment
because each prunes one kind of structure (blocks of ResNet-56: 0.6 / 0.8; channels of VGG-16: 1e-3); here
both kinds are learned at once, each with its own weight. Every iteration of the sparse phase
(:meth:`GAL.train_step`), with ``BCE`` the binary cross-entropy on D's logit:

1. **D step** (SGD, momentum ``d_momentum``, weight decay ``d_weight_decay``, lr ``lr * d_lr_scale``)::

       L_D = BCE(D(f_b), 1) + BCE(D(f_g), 0) + adversarial_regularization * BCE(D(f_g), 1)

2. **Student weight step** (the trainer's optimizer and the phase's lr / weight decay; masks excluded)::

       L_G = mu * MSE(f_b, f_g) + BCE(D(f_g), 1)          (the L1 terms have no gradient in W)

3. **Mask step** every ``mask_step`` iterations: FISTA (Beck & Teboulle) on ``L_G + sum lam_i |m_i|``
   with step ``eta = lr * mask_lr_scale``, the gradient ``g`` of ``L_G`` at the current masks (one
   forward per iteration, as in the authors' code), ``t_0 = 1`` and ``m_{-1} = m_0``::

       t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2
       y_k     = m_k + ((t_k - 1) / t_{k+1}) (m_k - m_{k-1})
       m_{k+1} = max(S_{eta*lam_i}(y_k - eta * g), 0),   S_a(v) = sign(v) max(|v| - a, 0)

   The soft-threshold produces exact zeros and the clamp keeps every scale non-negative. A channel mask
   never loses its last ``min_channels`` live entries (they keep their previous value).
   ``fista_restart_epochs`` resets the momentum (``t = 1``) every so many sparse epochs (default never,
   which is what the authors' code does in effect with its mask step of 200).

The teacher normalises with batch statistics like the student in training mode (``teacher_batch_stats``;
its running statistics are not changed, dropout stays off), so the data term compares like with like —
with the teacher in eval mode the student learns a different function than the one it is evaluated with
(measured on a small ResNet-20: 94.5 % -> 82 % after one epoch with lam = 0, against 93.9 %).

Then ``finalize_masks`` sets entries ``<= threshold`` to exactly 0 (``threshold = 0``: FISTA's zeros
are already exact), freezes the structure scales, and folds non-zero structure scales into their
branch's last layer (:func:`~onnxslim.training.structure.fold_structure_scales`); the trainer freezes the
channel masks and fine-tunes the weights with labels. Labels are never used while the masks are learned.

Paper defaults (``Params``): ``lam_structure = 0.6`` (ResNet-56 GAL-0.6; 0.8 for GAL-0.8),
``lam_channel = 1e-3`` (VGG-16), ``mu = 1`` (VGG-16: 0.1), SGD lr 0.01 and momentum 0.9 for student,
masks and D, weight decay 2e-4, a mask step every 200 iterations. Reported: ResNet-56 / CIFAR-10,
GAL-0.6: -37.6 % FLOPs, -11.8 % params, 93.38 % top-1 (baseline 93.26 %).

Caveat: a channel mask followed by a conv and a BatchNorm is scale-invariant (the BN undoes a common
factor), so its data gradient only redistributes and the L1 term shrinks the whole group until the BN's
epsilon matters; the number of channels that survive then changes steeply with ``lam_channel``. Structure
scales sit before an addition / concatenation and do not have this problem.

**Distributed (DDP) lockstep.** The student's forward goes through the DDP wrapper, so the gradients
of weights, channel masks and structure scales are all-reduced (averaged) by DDP, and the FISTA steps —
computed from those gradients and identical parameters — are identical on every rank. D starts from the
same seed on every rank and its gradients are **all-reduced** (averaged) before each D step, so D and its
optimizer stay identical. The teacher is a copy of identical weights. The controller broadcasts the
finalized masks from rank 0.

Deviations from the authors' code: their loss also back-propagates ``lambda * ||m||_1`` into the mask
gradient before the FISTA proximal step, which applies the L1 shrinkage twice (use ``2 * lambda`` here to
match it); their D is three linear layers without activations and 128 outputs, ours an MLP with
LeakyReLU(0.2) and one logit; their teacher runs in training mode (batch statistics, as here).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.training.masks import ChannelMask, channel_masks, iter_masks
from onnxslim.training.methods import (
    MaskReport,
    SetupContext,
    SparsityMethod,
    StepContext,
    StepOutput,
    register,
    zero_channels,
)
from onnxslim.training.structure import (
    attach_structure_masks,
    fold_structure_scales,
    freeze_structure_masks,
    has_structure_masks,
    structure_masks,
)


@dataclasses.dataclass(frozen=True)
class GALParams:
    lam_structure: float = 0.6  # L1 weight of the structure scales (paper, ResNet-56 blocks: 0.6 / 0.8)
    lam_channel: float = 1e-3  # L1 weight of the channel masks (paper, VGG-16 channels: 1e-3)
    mu: float = 1.0  # weight of the data term MSE(f_b, f_g) (paper: 1; VGG-16 0.1)
    mask_step: int = 200  # FISTA mask update every this many iterations (authors' code: 200)
    mask_lr_scale: float = 1.0  # FISTA step = lr * mask_lr_scale (paper: the same lr as the weights)
    structure_masks: bool = True  # add one scale per residual / Inception branch (setup)
    adversarial_regularization: float = 1.0  # weight of R_adv(D) = BCE(D(f_g), 1) in D's loss
    d_lr_scale: float = 1.0  # D's learning rate relative to the phase's (paper: equal, 0.01)
    d_momentum: float = 0.9
    d_weight_decay: float = 2e-4  # R(D) (paper: 2e-4)
    d_hidden: tuple[int, ...] = (128, 256, 128)  # D's hidden widths (authors' code)
    d_seed: int = 0  # D's initialisation
    fista_restart_epochs: int = 0  # reset FISTA momentum every N sparse epochs (0: never)
    threshold: float = 0.0  # finalize: mask entries <= threshold become 0 (authors' --thre: 0)
    min_channels: int = 1  # a channel mask keeps at least this many live entries
    teacher_batch_stats: bool = True  # the teacher's BN layers use batch statistics, like the student's
    fold_structures: bool = True  # finalize: fold non-zero structure scales into the branch's last layer

    def __post_init__(self) -> None:
        if min(self.lam_structure, self.lam_channel, self.mu, self.adversarial_regularization, self.threshold) < 0:
            raise OnnxSlimError("gal: lam_structure, lam_channel, mu, adversarial_regularization and threshold "
                                "must be >= 0")
        if self.mask_step < 1 or self.mask_lr_scale <= 0 or self.d_lr_scale <= 0:
            raise OnnxSlimError("gal: mask_step must be >= 1, mask_lr_scale and d_lr_scale > 0")
        if self.d_weight_decay < 0 or not 0 <= self.d_momentum < 1 or self.fista_restart_epochs < 0:
            raise OnnxSlimError("gal: d_weight_decay >= 0, 0 <= d_momentum < 1, fista_restart_epochs >= 0")
        if self.min_channels < 0 or any(w < 1 for w in self.d_hidden):
            raise OnnxSlimError("gal: min_channels >= 0 and d_hidden widths >= 1")


class Discriminator(nn.Module):
    """MLP ``features -> hidden (LeakyReLU 0.2) ... -> 1 logit``; weights N(0, 0.01), biases 0."""

    def __init__(self, features: int, hidden: tuple[int, ...], seed: int = 0):
        super().__init__()
        widths = [features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        layers.append(nn.Linear(widths[-1], 1))
        self.body = nn.Sequential(*layers)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.body:
                if isinstance(layer, nn.Linear):
                    layer.weight.normal_(0.0, 0.01, generator=generator)
                    layer.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)


class Fista:
    """FISTA with a non-negative L1 proximal step on a list of tensors (module docstring, step 3).

    ``step(params, eta, lams)`` reads each parameter's ``.grad`` (a missing gradient counts as zero);
    ``lams`` is the L1 weight of each parameter.
    """

    def __init__(self) -> None:
        self.t = 1.0
        self.previous: list[torch.Tensor] | None = None

    def restart(self) -> None:
        self.t = 1.0
        self.previous = None

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], eta: float, lams: list[float], min_live: list[int] | None = None) -> None:
        if self.previous is not None and [p.shape for p in self.previous] != [p.shape for p in params]:
            self.restart()
        current = [p.detach().clone() for p in params]
        if self.previous is None:
            t_next, momentum = 1.0, 0.0
        else:
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * self.t * self.t)) / 2.0
            momentum = (self.t - 1.0) / t_next
        for index, (param, now, lam) in enumerate(zip(params, current, lams)):
            y = now if self.previous is None else now + momentum * (now - self.previous[index].to(now.device))
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            update = y - eta * grad
            update = torch.sign(update) * torch.clamp(update.abs() - eta * lam, min=0.0)
            update = torch.clamp(update, min=0.0)
            keep = min_live[index] if min_live is not None else 0
            if keep and int((update != 0).sum()) < min(keep, int((now != 0).sum())):
                # never empty a layer: its largest previous entries keep their value
                top = torch.topk(now.reshape(-1), min(keep, now.numel())).indices
                flat = update.reshape(-1)
                flat[top] = torch.where(flat[top] != 0, flat[top], now.reshape(-1)[top])
                update = flat.reshape(update.shape)
            param.copy_(update)
        self.previous = current
        self.t = t_next

    def state_dict(self) -> dict:
        return {"t": self.t, "previous": [p.cpu() for p in self.previous] if self.previous is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t = float(state["t"])
        self.previous = [p.clone() for p in state["previous"]] if state["previous"] is not None else None


def output_features(outputs: torch.Tensor) -> torch.Tensor:
    """``f``: the network output as (N, K) — logits as they are, spatial outputs averaged over space."""
    if outputs.dim() < 2:
        raise OnnxSlimError(f"gal: the model output must be (N, K, ...), got shape {tuple(outputs.shape)}")
    return outputs.flatten(2).mean(2) if outputs.dim() > 2 else outputs


@register
class GAL(SparsityMethod):
    name = "gal"
    Params = GALParams

    def __init__(self, params: GALParams | None = None):
        super().__init__(params)
        self.teacher: nn.Module | None = None
        self.owns_teacher = False
        self.discriminator: Discriminator | None = None
        self.d_optimizer: torch.optim.Optimizer | None = None
        self.fista = Fista()
        self._student: nn.Module | None = None
        self._device = torch.device("cpu")

    # -- lifecycle -------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: SetupContext) -> None:
        if not any(True for _ in iter_masks(model)):
            raise OnnxSlimError("gal: the model has no channel masks (attach_masks first)")
        if self.params.structure_masks and not has_structure_masks(model):
            attach_structure_masks(model, ctx.example_input)
            model.to(ctx.device)  # the new scales are created on the CPU
        freeze_structure_masks(model, True)  # trained only in the sparse phase (param_groups releases them)
        self._student = model
        self._device = ctx.device
        if ctx.reference_model is not None:
            self.teacher = self._frozen_copy(ctx.reference_model)
            self.owns_teacher = False
        was_training = model.training
        model.eval()
        with torch.no_grad():
            features = output_features(model(ctx.example_input.to(ctx.device))).shape[1]
        model.train(was_training)
        self.discriminator = Discriminator(features, tuple(self.params.d_hidden), self.params.d_seed).to(ctx.device)
        self.d_optimizer = torch.optim.SGD(self.discriminator.parameters(), lr=0.01, momentum=self.params.d_momentum,
                                           weight_decay=self.params.d_weight_decay)

    def param_groups(self, model: nn.Module, phase) -> list[dict]:
        freeze_structure_masks(model, False)  # they need gradients; FISTA (not the optimizer) updates them
        masks = {id(p) for p in self.mask_parameters(model)}
        weights = [p for p in model.parameters() if p.requires_grad and id(p) not in masks]
        return [{"params": weights, "weight_decay": phase.weight_decay, "name": "weights"}]

    def train_step(self, ctx: StepContext, inputs: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        model, hp = ctx.model, self.params
        if self.teacher is None:  # no reference model: the model as the sparse phase starts is the baseline
            self.teacher = self._frozen_copy(model)
            self.owns_teacher = True
        if self.discriminator is None or self.d_optimizer is None:
            raise OnnxSlimError("gal: setup was not run")
        with torch.no_grad():
            teacher_features = output_features(self.teacher(inputs))
        outputs = ctx.forward_model(inputs)  # the DDP wrapper under DDP: weight and mask gradients are averaged
        student_features = output_features(outputs)

        # 1. discriminator
        disc = self.discriminator
        disc.train()
        disc.requires_grad_(True)
        for group in self.d_optimizer.param_groups:
            group["lr"] = ctx.lr * hp.d_lr_scale
        real = disc(teacher_features)
        fake = disc(student_features.detach())
        d_loss = _bce(real, 1.0) + _bce(fake, 0.0)
        if hp.adversarial_regularization:
            d_loss = d_loss + hp.adversarial_regularization * _bce(fake, 1.0)
        self.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        ctx.dist.all_reduce_mean_(p.grad for p in disc.parameters())  # D in lockstep over ranks
        self.d_optimizer.step()

        # 2. student weights (and mask gradients)
        disc.requires_grad_(False)
        data_loss = hp.mu * F.mse_loss(student_features, teacher_features)
        adv_loss = _bce(disc(student_features), 1.0)
        masks = self.mask_parameters(model)
        for mask in masks:
            mask.grad = None
        ctx.optimizer.zero_grad(set_to_none=True)
        (data_loss + adv_loss).backward()
        ctx.optimizer.step()

        # 3. masks: FISTA every mask_step iterations
        if (ctx.step + 1) % hp.mask_step == 0:
            owners = self._mask_owners(model)
            channel = [isinstance(owner, ChannelMask) for owner in owners]
            lams = [hp.lam_channel if is_channel else hp.lam_structure for is_channel in channel]
            min_live = [hp.min_channels if is_channel else 0 for is_channel in channel]
            self.fista.step(masks, ctx.lr * hp.mask_lr_scale, lams, min_live)
        for mask in masks:
            mask.grad = None

        with torch.no_grad():
            task_loss = float(ctx.task.loss(outputs.detach(), targets))  # reported only, never back-propagated
            l1 = float(sum(m.detach().abs().sum() for m in masks)) if masks else 0.0
        return StepOutput(task_loss, outputs.detach(), {"d_loss": float(d_loss.detach()),
                                                        "data_loss": float(data_loss.detach()),
                                                        "adv_loss": float(adv_loss.detach()), "l1": l1})

    def after_epoch(self, model: nn.Module, ctx: StepContext) -> None:
        every = self.params.fista_restart_epochs
        if every and (ctx.epoch + 1) % every == 0:
            self.fista.restart()

    def finalize_masks(self, model: nn.Module) -> MaskReport:
        threshold = self.params.threshold
        prune = {name: mask.weight.detach() <= threshold for name, mask in iter_masks(model)}
        report = zero_channels(model, prune, self.params.min_channels)
        with torch.no_grad():
            for mask in structure_masks(model):
                if mask.value <= threshold:
                    mask.weight.fill_(0.0)
        freeze_structure_masks(model, True)
        if self.params.fold_structures:
            fold_structure_scales(model)
        return report

    def state_dict(self) -> dict:
        return {
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
            "d_optimizer": self.d_optimizer.state_dict() if self.d_optimizer is not None else None,
            "fista": self.fista.state_dict(),
            "teacher": self.teacher.state_dict() if self.owns_teacher and self.teacher is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("discriminator") is not None:
            if self.discriminator is None:
                raise OnnxSlimError("gal: load_state_dict before setup")
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.fista.load_state_dict(state["fista"])
        if state.get("teacher") is not None:
            if self._student is None:
                raise OnnxSlimError("gal: load_state_dict before setup")
            self.teacher = self._frozen_copy(self._student)
            self.teacher.load_state_dict(state["teacher"])
            self.owns_teacher = True

    # -- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
        """The soft mask ``m``: every channel mask, then every structure scale (a fixed order)."""
        return [mask.weight for mask in channel_masks(model)] + [mask.weight for mask in structure_masks(model)]

    @staticmethod
    def _mask_owners(model: nn.Module) -> list[nn.Module]:
        return [*channel_masks(model), *structure_masks(model)]

    def _frozen_copy(self, model: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(model).to(self._device).eval()
        teacher.requires_grad_(False)
        if self.params.teacher_batch_stats:
            # normalise with the batch's statistics, as the student in training mode does; momentum 0
            # keeps the running statistics as they are
            for module in teacher.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
                    module.momentum = 0.0
        return teacher


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
