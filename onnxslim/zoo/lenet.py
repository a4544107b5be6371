"""LeNet-5 in the Caffe "LeNet 20-50-500" form used by the structured-pruning papers.

``conv 5x5 (20) -> maxpool 2 -> conv 5x5 (50) -> maxpool 2 -> fc 500 -> ReLU -> fc num_classes``
(431,080 parameters at width 1 on 28x28 inputs). Like Caffe's model there is no activation after the
convolutions; ``batch_norm=True`` adds a BatchNorm after each convolution (useful for BN-slimming).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.zoo.layers import check_positive, scaled


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0,
                 batch_norm: bool = False):
        super().__init__()
        check_positive("lenet5", {"num_classes": num_classes, "in_channels": in_channels, "width": width})
        spatial = ((input_size - 4) // 2 - 4) // 2
        if spatial < 1:
            raise OnnxSlimError(f"lenet5: input_size must be at least 16, got {input_size}")
        c1, c2, hidden = scaled(20, width), scaled(50, width), scaled(500, width)
        features: OrderedDict[str, nn.Module] = OrderedDict()
        features["conv1"] = nn.Conv2d(in_channels, c1, 5)
        if batch_norm:
            features["bn1"] = nn.BatchNorm2d(c1)
        features["pool1"] = nn.MaxPool2d(2)
        features["conv2"] = nn.Conv2d(c1, c2, 5)
        if batch_norm:
            features["bn2"] = nn.BatchNorm2d(c2)
        features["pool2"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(features)
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(c2 * spatial * spatial, hidden)),
            ("relu", nn.ReLU()),
            ("fc2", nn.Linear(hidden, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0,
           batch_norm: bool = False) -> LeNet5:
    return LeNet5(num_classes, in_channels, input_size, width, batch_norm)
