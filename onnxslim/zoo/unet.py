"""UNet (Ronneberger et al. 2015) with ConvTranspose upsampling and skip concatenation.

Encoder: ``depth`` levels of ``double conv (conv3x3-BN-ReLU x2) -> maxpool 2``; bottleneck double conv;
decoder: ``ConvTranspose 2x2 stride 2 -> BN -> ReLU``, concatenated with the encoder feature map of the
same size, then a double conv. Channels are ``base * 2**level`` scaled by ``width``; ``input_size`` must
be divisible by ``2**depth``.

``head="segmentation"`` ends with a 1x1 conv giving ``(N, num_classes, H, W)`` logits; ``head="classification"``
pools the last decoder map globally and applies a linear layer, giving ``(N, num_classes)`` — the same
body trainable on the bundled classification data.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.zoo.layers import check_positive, conv_bn_act, scaled


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("unit1", conv_bn_act(in_channels, out_channels)),
                                      ("unit2", conv_bn_act(out_channels, out_channels))]))


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.Sequential(OrderedDict([
            ("conv", nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=False)),
            ("bn", nn.BatchNorm2d(out_channels)),
            ("act", nn.ReLU()),
        ]))
        self.fuse = double_conv(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([skip, self.up(x)], 1))


class UNet(nn.Module):
    def __init__(self, num_classes: int = 2, in_channels: int = 1, input_size: int = 64, width: float = 1.0,
                 depth: int = 4, base: int = 64, head: str = "segmentation"):
        super().__init__()
        check_positive("unet", {"num_classes": num_classes, "in_channels": in_channels, "width": width,
                                "depth": depth, "base": base, "input_size": input_size})
        if input_size % (2 ** depth):
            raise OnnxSlimError(f"unet: input_size {input_size} must be divisible by 2**depth = {2 ** depth}")
        if head not in ("segmentation", "classification"):
            raise OnnxSlimError(f"unet: head must be 'segmentation' or 'classification', got {head!r}")
        widths = [scaled(base * 2 ** level, width) for level in range(depth + 1)]
        self.depth = depth
        self.pool = nn.MaxPool2d(2)
        channels = in_channels
        for level in range(depth):
            self.add_module(f"down{level + 1}", double_conv(channels, widths[level]))
            channels = widths[level]
        self.bottleneck = double_conv(channels, widths[depth])
        channels = widths[depth]
        for level in reversed(range(depth)):
            self.add_module(f"up{level + 1}", UpBlock(channels, widths[level], widths[level]))
            channels = widths[level]
        self.head_type = head
        if head == "segmentation":
            self.head = nn.Conv2d(channels, num_classes, 1)
        else:
            self.head = nn.Sequential(OrderedDict([("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                                                   ("fc", nn.Linear(channels, num_classes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in range(1, self.depth + 1):
            x = getattr(self, f"down{level}")(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for level in reversed(range(1, self.depth + 1)):
            x = getattr(self, f"up{level}")(x, skips[level - 1])
        return self.head(x)


def unet(num_classes: int = 2, in_channels: int = 1, input_size: int = 64, width: float = 1.0, depth: int = 4,
         base: int = 64, head: str = "segmentation") -> UNet:
    return UNet(num_classes, in_channels, input_size, width, depth, base, head)
