"""L1 mask (Yang et al., "Structured Pruning of Convolutional Neural Networks via L1 Regularization",
IEEE Access 2019).

Every filter / hidden neuron gets a mask ``m`` (initialised to 1) multiplying its output. Objective of the
sparse phase::

    min_{W, m}  L_task(W, m) + lam * sum_i |m_i|

trained by SGD with the L1 subgradient ``lam * sign(m)`` (default), or with ``proximal=True`` by a plain
gradient step on ``L_task`` followed by the soft-threshold ``m <- sign(m) * max(|m| - lr_m * lam, 0)``,
which produces exact zeros during training (``lr_m = lr * mask_lr_scale``, the masks' learning rate). Then "zero masks": channel c of a mask is set to 0 when the score of
its filter ``w_c`` falls below ``epsilon``:

* ``criterion="mean"`` — ``|mean(m_c * w_c)|``, the paper's rule as commonly stated;
* ``criterion="mean_abs"`` — ``mean(|m_c * w_c|)``, robust to filters whose signed weights cancel.

For coupled (shared) masks the score is the maximum over the coupled producers. Finally the network is
fine-tuned with masks frozen. Paper defaults: ``epsilon = 0.01``; ``lam = 0.03`` for LeNet-5 and
``0.005`` for VGG-16.

**Distributed (DDP) lockstep.** No state besides parameters: masks and weights are identical on every
rank (DDP all-reduces the gradients, including the L1 subgradient), so the proximal steps and the
zeroing scores are identical; the controller also broadcasts the finalized masks from rank 0.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.training.masks import channel_masks
from onnxslim.training.methods import (
    MaskReport,
    SparsityMethod,
    StepContext,
    default_param_groups,
    l1_of_masks,
    mask_filter_scores,
    register,
    soft_threshold_,
    zero_channels,
)


@dataclasses.dataclass(frozen=True)
class L1MaskParams:
    lam: float = 0.03  # L1 strength on the masks (paper: 0.03 LeNet-5, 0.005 VGG-16)
    epsilon: float = 0.01  # zero a mask entry when its filter score falls below this
    criterion: str = "mean"  # "mean": |mean(m*w)|; "mean_abs": mean(|m*w|)
    proximal: bool = False  # soft-threshold masks after each step instead of the L1 subgradient
    min_channels: int = 1  # never zero the last channels of a mask
    mask_lr_scale: float = 1.0  # learning rate of the masks relative to the weights (1 in the paper)

    def __post_init__(self) -> None:
        if self.lam < 0 or self.epsilon < 0 or self.mask_lr_scale <= 0:
            raise OnnxSlimError("l1_mask: lam and epsilon must be >= 0 and mask_lr_scale > 0")
        if self.criterion not in ("mean", "mean_abs"):
            raise OnnxSlimError(f"l1_mask: criterion must be 'mean' or 'mean_abs', got {self.criterion!r}")


def filter_score(criterion: str):
    def score(mask: torch.Tensor, filters: torch.Tensor, site) -> torch.Tensor:
        product = mask[:, None] * filters
        return product.mean(1).abs() if criterion == "mean" else product.abs().mean(1)

    return score


@register
class L1Mask(SparsityMethod):
    name = "l1_mask"
    Params = L1MaskParams

    def param_groups(self, model: nn.Module, phase) -> list[dict]:
        groups = default_param_groups(model, phase.weight_decay)
        for group in groups:
            if group["name"] == "masks":
                group["lr_scale"] = self.params.mask_lr_scale
        return groups

    def regularization(self, model: nn.Module, ctx: StepContext) -> torch.Tensor | None:
        if self.params.proximal or self.params.lam == 0:
            return None
        return self.params.lam * l1_of_masks(model)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        if self.params.proximal and self.params.lam > 0:
            for mask in channel_masks(model):
                if not mask.frozen:
                    soft_threshold_(mask.weight, ctx.lr * self.params.mask_lr_scale * self.params.lam)

    def finalize_masks(self, model: nn.Module) -> MaskReport:
        scores = mask_filter_scores(model, filter_score(self.params.criterion), combine="max")
        prune = {name: score < self.params.epsilon for name, score in scores.items()}
        return zero_channels(model, prune, self.params.min_channels, scores)
