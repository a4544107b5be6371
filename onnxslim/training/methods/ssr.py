"""SSR — structured-sparsity regularization solved by AULM (Lin et al., "Toward Compact ConvNets via
Structure-Sparsity Regularized Filter Pruning", IEEE TNNLS 2020).

**Groups.** Every masked channel ``i`` is one group ``W_i``: the row of each producer's reshaped kernel
(Conv weight ``(C_out, C_in/g * k * k)``, Linear weight ``(out, in)``, ConvTranspose per output
channel) together with its bias. A mask shared by coupled producers (residual additions, depthwise
convs) gives one group over all of them, since the channel can only go when all of them go. With
``include_norm=True`` the BatchNorm ``gamma_i, beta_i`` after the producer join the group as well.

**Objective** (per-layer ``lam_l``, the layer of group ``i`` is its mask's first producer)::

    min_W  L(W) + sum_i lam_i * R(W_i)
    R = ||W_i||_2              (method ``ssr_l21``: group lasso, l2,1)
    R = [ ||W_i||_2 != 0 ]     (method ``ssr_l20``: number of non-zero filters, l2,0)

**AULM** (alternating updates with Lagrange multipliers, ADMM): split ``F = W`` with multiplier ``Y``
and penalty ``rho``; the augmented Lagrangian is
``L(W) + sum_i lam_i R(F_i) + <Y, W - F> + rho/2 ||W - F||^2``. Initially ``F = W``, ``Y = 0`` (taken
at the first sparse step, so a preceding dense phase is respected). Then

* **W-step**, every iteration: one optimizer step (SGD) on ``L(W) + rho/2 ||W - F + Y/rho||^2`` — the
  quadratic is returned by :meth:`regularization`, so its gradient ``rho (W - F + Y/rho)`` is exact and
  goes through the same momentum/weight decay as the task gradient (cost: one pass over the filters).
* **F-step**, every ``update_every`` (K) iterations, with ``T = W + Y/rho`` (the proximal operator of
  ``lam/rho * R``, applied per group)::

      l2,1:  F_i = T_i * max(||T_i|| - lam_i/rho, 0) / ||T_i||      (group soft threshold)
      l2,0:  F_i = T_i  if ||T_i|| > sqrt(2 lam_i / rho)  else 0     (group hard threshold)

  followed by the multiplier update ``Y <- Y + rho (W - F)``.

**Zero masks.** :meth:`finalize_masks` performs one more F/Y update when W-steps were taken since the
last one (so the masks reflect the final weights), then sets the mask entry of every channel whose
group ``F_i`` is exactly 0 to 0 (keeping at least ``min_channels`` per mask, the largest ``||T_i||``).
The trainer then freezes the masks and fine-tunes. The masks themselves are not trained during the
sparse phase (they are left out of the optimizer): a trainable scale after the filter would let the
network move the filter's norm into the mask and escape the penalty.

**BatchNorm.** The paper prunes conv filters of networks mostly without BN. With a BN after the conv, a
zero filter does not zero the channel: its BN output is the constant ``beta - gamma * mean / sigma``.
The mask sits after the BN, so mask 0 removes the channel exactly, and fine-tuning absorbs the lost
constant. With ``include_norm=True`` gamma and beta are driven to zero with the filter, so the channel
is already zero before the mask is set (masking changes nothing); this is not in the paper.

**Defaults** are the paper's LeNet-5 (MNIST) settings: ``lam`` 0.4 / 0.15 / 0.02 for conv1 / conv2 /
fc1 (``layer_lams``, glob patterns on the producer's module name in the model without masks, first
match wins; other layers get ``lam``), ``rho = 1``, ``K = 200`` iterations (the paper's code); the
optimizer settings (lr 0.01, momentum 0.9, batch 256, weight decay 4e-5) belong to the phases. Paper
result: LeNet 20-50-500 -> 3-11-108 at +0.05 pt error. The same ``lam`` table is used for ``l2,0``,
whose threshold is ``sqrt(2 lam / rho)``.

**Distributed (DDP) lockstep.** W is identical on every rank (DDP all-reduces its gradients); every F/Y
update is computed from it on every rank and then **broadcast from rank 0**, so F, Y and the W-step's
target stay bit-identical whatever the ranks' arithmetic. ``finalize_masks`` decides from F (identical)
and the controller broadcasts the resulting masks from rank 0.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.training.distributed import DistContext
from onnxslim.training.masks import ChannelMask, iter_masks
from onnxslim.training.methods import (
    MaskReport,
    SetupContext,
    SparsityMethod,
    StepContext,
    default_param_groups,
    register,
    zero_channels,
)

REGULARIZERS = ("l21", "l20")
PAPER_LENET_LAMS: tuple[tuple[str, float], ...] = (
    ("features.conv1", 0.4), ("features.conv2", 0.15), ("classifier.fc1", 0.02))


@dataclasses.dataclass(frozen=True)
class SSRParams:
    lam: float = 0.02  # lambda of layers matched by no pattern of layer_lams
    layer_lams: tuple[tuple[str, float], ...] = PAPER_LENET_LAMS  # (glob on producer name, lambda), first wins
    rho: float = 1.0  # ADMM penalty
    update_every: int = 200  # K: iterations between F/Y updates (paper's code: 200)
    include_norm: bool = False  # put BN gamma/beta into the filter's group (not in the paper)
    min_channels: int = 1  # never zero the last channels of a mask

    def __post_init__(self) -> None:
        if self.lam < 0 or not math.isfinite(self.lam):
            raise OnnxSlimError(f"ssr: lam must be >= 0, got {self.lam}")
        if self.rho <= 0:
            raise OnnxSlimError(f"ssr: rho must be > 0, got {self.rho}")
        if self.update_every < 1:
            raise OnnxSlimError(f"ssr: update_every must be >= 1, got {self.update_every}")
        if self.min_channels < 0:
            raise OnnxSlimError(f"ssr: min_channels must be >= 0, got {self.min_channels}")
        object.__setattr__(self, "layer_lams", _normalise_layer_lams(self.layer_lams))

    def lam_for(self, layer: str) -> float:
        """The lambda of the layer (producer module name): the first matching pattern, else ``lam``."""
        for pattern, value in self.layer_lams:
            if fnmatch.fnmatchcase(layer, pattern):
                return value
        return self.lam


def _normalise_layer_lams(value: Any) -> tuple[tuple[str, float], ...]:
    if isinstance(value, Mapping):
        value = tuple(value.items())
    pairs = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str) \
                or isinstance(item[1], bool) or not isinstance(item[1], (int, float)):
            raise OnnxSlimError(f"ssr: layer_lams entries must be [pattern, lambda] pairs, got {item!r}")
        if item[1] < 0 or not math.isfinite(item[1]):
            raise OnnxSlimError(f"ssr: lambda for {item[0]!r} must be >= 0, got {item[1]}")
        pairs.append((item[0], float(item[1])))
    return tuple(pairs)


# ----------------------------------------------------------------------------------------------------
# the proximal operators (per group, from the group norms)


def prox_scale(norms: torch.Tensor, regularizer: str, lam: float | torch.Tensor, rho: float) -> torch.Tensor:
    """Per-group factor ``s_i`` such that ``prox_{lam/rho R}(T)_i = s_i * T_i``, given ``||T_i||``.

    ``l21``: ``max(||T_i|| - lam/rho, 0) / ||T_i||`` (0 for a zero group); ``l20``: ``1`` when
    ``||T_i||^2 > 2 lam / rho`` else ``0``.
    """
    lam = torch.as_tensor(lam, dtype=norms.dtype, device=norms.device)
    if regularizer == "l21":
        shrunk = torch.clamp(norms - lam / rho, min=0.0)
        return torch.where(norms > 0, shrunk / torch.where(norms > 0, norms, torch.ones_like(norms)),
                           torch.zeros_like(norms))
    if regularizer == "l20":
        return (norms.square() > 2.0 * lam / rho).to(norms.dtype)
    raise OnnxSlimError(f"ssr: unknown regularizer {regularizer!r}; use one of {', '.join(REGULARIZERS)}")


def prox_rows(rows: torch.Tensor, regularizer: str, lam: float | torch.Tensor, rho: float) -> torch.Tensor:
    """The F-step on a (groups, n) matrix whose rows are the groups ``T_i``."""
    return rows * prox_scale(rows.norm(dim=1), regularizer, lam, rho)[:, None]


# ----------------------------------------------------------------------------------------------------
# filter groups of a masked model


@dataclasses.dataclass
class GroupTensor:
    """One parameter tensor holding (part of) the groups of a mask, with its output-channel layout."""

    name: str  # qualified parameter name in the model
    param: nn.Parameter
    transposed_groups: int = 0  # ConvTranspose: its ``groups`` (the channel is dim 1 within a group)

    def _view(self, tensor: torch.Tensor) -> torch.Tensor:
        # (channels-major) view: (G, Cin/G, Cout/G, rest) for ConvTranspose weights, else (C, rest)
        if self.transposed_groups:
            g = self.transposed_groups
            return tensor.reshape(g, tensor.shape[0] // g, tensor.shape[1], -1)
        return tensor.reshape(tensor.shape[0], -1)

    def sq_norms(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per output channel, the squared norm of ``tensor``'s part of the channel's group."""
        view = self._view(tensor).square()
        if self.transposed_groups:
            return view.sum(dim=(1, 3)).reshape(-1)
        return view.sum(dim=1)

    def scaled(self, tensor: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """``tensor`` with every output channel's part multiplied by ``factors[channel]``."""
        view = self._view(tensor)
        if self.transposed_groups:
            scaled = view * factors.reshape(self.transposed_groups, 1, -1, 1)
        else:
            scaled = view * factors[:, None]
        return scaled.reshape(tensor.shape)


@dataclasses.dataclass
class FilterGroup:
    """The groups (one per channel) of one mask: its tensors and the lambda of its layer."""

    mask_name: str
    mask: ChannelMask
    layer: str  # the mask's first producer
    lam: float
    tensors: list[GroupTensor]

    def norms(self, values: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """(C,) group norms of ``values`` (one tensor per entry of ``tensors``; default: the weights)."""
        values = [t.param.detach() for t in self.tensors] if values is None else values
        return torch.sqrt(sum(t.sq_norms(v) for t, v in zip(self.tensors, values)))


def filter_groups(model: nn.Module, params: SSRParams) -> list[FilterGroup]:
    """One :class:`FilterGroup` per mask of ``model`` (see the module docstring for the groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for mask_name, mask in iter_masks(model):
        if not mask.sites:
            continue
        tensors: list[GroupTensor] = []
        for site in mask.sites:
            producer = site.producer
            transposed = producer.groups if isinstance(
                producer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
            tensors.append(GroupTensor(names[id(producer.weight)], producer.weight, transposed))
            if getattr(producer, "bias", None) is not None:
                tensors.append(GroupTensor(names[id(producer.bias)], producer.bias))
            if params.include_norm and site.norm is not None:
                for extra in (getattr(site.norm, "weight", None), getattr(site.norm, "bias", None)):
                    if isinstance(extra, nn.Parameter):
                        tensors.append(GroupTensor(names[id(extra)], extra))
        for tensor in tensors:
            channels = tensor.sq_norms(tensor.param.detach()).numel()
            if channels != mask.channels:
                raise OnnxSlimError(f"ssr: {tensor.name} has {channels} output channels but its mask "
                                    f"{mask_name} has {mask.channels}")
        layer = mask.sites[0].producer_name
        groups.append(FilterGroup(mask_name, mask, layer, params.lam_for(layer), tensors))
    if not groups:
        raise OnnxSlimError("ssr: the model has no channel masks (attach_masks first)")
    return groups


# ----------------------------------------------------------------------------------------------------
# the method


class SSR(SparsityMethod):
    """Shared implementation; the registered subclasses fix ``regularizer``."""

    Params = SSRParams
    regularizer: ClassVar[str] = ""

    def __init__(self, params: SSRParams | None = None):
        super().__init__(params)
        self.groups: list[FilterGroup] | None = None
        self.F: list[torch.Tensor] | None = None  # per group tensor, same order as the flattened groups
        self.Y: list[torch.Tensor] | None = None
        self._target: list[torch.Tensor] | None = None  # F - Y/rho, what the W-step pulls W towards
        self.iterations = 0  # W-steps taken
        self.last_update = 0  # value of ``iterations`` at the last F/Y update
        self.updates = 0  # F/Y updates taken
        self._pending: Mapping[str, Any] | None = None

    # -- structure -------------------------------------------------------------------------------------
    def _tensors(self) -> list[GroupTensor]:
        return [t for group in self.groups for t in group.tensors]

    def setup(self, model: nn.Module, ctx: SetupContext | None = None) -> None:
        self.groups = filter_groups(model, self.params)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    def _require_setup(self) -> None:
        if self.groups is None:
            raise OnnxSlimError(f"{self.name}: setup(model) was not called")

    def _initialise(self) -> None:
        self.F = [t.param.detach().clone() for t in self._tensors()]
        self.Y = [torch.zeros_like(t.param) for t in self._tensors()]
        self._refresh_target()

    def _refresh_target(self) -> None:
        rho = self.params.rho
        self._target = [f - y / rho for f, y in zip(self.F, self.Y)]

    # -- hooks -----------------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, phase) -> list[dict]:
        # the masks stay at 1 while the filters are regularized (see the module docstring)
        return [g for g in default_param_groups(model, phase.weight_decay) if g["name"] != "masks"]

    def regularization(self, model: nn.Module, ctx: StepContext) -> torch.Tensor | None:
        self._require_setup()
        if self.F is None:
            self._initialise()
        rho = self.params.rho
        terms = [(t.param - target).square().sum() for t, target in zip(self._tensors(), self._target)]
        return 0.5 * rho * torch.stack(terms).sum()

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        self.iterations += 1
        if self.iterations % self.params.update_every == 0:
            self.update(ctx.dist)

    def finalize_masks(self, model: nn.Module) -> MaskReport:
        self._require_setup()
        if self.F is None:
            self._initialise()
        if self.iterations != self.last_update or self.updates == 0:
            self.update()
        prune, scores = {}, {}
        rho = self.params.rho
        index = 0
        for group in self.groups:
            count = len(group.tensors)
            F = self.F[index:index + count]
            T = [t.param.detach() + y / rho for t, y in zip(group.tensors, self.Y[index:index + count])]
            index += count
            prune[group.mask_name] = group.norms(F) == 0
            scores[group.mask_name] = group.norms(T)
        return zero_channels(model, prune, self.params.min_channels, scores)

    # -- AULM ------------------------------------------------------------------------------------------
    def update(self, dist: DistContext | None = None) -> None:
        """One F-step (proximal operator on ``T = W + Y/rho``) and multiplier update ``Y += rho (W - F)``;
        with ``dist``, F and Y are then broadcast from rank 0."""
        self._require_setup()
        if self.F is None:
            self._initialise()
        rho = self.params.rho
        index = 0
        with torch.no_grad():
            for group in self.groups:
                count = len(group.tensors)
                W = [t.param.detach() for t in group.tensors]
                T = [w + y / rho for w, y in zip(W, self.Y[index:index + count])]
                factors = prox_scale(group.norms(T), self.regularizer, group.lam, rho)
                for offset, (tensor, w, t) in enumerate(zip(group.tensors, W, T)):
                    f = tensor.scaled(t, factors)
                    self.F[index + offset] = f
                    self.Y[index + offset] = self.Y[index + offset] + rho * (w - f)
                index += count
        if dist is not None:
            dist.broadcast_([*self.F, *self.Y])
        self._refresh_target()
        self.updates += 1
        self.last_update = self.iterations

    def zero_groups(self) -> dict[str, torch.Tensor]:
        """Per mask, bool (C,): channels whose ``F_i`` is exactly 0 (all False before the first update)."""
        self._require_setup()
        result = {}
        index = 0
        for group in self.groups:
            count = len(group.tensors)
            if self.F is None:
                result[group.mask_name] = torch.zeros(group.mask.channels, dtype=torch.bool)
            else:
                result[group.mask_name] = group.norms(self.F[index:index + count]) == 0
            index += count
        return result

    def layer_lams(self) -> dict[str, float]:
        """Per mask, the lambda its groups use (for reports)."""
        self._require_setup()
        return {group.mask_name: group.lam for group in self.groups}

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        names = [t.name for t in self._tensors()] if self.groups is not None else []
        return {
            "regularizer": self.regularizer,
            "iterations": self.iterations,
            "last_update": self.last_update,
            "updates": self.updates,
            "F": None if self.F is None else {n: f.detach().cpu().clone() for n, f in zip(names, self.F)},
            "Y": None if self.Y is None else {n: y.detach().cpu().clone() for n, y in zip(names, self.Y)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.groups is None:  # before setup: applied when the groups exist
            self._pending = dict(state)
            return
        if state.get("regularizer", self.regularizer) != self.regularizer:
            raise OnnxSlimError(f"{self.name}: state written by regularizer {state.get('regularizer')}")
        self.iterations = int(state["iterations"])
        self.last_update = int(state["last_update"])
        self.updates = int(state["updates"])
        if state.get("F") is None:
            self.F = self.Y = self._target = None
            return
        tensors = self._tensors()
        missing = [t.name for t in tensors if t.name not in state["F"] or t.name not in state["Y"]]
        if missing:
            raise OnnxSlimError(f"{self.name}: saved ADMM state lacks {', '.join(missing[:3])}")
        self.F, self.Y = [], []
        for t in tensors:
            f, y = state["F"][t.name], state["Y"][t.name]
            if tuple(f.shape) != tuple(t.param.shape) or tuple(y.shape) != tuple(t.param.shape):
                raise OnnxSlimError(f"{self.name}: saved ADMM state of {t.name} has shape {tuple(f.shape)}, "
                                    f"the model has {tuple(t.param.shape)}")
            self.F.append(f.to(device=t.param.device, dtype=t.param.dtype).clone())
            self.Y.append(y.to(device=t.param.device, dtype=t.param.dtype).clone())
        self._refresh_target()

    def describe(self) -> dict:
        return {**super().describe(), "regularizer": self.regularizer}


@register
class SSRL21(SSR):
    """SSR with the l2,1 (group lasso) regularizer."""

    name = "ssr_l21"
    regularizer = "l21"


@register
class SSRL20(SSR):
    """SSR with the l2,0 (number of non-zero filters) regularizer."""

    name = "ssr_l20"
    regularizer = "l20"


__all__ = ["PAPER_LENET_LAMS", "REGULARIZERS", "SSR", "SSRL20", "SSRL21", "FilterGroup", "GroupTensor", "SSRParams",
           "filter_groups", "prox_rows", "prox_scale"]
