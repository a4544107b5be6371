"""L1-norm filter ranking (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017), with masks.

No sparsity regulariser: the sparse phase (if any epochs are given) is plain training. Zero masks: every
filter / neuron c is scored by the L1 norm of its weights ``s_c = sum |w_c|`` (summed over coupled
producers, as Li et al. do for the layers tied by residual additions) and

* ``scope="layer"`` — in every mask the ``ratio`` smallest-norm channels are pruned (the paper);
* ``scope="global"`` — scores are divided by the filter size (``mean |w_c|``) and the ``ratio`` smallest
  over the network are pruned.

``skip_coupled=True`` leaves masks shared by several producers alone (Li et al. prune only the first
layer of each residual block). Pruned channels get mask 0; the network is then fine-tuned with frozen
masks. Paper default for the per-layer ratio varies by layer; ``ratio = 0.5`` is used here.

**Distributed (DDP) lockstep.** Scores are weight norms (identical on every rank under DDP); the
controller broadcasts the finalized masks from rank 0.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.training.masks import iter_masks
from onnxslim.training.methods import MaskReport, SparsityMethod, mask_filter_scores, register, zero_channels


@dataclasses.dataclass(frozen=True)
class L1NormParams:
    ratio: float = 0.5  # fraction of channels to prune (per layer or globally)
    scope: str = "layer"  # "layer" or "global"
    skip_coupled: bool = False  # do not prune masks shared by several producers
    min_channels: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise OnnxSlimError(f"l1_norm: ratio must be in [0, 1), got {self.ratio}")
        if self.scope not in ("layer", "global"):
            raise OnnxSlimError(f"l1_norm: scope must be 'layer' or 'global', got {self.scope!r}")


@register
class L1Norm(SparsityMethod):
    name = "l1_norm"
    Params = L1NormParams

    def finalize_masks(self, model: nn.Module) -> MaskReport:
        normalise = self.params.scope == "global"

        def score(mask: torch.Tensor, filters: torch.Tensor, site) -> torch.Tensor:
            norms = filters.abs().sum(1) * mask.abs()
            return norms / filters.shape[1] if normalise else norms

        scores = mask_filter_scores(model, score, combine="sum")
        if self.params.skip_coupled:
            shared = {name for name, mask in iter_masks(model) if len(mask.sites) > 1}
            scores = {name: s for name, s in scores.items() if name not in shared}
        if not scores:
            return zero_channels(model, {}, self.params.min_channels)
        prune: dict[str, torch.Tensor] = {}
        if self.params.scope == "layer":
            for name, s in scores.items():
                count = int(self.params.ratio * s.numel())
                prune[name] = torch.zeros_like(s, dtype=torch.bool)
                if count:
                    prune[name][torch.argsort(s)[:count]] = True
        else:
            pooled = torch.cat(list(scores.values()))
            count = int(self.params.ratio * pooled.numel())
            if count == 0:
                return zero_channels(model, {}, self.params.min_channels)
            threshold = torch.sort(pooled).values[count - 1]
            prune = {name: s <= threshold for name, s in scores.items()}
        return zero_channels(model, prune, self.params.min_channels, scores)
