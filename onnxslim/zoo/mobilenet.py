"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3-Small (Howard et al. 2019).

Inverted residual blocks are ``expand 1x1 -> depthwise kxk -> [squeeze-excitation] -> project 1x1``,
each convolution followed by BN; blocks with stride 1 and equal channels add their input
(``shortcut(x) + residual(x)``, ``residual`` being a named submodule). Channel counts are scaled by
``width`` and rounded to multiples of 8 as in the papers (the final 1280/1024 features scale too, so that
tiny test models stay tiny).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onnxslim.zoo.layers import check_positive, conv_bn_act, scaled

# (expansion t, output channels c, repeats n, first stride s) from the MobileNetV2 paper, table 2
MOBILENET_V2_LAYOUT = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))

# (kernel, expanded channels, output channels, squeeze-excitation, activation, stride): MobileNetV3-Small, table 2
MOBILENET_V3_SMALL_LAYOUT = (
    (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
)


class SqueezeExcitation(nn.Module):
    """``x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))`` with 1x1 convolutions as the two layers."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, expanded: int, out_channels: int, kernel_size: int, stride: int,
                 activation: type[nn.Module], squeeze_excitation: bool):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expanded != in_channels:
            layers["expand"] = conv_bn_act(in_channels, expanded, 1, activation=activation)
        layers["depthwise"] = conv_bn_act(expanded, expanded, kernel_size, stride, groups=expanded,
                                          activation=activation)
        if squeeze_excitation:
            layers["se"] = SqueezeExcitation(expanded, scaled(expanded / 4, 1.0, 8))
        layers["project"] = conv_bn_act(expanded, out_channels, 1, activation=None)
        self.residual = nn.Sequential(layers)
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_shortcut:
            return x + self.residual(x)
        return self.residual(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, width: float = 1.0,
                 dropout: float = 0.2):
        super().__init__()
        check_positive("mobilenet_v2", {"num_classes": num_classes, "in_channels": in_channels, "width": width,
                                        "input_size": input_size})
        channels = scaled(32, width, 8)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        blocks["stem"] = conv_bn_act(in_channels, channels, 3, 2, activation=nn.ReLU6)
        index = 0
        for t, c, n, s in MOBILENET_V2_LAYOUT:
            out = scaled(c, width, 8)
            for repeat in range(n):
                index += 1
                blocks[f"block{index}"] = InvertedResidual(channels, channels * t, out, 3, s if repeat == 0 else 1,
                                                           nn.ReLU6, False)
                channels = out
        last = scaled(1280, width, 8)
        blocks["head"] = conv_bn_act(channels, last, 1, activation=nn.ReLU6)
        self.features = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(OrderedDict([("dropout", nn.Dropout(dropout)),
                                                     ("fc", nn.Linear(last, num_classes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, width: float = 1.0,
                 dropout: float = 0.2):
        super().__init__()
        check_positive("mobilenet_v3_small", {"num_classes": num_classes, "in_channels": in_channels,
                                              "width": width, "input_size": input_size})
        channels = scaled(16, width, 8)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        blocks["stem"] = conv_bn_act(in_channels, channels, 3, 2, activation=nn.Hardswish)
        for index, (k, exp, out, se, act, s) in enumerate(MOBILENET_V3_SMALL_LAYOUT, start=1):
            activation = nn.Hardswish if act == "HS" else nn.ReLU
            expanded, out = scaled(exp, width, 8), scaled(out, width, 8)
            blocks[f"block{index}"] = InvertedResidual(channels, expanded, out, k, s, activation, se)
            channels = out
        last = scaled(576, width, 8)
        blocks["head"] = conv_bn_act(channels, last, 1, activation=nn.Hardswish)
        self.features = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(1024, width, 8)
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(last, hidden)), ("act", nn.Hardswish()), ("dropout", nn.Dropout(dropout)),
            ("fc2", nn.Linear(hidden, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, width: float = 1.0,
                 dropout: float = 0.2) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, input_size, width, dropout)


def mobilenet_v3_small(num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, width: float = 1.0,
                       dropout: float = 0.2) -> MobileNetV3Small:
    return MobileNetV3Small(num_classes, in_channels, input_size, width, dropout)
