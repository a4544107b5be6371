"""A small GoogLeNet (Szegedy et al. 2015) for small images: stem, Inception 3a/3b, pool, 4a/4b, classifier.

Each Inception module concatenates four named branches (the hook points for per-branch structure
masks): ``branch1`` 1x1; ``branch2`` 1x1 -> 3x3; ``branch3`` 1x1 -> 3x3 (the paper's 5x5 branch, as in
Inception-v2); ``branch4`` maxpool 3x3 -> 1x1. Every convolution is ``conv -> BN -> ReLU``; channel counts
are the paper's (table 1) scaled by ``width``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onnxslim.zoo.layers import check_positive, conv_bn_act, scaled

# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) from GoogLeNet table 1
INCEPTION_LAYOUT = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
}


class Inception(nn.Module):
    def __init__(self, in_channels: int, c1: int, c3_reduce: int, c3: int, c5_reduce: int, c5: int, pool_proj: int):
        super().__init__()
        self.branch1 = conv_bn_act(in_channels, c1, 1)
        self.branch2 = nn.Sequential(OrderedDict([("reduce", conv_bn_act(in_channels, c3_reduce, 1)),
                                                  ("conv", conv_bn_act(c3_reduce, c3, 3))]))
        self.branch3 = nn.Sequential(OrderedDict([("reduce", conv_bn_act(in_channels, c5_reduce, 1)),
                                                  ("conv", conv_bn_act(c5_reduce, c5, 3))]))
        self.branch4 = nn.Sequential(OrderedDict([("pool", nn.MaxPool2d(3, 1, 1)),
                                                  ("proj", conv_bn_act(in_channels, pool_proj, 1))]))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0):
        super().__init__()
        check_positive("googlenet", {"num_classes": num_classes, "in_channels": in_channels, "width": width,
                                     "input_size": input_size})
        self.stem = conv_bn_act(in_channels, scaled(192, width), 3)
        channels = scaled(192, width)
        for name in ("3a", "3b", "4a", "4b"):
            module = Inception(channels, *(scaled(c, width) for c in INCEPTION_LAYOUT[name]))
            self.add_module(f"inception{name}", module)
            channels = module.out_channels
        self.pool3 = nn.MaxPool2d(2) if input_size >= 2 else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.inception3b(self.inception3a(x))
        x = self.inception4b(self.inception4a(self.pool3(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def googlenet(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> GoogLeNet:
    return GoogLeNet(num_classes, in_channels, input_size, width)
