"""Per-channel masks: one learnable scale per output channel, exported as one ``Mul`` by a constant.

``ChannelMask(C)`` holds ``weight`` (C,), initialised to 1; its forward is ``x * weight.view(1, C, 1, 1)``
for (N,C,H,W) inputs and ``x * weight.view(1, C)`` for (N,C). In eval mode both exporters fold the view,
so each mask becomes a single ``Mul`` by a [1,C,1,1] / [1,C] constant, which the slim engine reads as a
mask: a zero entry is a channel it may delete. ``x * 0`` is exactly 0, so a zero mask entry is a real
zero in PyTorch and onnxruntime alike.

:func:`attach_masks` puts masks where :mod:`onnxslim.training.coupling` says: after every producer's
site (its BN, or the conv/linear itself; before the activation), with one shared :class:`ChannelMask` per
coupled group (residual additions, depthwise convs), never on the output layer. The site module is
replaced in its parent by ``MaskedSite(module, mask)``; the model's own ``forward`` is unchanged.

:func:`masked_summary` estimates the model after slimming, with this rule: a channel is live unless its
group's mask entry is exactly 0; every conv/linear keeps its live output channels and the live channels
of its input (after concatenations, and times H*W after a flatten); params are weights plus biases after
BN folding (a conv followed by BN gets a bias), MACs per sample are
``output elements x live input channels / groups x kernel size`` (conv, conv-transpose, linear).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from onnxslim.errors import OnnxSlimError
from onnxslim.training.channel_mask import ChannelMask, MaskSite
from onnxslim.training.coupling import CouplingAnalysis, analyze_coupling


class MaskedSite(nn.Module):
    """``mask(module(x))``: replaces a producer's site in its parent module.

    In eval mode (inference, tracing, ONNX export) this is literally ``mask(module(x))``, so the export
    shows ``Conv -> Mul(mask) -> activation``; so does any traced graph (fx, TorchScript, torch.export),
    in either mode. Run eagerly in training mode, the same function is computed without
    an extra pass over the feature map: after a BN, ``m * (gamma * x_hat + beta)`` is a BN with affine
    parameters ``m * gamma`` and ``m * beta``; after a conv/linear whose weight is smaller than its input,
    the weight rows and bias are scaled by ``m``. Zero mask entries still give exact zeros, and the
    gradient reaches ``m`` through the scaled parameters. (Forward hooks on the mask therefore only fire
    in eval mode or where the feature map is multiplied explicitly.)
    """

    def __init__(self, module: nn.Module, mask: ChannelMask):
        super().__init__()
        self.module = module
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not _tracing():
            fused = _fused_forward(self.module, self.mask.weight, x)
            if fused is not None:
                return fused
        return self.mask(self.module(x))


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _tracing() -> bool:
    """True under torch.fx, TorchScript tracing or torch.compile/export: graphs always see the explicit Mul."""
    return is_fx_symbolic_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def _fused_forward(module: nn.Module, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """``mask * module(x)`` with the mask applied to the module's parameters, or None when not cheaper."""
    if isinstance(module, _NORMS) and module.affine and type(module).forward is _NORM_FORWARD[type(module)]:
        return _batch_norm(module, x, module.weight * mask, module.bias * mask)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and type(module).forward is _CONV_FORWARD[type(module)] \
            and module.weight.numel() <= x.numel():
        weight = module.weight * mask.view([-1] + [1] * (module.weight.dim() - 1))
        bias = module.bias * mask if module.bias is not None else None
        return module._conv_forward(x, weight, bias)
    if type(module) is nn.Linear and module.weight.numel() <= x.numel():
        bias = module.bias * mask if module.bias is not None else None
        return F.linear(x, module.weight * mask[:, None], bias)
    return None


_NORM_FORWARD = {cls: cls.forward for cls in _NORMS}
_CONV_FORWARD = {cls: cls.forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}


def _batch_norm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``module(x)`` (a training-mode BatchNorm) with replaced affine parameters; same statistics updates."""
    module._check_input_dim(x)
    factor = 0.0 if module.momentum is None else module.momentum
    if module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    running_mean = module.running_mean if module.track_running_stats else None
    running_var = module.running_var if module.track_running_stats else None
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, factor, module.eps)


def iter_masks(model: nn.Module) -> Iterator[tuple[str, ChannelMask]]:
    """Every distinct mask of ``model`` with its first qualified name, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, ChannelMask):
            yield name, module


def channel_masks(model: nn.Module) -> list[ChannelMask]:
    return [mask for _, mask in iter_masks(model)]


def has_masks(model: nn.Module) -> bool:
    return any(True for _ in iter_masks(model))


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [mask.weight for mask in channel_masks(model)]


def freeze_masks(model: nn.Module, frozen: bool = True) -> None:
    """Fix (or release) every mask value: frozen masks get no gradient, so zeros stay zero."""
    for mask in channel_masks(model):
        mask.weight.requires_grad_(not frozen)


def reset_masks(model: nn.Module) -> None:
    """Set every mask to 1 (the dense model)."""
    with torch.no_grad():
        for mask in channel_masks(model):
            mask.weight.fill_(1.0)


def attach_masks(model: nn.Module, example_input: torch.Tensor) -> list[ChannelMask]:
    """Insert shared channel masks into ``model`` in place; returns the masks (one per coupled group).

    ``example_input`` is one batch (N,C,H,W) the model accepts; it is used for tracing and shapes only.
    """
    if has_masks(model):
        raise OnnxSlimError("the model already has channel masks")
    analysis = analyze_coupling(model, example_input)
    modules = dict(model.named_modules(remove_duplicate=False))
    site_uses: dict[str, int] = {}
    for producer in analysis.producers.values():
        site_uses[producer.site] = site_uses.get(producer.site, 0) + 1
    masks: list[ChannelMask] = []
    for group in analysis.maskable_groups():
        mask = ChannelMask(group.channels)
        for name in group.producers:
            producer = analysis.producers[name]
            if site_uses[producer.site] > 1:  # a BN shared by two convs: leave the group alone
                break
            mask.sites.append(MaskSite(name, modules[name], modules[producer.norm] if producer.norm else None,
                                       producer.kind))
        else:
            for site in mask.sites:
                _replace_module(model, analysis.producers[site.producer_name].site,
                                lambda module, m=mask: MaskedSite(module, m))
            masks.append(mask)
    return masks


def _replace_module(model: nn.Module, name: str, wrap) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, wrap(getattr(parent, child)))


# ----------------------------------------------------------------------------------------------------
# size estimate of the slimmed model


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    name: str
    kind: str
    in_channels: int
    in_live: int
    out_channels: int
    out_live: int
    params: int
    params_live: int
    macs: int
    macs_live: int


@dataclasses.dataclass(frozen=True)
class MaskedSummary:
    layers: tuple[LayerSummary, ...]
    params: int
    params_live: int
    macs: int
    macs_live: int
    masks: int
    masked_channels: int
    zero_channels: int

    @property
    def params_removed(self) -> float:
        return 1.0 - self.params_live / self.params if self.params else 0.0

    @property
    def macs_removed(self) -> float:
        return 1.0 - self.macs_live / self.macs if self.macs else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format_table(self) -> str:
        header = ("layer", "kind", "in", "out", "params", "MACs")
        rows = [(layer.name, layer.kind, f"{layer.in_live}/{layer.in_channels}", f"{layer.out_live}/{layer.out_channels}",
                 f"{layer.params_live:,}/{layer.params:,}", f"{layer.macs_live:,}/{layer.macs:,}")
                for layer in self.layers]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"params: {self.params:,} -> {self.params_live:,} ({100 * self.params_removed:.1f}% removed)")
        lines.append(f"MACs:   {self.macs:,} -> {self.macs_live:,} ({100 * self.macs_removed:.1f}% removed)")
        lines.append(f"masks: {self.masks}, zero channels {self.zero_channels} / {self.masked_channels}")
        return "\n".join(lines)


def masked_summary(model: nn.Module, example_input: torch.Tensor) -> MaskedSummary:
    """Per-layer live channels, params and MACs of ``model`` as it will be after slimming (module docstring)."""
    analysis = analyze_coupling(model, example_input)
    live = _group_live_counts(model, analysis)
    layers = []
    for layer in analysis.layers:
        module = layer.module
        out_total = analysis.groups[layer.group].channels
        out_live = live[layer.group]
        in_total = sum(analysis.groups[g].channels * r for g, r in layer.input_layout)
        in_live = sum(live[g] * r for g, r in layer.input_layout)
        kind = analysis.producers[layer.producer].kind if layer.producer in analysis.producers else "conv"
        if kind == "depthwise":
            in_total, in_live = out_total, out_live
        norm = analysis.producers[layer.producer].norm if layer.producer in analysis.producers else None
        params, macs = _layer_cost(module, kind, in_total, out_total, layer.output_shape, norm is not None)
        params_live, macs_live = _layer_cost(module, kind, in_live, out_live, layer.output_shape, norm is not None)
        name = layer.producer.removesuffix(".module")  # a producer wrapped by MaskedSite
        layers.append(LayerSummary(name, kind, in_total, in_live, out_total, out_live, params, params_live,
                                   macs, macs_live))
    masks = channel_masks(model)
    return MaskedSummary(
        tuple(layers),
        sum(layer.params for layer in layers), sum(layer.params_live for layer in layers),
        sum(layer.macs for layer in layers), sum(layer.macs_live for layer in layers),
        len(masks), sum(mask.channels for mask in masks), sum(mask.channels - mask.live_count() for mask in masks),
    )


def _group_live_counts(model: nn.Module, analysis: CouplingAnalysis) -> list[int]:
    live = [group.channels for group in analysis.groups]
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, group in analysis.mask_groups.items():
        live[group] = min(live[group], modules[name].live_count())
    return live


def _layer_cost(module: nn.Module, kind: str, in_channels: int, out_channels: int, output_shape: tuple[int, ...],
                folded_norm: bool) -> tuple[int, int]:
    has_bias = getattr(module, "bias", None) is not None or folded_norm
    if isinstance(module, nn.Linear):
        return in_channels * out_channels + (out_channels if has_bias else 0), in_channels * out_channels
    kernel = math.prod(module.kernel_size)
    groups = module.groups
    if kind == "depthwise":
        weights = out_channels * kernel
    else:
        weights = out_channels * (in_channels // groups if groups > 1 else in_channels) * kernel
    spatial = math.prod(output_shape[2:]) if len(output_shape) > 2 else 1
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # each input element is scattered through the kernel: MACs = input elements x out/groups x kernel
        in_spatial = spatial // max(1, math.prod(module.stride) ** 1)
        macs = in_spatial * in_channels * (out_channels // groups) * kernel
    else:
        macs = spatial * weights
    return weights + (out_channels if has_bias else 0), macs

