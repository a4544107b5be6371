"""MobileNetV3-Small with a light segmentation head (LR-ASPP-like, without the sigmoid attention branch).

The backbone is :class:`onnxslim.zoo.mobilenet.MobileNetV3Small`'s ``features`` (stem, 11 inverted
residual blocks, 1x1 head conv), split after ``block1`` — the stride-4 feature map — into ``low`` and
``high`` (stride 32). The head::

    h = Upsample(x8, bilinear)(conv1x1-BN-ReLU(high))          # back to stride 4
    s = conv1x1-BN-ReLU(low)                                    # low-level skip projection
    y = conv3x3-BN-ReLU(concat[h, s])
    logits = Upsample(x4, bilinear)(conv1x1(y))                 # (N, num_classes, H, W)

so the graph exercises Resize, Concat and (in the backbone) depthwise convolutions, squeeze-excitation
and residual additions. ``input_size`` must be divisible by 32. Channel counts scale with ``width``
(head: ``128 * width`` and ``32 * width``, multiples of 8).

The UNet of :mod:`onnxslim.zoo.unet` already has a segmentation head (``head="segmentation"``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.zoo.layers import check_positive, conv_bn_act, scaled
from onnxslim.zoo.mobilenet import MobileNetV3Small

LOW_LEVEL_BLOCKS = 2  # stem and block1: stride 4
OUTPUT_STRIDE = 32


class MobileNetV3SmallSeg(nn.Module):
    def __init__(self, num_classes: int = 11, in_channels: int = 1, input_size: int = 64, width: float = 1.0):
        super().__init__()
        check_positive("mobilenet_v3_small_seg", {"num_classes": num_classes, "in_channels": in_channels,
                                                  "width": width, "input_size": input_size})
        if input_size % OUTPUT_STRIDE:
            raise OnnxSlimError(f"mobilenet_v3_small_seg: input_size {input_size} must be divisible by {OUTPUT_STRIDE}")
        backbone = MobileNetV3Small(num_classes=1, in_channels=in_channels, input_size=input_size, width=width)
        blocks = list(backbone.features.named_children())
        self.low = nn.Sequential(OrderedDict(blocks[:LOW_LEVEL_BLOCKS]))
        self.high = nn.Sequential(OrderedDict(blocks[LOW_LEVEL_BLOCKS:]))
        low_channels = _out_channels(self.low)
        high_channels = _out_channels(self.high)
        head_channels, skip_channels = scaled(128, width, 8), scaled(32, width, 8)
        low_stride = OUTPUT_STRIDE // 4
        self.context = conv_bn_act(high_channels, head_channels, 1)
        self.up_context = nn.Upsample(scale_factor=low_stride, mode="bilinear", align_corners=False)
        self.skip = conv_bn_act(low_channels, skip_channels, 1)
        self.fuse = conv_bn_act(head_channels + skip_channels, head_channels, 3)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.up_logits = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x)
        high = self.high(low)
        context = self.up_context(self.context(high))
        fused = self.fuse(torch.cat([context, self.skip(low)], 1))
        return self.up_logits(self.classifier(fused))


def _out_channels(blocks: nn.Sequential) -> int:
    channels = None
    for module in blocks.modules():
        if isinstance(module, nn.Conv2d):
            channels = module.out_channels
    if channels is None:
        raise OnnxSlimError("backbone part without convolutions")
    return channels


def mobilenet_v3_small_seg(num_classes: int = 11, in_channels: int = 1, input_size: int = 64,
                           width: float = 1.0) -> MobileNetV3SmallSeg:
    return MobileNetV3SmallSeg(num_classes, in_channels, input_size, width)

