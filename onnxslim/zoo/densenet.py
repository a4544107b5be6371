"""A small DenseNet-BC (Huang et al. 2017) in post-activation form.

Each dense layer is ``bottleneck``: ``conv 1x1 (4k) -> BN -> ReLU -> conv 3x3 (k) -> BN -> ReLU`` and its
output is concatenated to its input; transitions are ``conv 1x1 (compression) -> BN -> ReLU -> avgpool 2``.
The paper's pre-activation order (BN-ReLU-conv) is deliberately not used: there a zero channel entering
the next layer's BN becomes BN's shift, so masked channels would not stay zero through the concatenations.
``growth`` (k) and ``blocks`` set the size; ``width`` scales every channel count.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onnxslim.zoo.layers import check_positive, conv_bn_act, scaled


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.bottleneck = nn.Sequential(OrderedDict([
            ("reduce", conv_bn_act(in_channels, 4 * growth, 1)),
            ("conv", conv_bn_act(4 * growth, growth, 3)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.bottleneck(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0,
                 growth: int = 12, blocks: tuple[int, ...] = (4, 4, 4), compression: float = 0.5):
        super().__init__()
        check_positive("densenet", {"num_classes": num_classes, "in_channels": in_channels, "width": width,
                                    "growth": growth, "input_size": input_size})
        growth = scaled(growth, width)
        channels = 2 * growth
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["stem"] = conv_bn_act(in_channels, channels, 3)
        for block_index, count in enumerate(blocks, start=1):
            for layer_index in range(1, count + 1):
                layers[f"dense{block_index}_{layer_index}"] = DenseLayer(channels, growth)
                channels += growth
            if block_index < len(blocks):
                out = max(1, int(channels * compression))
                layers[f"transition{block_index}"] = nn.Sequential(OrderedDict([
                    ("unit", conv_bn_act(channels, out, 1)), ("pool", nn.AvgPool2d(2))]))
                channels = out
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def densenet(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0,
             growth: int = 12, blocks: tuple[int, ...] = (4, 4, 4), compression: float = 0.5) -> DenseNet:
    return DenseNet(num_classes, in_channels, input_size, width, growth, tuple(blocks), compression)
