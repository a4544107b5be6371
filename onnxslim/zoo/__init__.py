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

**Your own model.** Wherever a zoo name is accepted (recipes' ``[model] name``, ``--model``), a factory
``"package.module:attribute"`` is too: an importable ``torch.nn.Module`` subclass, or a function
annotated ``-> torch.nn.Module`` (or a subclass), called with the recipe's ``params`` as keyword
arguments. The annotation is required so that a checkpoint, which records the factory to be rebuilt by
``export``, can only name a model builder, never an arbitrary function. Its input shape comes from
``in_channels``/``input_size`` parameters when it has them, else from ``input_shape = [C, H, W]``.
"""

from __future__ import annotations

import dataclasses
import importlib
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


def is_factory(name: str) -> bool:
    """True for ``"package.module:attribute"`` (a user's model factory), False for zoo names."""
    return ":" in name


def load_factory(name: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:attribute"``: a ``nn.Module`` subclass or a function annotated ``-> nn.Module``.

    Raises :class:`OnnxSlimError` when the module cannot be imported, the attribute is missing, or it
    is neither (see the module docstring for why the annotation is required).
    """
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise OnnxSlimError(f"model factory {name!r}: write it as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise OnnxSlimError(f"model factory {name!r}: cannot import {exc.name!r} (is its folder on PYTHONPATH?)") \
            from None
    except Exception as exc:  # the user's module raised while importing
        raise OnnxSlimError(f"model factory {name!r}: importing {module_name} failed: "
                            f"{type(exc).__name__}: {exc}") from None
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise OnnxSlimError(f"model factory {name!r}: {module_name} has no attribute {attribute!r}")
    if not _builds_module(target):
        raise OnnxSlimError(f"model factory {name!r} must be a torch.nn.Module subclass or a function annotated "
                            f"'-> torch.nn.Module'")
    return target


def _builds_module(target: Any) -> bool:
    if inspect.isclass(target):
        return issubclass(target, nn.Module)
    if not inspect.isfunction(target):
        return False
    try:
        returns = inspect.signature(target, eval_str=True).return_annotation
    except Exception:  # an annotation that does not evaluate
        return False
    return inspect.isclass(returns) and issubclass(returns, nn.Module)


def _builder(name: str) -> Callable[..., nn.Module]:
    if is_factory(name):
        return load_factory(name)
    try:
        return MODELS[name]
    except KeyError:
        raise OnnxSlimError(f"unknown model {name!r}; available: {', '.join(MODELS)}, or a factory "
                            f"'package.module:function'") from None


def model_parameters(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The builder's defaults updated with ``params``; raises on names the builder does not take."""
    signature = inspect.signature(_builder(name))
    named = {key: p for key, p in signature.parameters.items()
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    resolved = {key: p.default for key, p in named.items()}
    for key, value in (params or {}).items():
        if key not in resolved and not open_ended:
            raise OnnxSlimError(f"model {name!r} has no parameter {key!r}; it takes: {', '.join(resolved)}")
        resolved[key] = tuple(value) if isinstance(value, list) else value
    missing = [key for key, value in resolved.items() if value is inspect.Parameter.empty]
    if missing:
        raise OnnxSlimError(f"model {name!r} needs parameter(s) {', '.join(missing)} in [model.params]")
    return resolved


def get_model(name: str, params: Mapping[str, Any] | None = None) -> nn.Module:
    """Build zoo model (or factory) ``name`` with ``params`` (a mapping of the builder's keyword parameters).

    Raises :class:`OnnxSlimError` for an unknown name or parameter, and when the builder itself raises
    with these parameters (``width = "x"``: the message names the builder, the parameters and its error).
    """
    builder, resolved = _builder(name), model_parameters(name, params)
    try:
        model = builder(**resolved)
    except OnnxSlimError:
        raise
    except Exception as exc:  # the builder rejected its parameters (or the user's model code raised)
        raise OnnxSlimError(f"model {name!r} could not be built with parameters {dict(params or {})}: "
                            f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise OnnxSlimError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def input_shape(name: str, params: Mapping[str, Any] | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one input sample for ``name`` built with ``params`` (from in_channels and input_size)."""
    resolved = model_parameters(name, params)
    if "in_channels" not in resolved or "input_size" not in resolved:
        raise OnnxSlimError(f"model {name!r} has no in_channels/input_size parameters; give its input shape "
                            f"([model] input_shape = [C, H, W] in a recipe)")
    return int(resolved["in_channels"]), int(resolved["input_size"]), int(resolved["input_size"])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A zoo model or a factory by name, with explicit parameters; what checkpoints record to rebuild it.

    ``sample_shape`` (C, H, W) is the input of one sample, for models whose parameters do not say it.
    """

    name: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sample_shape: tuple[int, ...] | None = None

    def build(self) -> nn.Module:
        return get_model(self.name, self.params)

    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.sample_shape) if self.sample_shape else input_shape(self.name, self.params)

    def to_dict(self) -> dict[str, Any]:
        payload = {"name": self.name, "params": dict(self.params)}
        if self.sample_shape:
            payload["input_shape"] = list(self.sample_shape)
        return payload

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> ModelSpec:
        shape = payload.get("input_shape")
        return cls(str(payload["name"]), dict(payload.get("params", {})),
                   tuple(int(d) for d in shape) if shape else None)
