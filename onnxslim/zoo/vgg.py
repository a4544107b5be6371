"""VGG-16 for small images (CIFAR style, as in Liu et al. 2017 "network slimming").

Thirteen ``conv 3x3 -> BN -> ReLU`` layers (64,64,M,128,128,M,256x3,M,512x3,M,512x3) scaled by ``width``,
then global average pooling and one linear classifier. Max-pools are skipped once the feature map is
1x1, so any ``input_size`` >= 1 works.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onnxslim.zoo.layers import check_positive, conv_bn_act, scaled

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(nn.Module):
    def __init__(self, layout=VGG16_LAYOUT, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 width: float = 1.0):
        super().__init__()
        check_positive("vgg16", {"num_classes": num_classes, "in_channels": in_channels, "width": width,
                                 "input_size": input_size})
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, size, conv_index, pool_index = in_channels, input_size, 0, 0
        for item in layout:
            if item == "M":
                pool_index += 1
                if size >= 2:
                    layers[f"pool{pool_index}"] = nn.MaxPool2d(2)
                    size //= 2
                continue
            conv_index += 1
            out = scaled(item, width)
            layers[f"block{conv_index}"] = conv_bn_act(channels, out)
            channels = out
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg16(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0) -> VGG:
    return VGG(VGG16_LAYOUT, num_classes, in_channels, input_size, width)
