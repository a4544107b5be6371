"""Network slimming (Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
ICCV 2017), expressed with channel masks.

Sparse phase objective::

    min_W  L_task(W) + lam * sum_{BN channels} |gamma|          (target="bn", the paper)
    min_{W, m}  L_task(W, m) + lam * sum_i |m_i|                 (target="mask")

trained with the L1 subgradient. Zero masks: all scaling factors (|gamma|, or |m|) of maskable channels
are pooled over the whole network and the ``percent`` smallest are pruned (a global percentile
threshold); pruning sets the channel's mask entry to 0, so the same export/slim path applies. A mask
whose sites have no BN (e.g. hidden Linear neurons) is scored by |m| under ``target="mask"`` and left
untouched under ``target="bn"``. For coupled masks the score is the largest |gamma| of the coupled BNs.
At least ``min_channels`` per mask survive. Paper defaults: ``lam = 1e-4`` (CIFAR), pruning 70 %
(VGG-16 on CIFAR-10) — ``percent = 0.7``.

**Distributed (DDP) lockstep.** The criterion reads BN ``gamma`` (a parameter, identical on every rank
since DDP all-reduces its gradient) and the masks, never the running statistics; the global threshold is
computed identically on every rank, and the controller broadcasts the finalized masks from rank 0.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.training.masks import iter_masks
from onnxslim.training.methods import (
    MaskReport,
    SparsityMethod,
    StepContext,
    l1_of_masks,
    register,
    zero_channels,
)


@dataclasses.dataclass(frozen=True)
class BNSlimmingParams:
    lam: float = 1e-4  # L1 strength on the scaling factors
    percent: float = 0.7  # fraction of all scored channels to prune (global percentile)
    target: str = "bn"  # "bn": BN gamma (paper); "mask": the channel masks
    min_channels: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.percent < 1.0:
            raise OnnxSlimError(f"bn_slimming: percent must be in [0, 1), got {self.percent}")
        if self.target not in ("bn", "mask"):
            raise OnnxSlimError(f"bn_slimming: target must be 'bn' or 'mask', got {self.target!r}")
        if self.lam < 0:
            raise OnnxSlimError("bn_slimming: lam must be >= 0")


def _norm_gammas(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for _, mask in iter_masks(model):
        for site in mask.sites:
            if site.norm is not None and site.norm.weight is not None:
                seen.setdefault(id(site.norm.weight), site.norm.weight)
    return list(seen.values())


@register
class BNSlimming(SparsityMethod):
    name = "bn_slimming"
    Params = BNSlimmingParams

    def applicable(self, model: nn.Module) -> str | None:
        if self.params.target == "bn" and not _norm_gammas(model):
            return ("target='bn' scores BatchNorm scales, but no masked layer is followed by a BatchNorm; "
                    "use target = \"mask\" or another method")
        return None

    def regularization(self, model: nn.Module, ctx: StepContext) -> torch.Tensor | None:
        if self.params.lam == 0:
            return None
        if self.params.target == "mask":
            return self.params.lam * l1_of_masks(model)
        gammas = _norm_gammas(model)
        if not gammas:
            raise OnnxSlimError("bn_slimming with target='bn' needs BatchNorm layers after the masked convs")
        return self.params.lam * torch.stack([g.abs().sum() for g in gammas]).sum()

    def channel_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        scores: dict[str, torch.Tensor] = {}
        for name, mask in iter_masks(model):
            if self.params.target == "mask":
                scores[name] = mask.weight.detach().abs()
                continue
            norms = [site.norm.weight.detach().abs() for site in mask.sites
                     if site.norm is not None and site.norm.weight is not None]
            if norms:
                # the mask scales the BN output too: the channel's effective factor is |gamma * m|
                scores[name] = torch.stack(norms).amax(0) * mask.weight.detach().abs()
        return scores

    def finalize_masks(self, model: nn.Module) -> MaskReport:
        scores = self.channel_scores(model)
        if not scores:
            raise OnnxSlimError("bn_slimming: no channel could be scored")
        pooled = torch.cat(list(scores.values()))
        count = int(self.params.percent * pooled.numel())
        if count == 0:
            return zero_channels(model, {}, self.params.min_channels)
        threshold = torch.sort(pooled).values[count - 1]
        prune = {name: score <= threshold for name, score in scores.items()}
        return zero_channels(model, prune, self.params.min_channels, scores)
