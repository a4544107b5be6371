"""Building blocks shared by the zoo: conv + BN + activation units and width scaling.

Every block is post-activation (``Conv -> BN -> activation``) so that a channel mask placed after the BN
(see :mod:`onnxslim.training.masks`) sends exact zeros through the activation, and modules carry names
(``conv``, ``bn``, ``act``) so that checkpoints and reports are readable.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to a multiple of ``divisor``, never below ``divisor`` (at least 1)."""
    value = max(divisor, int(channels * width + divisor / 2) // divisor * divisor)
    # do not round down by more than 10 % (the usual MobileNet rule)
    if value < 0.9 * channels * width:
        value += divisor
    return max(1, value)


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                groups: int = 1, activation: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """``Conv2d (no bias, 'same' padding) -> BatchNorm2d -> activation`` as a named Sequential."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                               groups=groups, bias=False)
    layers["bn"] = nn.BatchNorm2d(out_channels)
    if activation is not None:
        layers["act"] = activation()
    return nn.Sequential(layers)


def check_positive(name: str, values: dict[str, float]) -> None:
    """Raise :class:`OnnxSlimError` for a non-positive model parameter."""
    from onnxslim.errors import OnnxSlimError

    for key, value in values.items():
        if value <= 0:
            raise OnnxSlimError(f"{name}: {key} must be positive, got {value}")
