"""Model zoo: CNN definitions written for channel-mask training, and a registry.

``get_model(name, params)`` builds a model from a mapping of its builder's explicit keyword parameters
(unknown names are an :class:`~onnxslim.errors.OnnxSlimError`); ``input_shape(name, params)`` gives the
(C, H, W) a model expects. Every builder accepts ``num_classes``, ``in_channels``, ``input_size`` and
``width`` (a channel multiplier, so that tests can use tiny models).

========================  ====================================================================
name                      model
========================  ====================================================================
lenet5                    Caffe LeNet 20-50-500 (optional BN)
vgg16                     CIFAR-style VGG-16 with BN
resnet20/32/56            CIFAR ResNets, identity / 1x1-projection shortcuts
resnet18, resnet50        ImageNet ResNets
mobilenet_v2              inverted residuals, depthwise convolutions
mobilenet_v3_small        + squeeze-excitation, HardSwish, HardSigmoid
densenet                  small post-activation DenseNet-BC
googlenet                 small Inception-v1 style network
unet                      UNet with ConvTranspose upsampling; ``head`` segmentation/classification
mobilenet_v3_small_seg    MobileNetV3-Small backbone + light segmentation head (Resize, skip Concat)
========================  ====================================================================

Hook points for per-structure masks (GAL): each residual block has a ``residual`` submodule (the branch
added to the shortcut) and each Inception module has ``branch1`` .. ``branch4``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.zoo.densenet import densenet
from onnxslim.zoo.inception import googlenet
from onnxslim.zoo.lenet import lenet5
from onnxslim.zoo.mobilenet import mobilenet_v2, mobilenet_v3_small
from onnxslim.zoo.resnet import resnet18, resnet20, resnet32, resnet50, resnet56
from onnxslim.zoo.segmentation import mobilenet_v3_small_seg
from onnxslim.zoo.unet import unet
from onnxslim.zoo.vgg import vgg16

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "vgg16": vgg16,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "densenet": densenet,
    "googlenet": googlenet,
    "unet": unet,
    "mobilenet_v3_small_seg": mobilenet_v3_small_seg,
}


def available_models() -> list[str]:
    return list(MODELS)


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return MODELS[name]
    except KeyError:
        raise OnnxSlimError(f"unknown model {name!r}; available: {', '.join(MODELS)}") from None


def model_parameters(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The builder's defaults updated with ``params``; raises on names the builder does not take."""
    signature = inspect.signature(_builder(name))
    resolved = {key: p.default for key, p in signature.parameters.items()}
    for key, value in (params or {}).items():
        if key not in resolved:
            raise OnnxSlimError(f"model {name!r} has no parameter {key!r}; it takes: {', '.join(resolved)}")
        resolved[key] = tuple(value) if isinstance(value, list) else value
    return resolved


def get_model(name: str, params: Mapping[str, Any] | None = None) -> nn.Module:
    """Build zoo model ``name`` with ``params`` (a mapping of the builder's keyword parameters)."""
    return _builder(name)(**model_parameters(name, params))


def input_shape(name: str, params: Mapping[str, Any] | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one input sample for ``name`` built with ``params``."""
    resolved = model_parameters(name, params)
    return int(resolved["in_channels"]), int(resolved["input_size"]), int(resolved["input_size"])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A zoo model by name and explicit parameters; what checkpoints record to rebuild the model."""

    name: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def build(self) -> nn.Module:
        return get_model(self.name, self.params)

    def input_shape(self) -> tuple[int, int, int]:
        return input_shape(self.name, self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> ModelSpec:
        return cls(str(payload["name"]), dict(payload.get("params", {})))
