"""ResNets: CIFAR-style ResNet-20/32/56 (He et al. 2016, sec. 4.2) and ImageNet-style ResNet-18/50.

Every block computes ``relu(residual(x) + shortcut(x))`` with two named submodules:

* ``residual`` — the residual branch (``conv-BN-ReLU-conv-BN`` or the bottleneck's three convs). It is
  the hook point for per-block structure masks (GAL multiplies this branch by one learnable scalar).
* ``shortcut`` — ``nn.Identity`` when shapes match, otherwise ``1x1 conv (stride) -> BN`` (option B).
  Option A's zero-padded shortcut is not offered: a padded shortcut would leave the added channels
  without a common mask, whereas identity/projection shortcuts make the channels of every addition in a
  stage share one mask (see :mod:`onnxslim.training.coupling`).

``width`` scales every channel count (16/32/64 for CIFAR, 64..512 for ImageNet at width 1).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.zoo.layers import check_positive, conv_bn_act, scaled


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)),
        ("bn", nn.BatchNorm2d(out_channels)),
    ]))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.residual = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)),
            ("bn1", nn.BatchNorm2d(channels)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(channels, channels, 3, 1, 1, bias=False)),
            ("bn2", nn.BatchNorm2d(channels)),
        ]))
        self.shortcut = _projection(in_channels, channels, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out = channels * self.expansion
        self.residual = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, channels, 1, bias=False)),
            ("bn1", nn.BatchNorm2d(channels)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(channels, channels, 3, stride, 1, bias=False)),
            ("bn2", nn.BatchNorm2d(channels)),
            ("relu2", nn.ReLU()),
            ("conv3", nn.Conv2d(channels, out, 1, bias=False)),
            ("bn3", nn.BatchNorm2d(out)),
        ]))
        self.shortcut = _projection(in_channels, out, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, then one ``nn.Sequential`` of blocks per stage (``stage1`` ...), global pooling, classifier."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks_per_stage: tuple[int, ...],
                 stage_channels: tuple[int, ...], stem: nn.Module, stem_channels: int, num_classes: int):
        super().__init__()
        self.stem = stem
        channels = stem_channels
        for index, (count, width) in enumerate(zip(blocks_per_stage, stage_channels), start=1):
            blocks = []
            for block_index in range(count):
                stride = 2 if index > 1 and block_index == 0 else 1
                blocks.append(block(channels, width, stride))
                channels = width * block.expansion
            self.add_module(f"stage{index}", nn.Sequential(*blocks))
        self.num_stages = len(blocks_per_stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{index}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_cifar(depth: int = 20, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 width: float = 1.0) -> ResNet:
    """ResNet-``depth`` for 32x32 images: ``depth = 6n + 2`` (20, 32, 56, 110 ...), stages of 16/32/64."""
    check_positive("resnet_cifar", {"num_classes": num_classes, "in_channels": in_channels, "width": width,
                                    "input_size": input_size})
    if (depth - 2) % 6 != 0 or depth < 8:
        raise OnnxSlimError(f"resnet_cifar: depth must be 6n+2 (20, 32, 56, ...), got {depth}")
    n = (depth - 2) // 6
    base = scaled(16, width)
    stem = conv_bn_act(in_channels, base)
    return ResNet(BasicBlock, (n, n, n), (base, scaled(32, width), scaled(64, width)), stem, base, num_classes)


def resnet20(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> ResNet:
    return resnet_cifar(20, num_classes, in_channels, input_size, width)


def resnet32(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> ResNet:
    return resnet_cifar(32, num_classes, in_channels, input_size, width)


def resnet56(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> ResNet:
    return resnet_cifar(56, num_classes, in_channels, input_size, width)


def _imagenet_stem(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(in_channels, channels, 7, 2, 3, bias=False)),
        ("bn", nn.BatchNorm2d(channels)),
        ("act", nn.ReLU()),
        ("pool", nn.MaxPool2d(3, 2, 1)),
    ]))


def _resnet_imagenet(block, blocks_per_stage, num_classes, in_channels, input_size, width) -> ResNet:
    check_positive("resnet", {"num_classes": num_classes, "in_channels": in_channels, "width": width,
                              "input_size": input_size})
    base = scaled(64, width)
    stages = tuple(scaled(c, width) for c in (64, 128, 256, 512))
    return ResNet(block, blocks_per_stage, stages, _imagenet_stem(in_channels, base), base, num_classes)


def resnet18(num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, width: float = 1.0) -> ResNet:
    """ImageNet ResNet-18 (basic blocks 2-2-2-2); ``width`` scales the 64..512 channels."""
    return _resnet_imagenet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, input_size, width)


def resnet50(num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, width: float = 1.0) -> ResNet:
    """ImageNet ResNet-50 (bottlenecks 3-4-6-3, expansion 4); ``width`` scales the 64..512 channels."""
    return _resnet_imagenet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, input_size, width)
