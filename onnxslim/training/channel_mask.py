"""The channel mask module: one learnable scale per channel (see :mod:`onnxslim.training.masks`).

Kept apart from ``masks.py`` so that :mod:`onnxslim.training.coupling` can treat a ``ChannelMask`` as one
traced call without importing the code that attaches masks (which itself uses the coupling analysis).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError


@dataclasses.dataclass
class MaskSite:
    """Where a mask applies: after ``norm`` (the producer's BN) or after ``producer`` when there is no BN."""

    producer_name: str
    producer: nn.Module  # Conv2d / ConvTranspose2d / Linear
    norm: nn.Module | None
    kind: str  # "conv", "depthwise", "conv_transpose", "linear"


class ChannelMask(nn.Module):
    """One learnable scale per channel; ``sites`` lists the producers it masks (several when coupled)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.sites: list[MaskSite] = []

    @property
    def channels(self) -> int:
        return self.weight.numel()

    @property
    def frozen(self) -> bool:
        return not self.weight.requires_grad

    def live(self) -> torch.Tensor:
        """Boolean (C,): channels whose mask is not exactly zero."""
        return self.weight.detach() != 0

    def live_count(self) -> int:
        return int(self.live().sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.weight.numel():
            raise OnnxSlimError(f"mask of {self.weight.numel()} channels applied to a tensor of shape {tuple(x.shape)}")
        return x * self.weight.view([1, -1] + [1] * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, live={self.live_count()}, sites={len(self.sites)}"
