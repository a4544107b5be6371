"""Joint sparsity promotion and redundancy reduction (Khan, Naqvi, Robles-Kelly, Meijering, "Neural
Network Compression by Joint Sparsity Promotion and Redundancy Reduction", ICONIP 2022).

Only the paper's abstract is public: composite constraints that (a) prune *redundant* filters and
(b) promote sparsity by *gradient counting* rather than a pseudo-norm penalty, evaluated on pixel-wise
segmentation with UNet and MobileNetV3. This module is our documented interpretation of it, expressed
with the channel masks of :mod:`onnxslim.training.masks` (one mask entry ``m_c`` per channel, shared by
coupled producers). No penalty is added to the loss: the task gradient trains weights and masks, and
after every sparse-phase step the method updates counters and pushes chosen masks towards zero.

**Channel state.** Every mask entry is *live*, *under pressure* (live, its mask decays every step) or
*dead* (exactly 0, kept at 0). Decisions are taken at the end of each *window* of ``window`` steps.

**(b) Gradient counting.** After each step, with ``g_c = dL/dm_c`` (the task loss's gradient of the
mask; for a coupled mask the sum over its sites), a live channel's step is *significant* when
``|g_c| >= significance * R``, where the mask's reference level ``R`` is (``reference="initial"``,
default) the mean over the first window of the sparse phase of ``mean_{live c'} |g_c'|`` — the typical
channel of the layer *before* pruning — or (``reference="live_mean"``) that mean at the current step.
Being relative to the same mask's channels, the rule is free of the loss scale and the learning rate.
With the fixed initial reference, pruning stops by itself: as channels go, the survivors carry more of
the loss and their gradients grow above the dense-time level; with ``live_mean`` the bar rises with
the survivors and pruning continues until the caps below (more aggressive). ``|g_c|`` of a mask held at its
value is the per-batch ingredient of the Fisher pruning signal (Theis et al. 2018 use the mean of
``g_c**2``); counting exceedances instead of averaging squares makes the estimate insensitive to a few
large batches, and it does not shrink when the mask shrinks (``dL/dm_c = sum dL/dy_c * x_c`` with
``x_c`` the unmasked response), so a channel that becomes important again while its mask decays is
seen and recovers. At a window end, the *rate* of a live channel is its significant steps divided by
the window's steps; channels with ``rate < min_rate`` are *rarely significant*.

**(a) Redundancy.** At a window end (every ``redundancy_every`` windows) the live channels of each mask
are compared pairwise by cosine similarity:

* ``redundancy_source="responses"`` (default): the mask's output — the channel's pre-activation
  response — on a fixed probe batch (``probe_samples`` training samples, evenly spaced through the
  training set, model in eval mode; at most ``max_positions`` evenly strided entries per channel). If
  ``z_j = a * z_i`` with ``a > 0`` then ``relu(z_j) = a * relu(z_i)``: the consumer can absorb channel
  ``j`` into ``i``, so cosine ~ 1 means *redundant* (exactly so for ReLU). Strength of a channel: the
  RMS of its response. For a mask applied at several sites (coupled producers), a pair's similarity is
  the minimum over the sites and the strength the sum.
* ``redundancy_source="weights"``: the producers' filters (rows of ``site_filters``); similarity is the
  minimum over the mask's non-depthwise sites (a depthwise kernel says nothing about redundancy), and
  strength ``|m_c| * sum over those sites of ||w_c||``.

Pairs with similarity ``>= similarity`` are redundant; the weaker channel of each is chosen greedily:
channels in order of decreasing strength (ties: lower index first) are kept unless similar to an
already kept channel, so of a duplicated filter the original (stronger, or first) survives.

**Pushing to zero.** At each window end the channels put under pressure are the live ones that are
rarely significant or redundant; a channel no longer selected leaves the pressure (its mask stops
decaying and SGD may grow it back). Pruning is gradual: per window at most ``max_new_fraction`` of a
mask's live channels newly come under pressure, and at most ``max_pruned_fraction`` of its channels —
never its last ``min_channels`` — are dead or under pressure. When more are selected, channels already
under pressure keep their place, then the lowest rate, then the lowest strength. After every step, masks under pressure decay
multiplicatively, ``m_c <- (1 - decay) * m_c``, after the optimizer's own update; once
``|m_c| < zero_below`` the entry is set to exactly 0.0 and the channel is dead: it is reset to 0 after
every later step (the optimizer's momentum cannot revive it). ``finalize_masks`` (between the sparse
and fine-tune phases) sets the masks of dead and still-pressured channels to 0 (keeping ``min_channels``
per mask, the largest ``|m|``); the trainer then freezes every mask, so the zeros stay exact and the
slim engine deletes those channels.

**Distributed (DDP) lockstep.** Gradient counts and reference levels are computed from the mask
gradients after DDP's all-reduce (identical on every rank); the probe batch is the same samples on every
rank and is run after BN running statistics are all-reduced (averaged); at each window end the chosen
pressured/dead sets are broadcast from rank 0, so decisions are identical by construction.

**Coupled masks.** All decisions are per mask, i.e. per coupled group: the gradient is the group's
(summed over sites), redundancy must hold at every site, and zeroing one entry removes the channel
from every coupled producer, which is what the slim engine needs to delete it.

**Defaults** (our choice; the paper's values are not public): ``window = 50`` steps, ``significance =
0.5``, ``reference = "initial"``, ``min_rate = 0.5``, ``similarity = 0.95``, ``decay = 0.02`` (a mask
falls from 1 to below ``zero_below = 0.01`` in about 230 steps, so it is re-examined in several windows
before it dies), ``max_new_fraction = 0.1``, ``max_pruned_fraction = 0.9``, ``probe_samples = 32``.
Measured (see ``tools/accept_joint.py`` and the recipes in ``models/``): on trained segmentation
UNets, uncentred response cosines of 0.9 are common (the constant background dominates), 0.95 flags a
minority; filter-weight cosines of trained convolutions rarely exceed 0.5, so ``"weights"`` mostly
finds duplicated filters only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.training.batches import as_source
from onnxslim.training.distributed import DistContext
from onnxslim.training.masks import ChannelMask, iter_masks
from onnxslim.training.methods import (
    MaskReport,
    SetupContext,
    SparsityMethod,
    StepContext,
    register,
    site_filters,
    zero_channels,
)


@dataclasses.dataclass(frozen=True)
class JointParams:
    # (b) sparsity promotion by gradient counting
    window: int = 50  # steps per counting window; decisions at each window end
    significance: float = 0.5  # |g_c| >= significance * mean |g| of the mask's live channels is significant
    min_rate: float = 0.5  # live channels significant in fewer than this fraction of a window's steps are pruned
    reference: str = "initial"  # "initial": the mask's mean live |g| over the first window; "live_mean": at this step
    # (a) redundancy reduction
    similarity: float = 0.95  # cosine similarity at or above which two channels of a mask are redundant
    redundancy_source: str = "responses"  # "responses" (probe batch) or "weights" (filters)
    redundancy_every: int = 1  # check redundancy every this many windows (0 = never)
    probe_samples: int = 32  # training samples of the probe batch (responses)
    max_positions: int = 4096  # response entries per channel compared (evenly strided subsample)
    # pushing selected masks to zero
    decay: float = 0.02  # per-step multiplicative decay of masks under pressure
    zero_below: float = 0.01  # |m| below this becomes exactly 0 (the channel is dead)
    max_pruned_fraction: float = 0.9  # at most this fraction of a mask's channels dead or under pressure
    max_new_fraction: float = 0.1  # per window, at most this fraction of a mask's live channels newly put under pressure
    min_channels: int = 1  # never prune a mask's last channels
    finalize_pressured: bool = True  # finalize_masks zeroes channels still under pressure, not only dead ones

    def __post_init__(self) -> None:
        if self.window < 1:
            raise OnnxSlimError(f"joint: window must be >= 1, got {self.window}")
        if self.significance < 0 or not 0.0 <= self.min_rate <= 1.0:
            raise OnnxSlimError("joint: significance must be >= 0 and min_rate in [0, 1]")
        if not -1.0 <= self.similarity <= 1.0:
            raise OnnxSlimError(f"joint: similarity must be a cosine in [-1, 1], got {self.similarity}")
        if self.reference not in ("live_mean", "initial"):
            raise OnnxSlimError(f"joint: reference must be 'live_mean' or 'initial', got {self.reference!r}")
        if self.redundancy_source not in ("responses", "weights"):
            raise OnnxSlimError(f"joint: redundancy_source must be 'responses' or 'weights', got {self.redundancy_source!r}")
        if self.redundancy_every < 0 or self.probe_samples < 1 or self.max_positions < 2:
            raise OnnxSlimError("joint: redundancy_every must be >= 0, probe_samples >= 1, max_positions >= 2")
        if not 0.0 <= self.decay < 1.0 or self.zero_below < 0:
            raise OnnxSlimError("joint: decay must be in [0, 1) and zero_below >= 0")
        if not 0.0 <= self.max_new_fraction <= 1.0:
            raise OnnxSlimError(f"joint: max_new_fraction must be in [0, 1], got {self.max_new_fraction}")
        if not 0.0 <= self.max_pruned_fraction <= 1.0 or self.min_channels < 0:
            raise OnnxSlimError("joint: max_pruned_fraction must be in [0, 1] and min_channels >= 0")


# ----------------------------------------------------------------------------------------------------
# redundancy: cosine similarities and the greedy choice of the weaker channel


def cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    """(C, C) cosine similarities of the rows of ``rows`` (C, D); rows of norm 0 are similar to nothing."""
    rows = rows.detach().to(torch.float64)
    norms = rows.norm(dim=1)
    unit = rows / norms.clamp_min(1e-30)[:, None]
    similarity = unit @ unit.T
    zero = norms == 0
    similarity[zero, :] = 0.0
    similarity[:, zero] = 0.0
    return similarity


def redundant_channels(similarity: torch.Tensor, strength: torch.Tensor, threshold: float,
                       candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (C,): channels similar (>= ``threshold``) to a stronger kept channel.

    Channels (only ``candidates`` when given) are visited by decreasing ``strength`` (ties: lower index
    first); a channel is kept unless its similarity to an already kept channel reaches ``threshold``.
    """
    channels = strength.numel()
    candidates = torch.ones(channels, dtype=torch.bool) if candidates is None else candidates.cpu()
    strength = strength.detach().cpu().to(torch.float64)
    similarity = similarity.cpu()
    # stable sort on -strength keeps lower indices first among equal strengths
    order = np.argsort(-strength.numpy(), kind="stable")
    redundant = torch.zeros(channels, dtype=torch.bool)
    kept: list[int] = []
    for index in order.tolist():
        if not bool(candidates[index]):
            continue
        if kept and float(similarity[index, kept].max()) >= threshold:
            redundant[index] = True
        else:
            kept.append(index)
    return redundant


def weight_similarity(mask: ChannelMask) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(similarity (C, C), strength (C,)) from the filters of the mask's non-depthwise sites, or None."""
    sites = [site for site in mask.sites if site.kind != "depthwise"]
    if not sites:
        return None
    similarity, strength = None, torch.zeros(mask.channels, dtype=torch.float64)
    for site in sites:
        filters = site_filters(site).cpu()
        site_similarity = cosine_matrix(filters)
        similarity = site_similarity if similarity is None else torch.minimum(similarity, site_similarity)
        strength += filters.to(torch.float64).norm(dim=1)
    return similarity, strength * mask.weight.detach().abs().cpu().to(torch.float64)


def response_similarity(model: nn.Module, probe: torch.Tensor, max_positions: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per mask name: (similarity (C, C), strength (C,)) of the mask outputs on ``probe`` (eval mode)."""
    masks = dict(iter_masks(model))
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in masks}
    handles = []
    for name, mask in masks.items():
        def hook(module, inputs, output, name=name):
            channels = output.shape[1]
            rows = output.detach().transpose(0, 1).reshape(channels, -1)
            stride = max(1, -(-rows.shape[1] // max_positions))
            captured[name].append(rows[:, ::stride].cpu())
        handles.append(mask.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    result = {}
    for name, calls in captured.items():
        if not calls:
            continue
        similarity = None
        strength = torch.zeros(masks[name].channels, dtype=torch.float64)
        for rows in calls:
            call_similarity = cosine_matrix(rows)
            similarity = call_similarity if similarity is None else torch.minimum(similarity, call_similarity)
            strength += rows.to(torch.float64).pow(2).mean(1).sqrt()
        result[name] = (similarity, strength)
    return result


# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _MaskState:
    counts: torch.Tensor  # (C,) significant steps in the current window
    pressured: torch.Tensor  # (C,) bool
    dead: torch.Tensor  # (C,) bool
    reference: float = 0.0  # reference="initial": mean over the first window of the per-step live mean |g|
    reference_sum: float = 0.0
    reference_steps: int = 0


@register
class JointSparsity(SparsityMethod):
    name = "joint"
    Params = JointParams

    def __init__(self, params: Any = None):
        super().__init__(params)
        self._state: dict[str, _MaskState] = {}
        self._window_steps = 0
        self._windows = 0
        self._probe: torch.Tensor | None = None
        self.history: list[dict[str, int]] = []  # per window: live, pressured, dead, redundant, rare

    # -- lifecycle -------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: SetupContext) -> None:
        self._ensure_state(model)
        if self.params.redundancy_source == "responses" and self.params.redundancy_every > 0:
            if ctx.train_data is None:
                raise OnnxSlimError("joint: redundancy_source='responses' probes the training data; pass it "
                                    "(MaskController(..., train_data=...)) or use redundancy_source='weights'")
            data = as_source(ctx.train_data)
            count = min(self.params.probe_samples, len(data))
            index = np.unique(np.linspace(0, len(data) - 1, count).round().astype(np.int64))
            self._probe = data.fetch(index)[0].to(ctx.device)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        self._ensure_state(model)
        params = self.params
        with torch.no_grad():
            for name, mask in iter_masks(model):
                state = self._state[name]
                weight = mask.weight
                if mask.frozen:
                    continue
                live = ~state.dead & (weight != 0).cpu()
                if weight.grad is not None:
                    magnitude = weight.grad.detach().abs().cpu()
                    reference = magnitude[live].mean() if bool(live.any()) else torch.tensor(0.0)
                    if params.reference == "initial":
                        if self._windows == 0:
                            state.reference_sum += float(reference)
                            state.reference_steps += 1
                            state.reference = state.reference_sum / state.reference_steps
                        reference = torch.tensor(state.reference)
                    significant = live & (magnitude >= params.significance * reference) & (reference > 0)
                    state.counts += significant.to(state.counts.dtype)
                decaying = (state.pressured & ~state.dead).to(weight.device)
                if bool(decaying.any()):
                    weight.copy_(torch.where(decaying, weight * (1.0 - params.decay), weight))
                    vanished = (decaying & (weight.abs() < params.zero_below)).cpu()
                    state.dead |= vanished
                    state.pressured &= ~state.dead
                if bool(state.dead.any()):
                    weight.copy_(torch.where(state.dead.to(weight.device), torch.zeros_like(weight), weight))
        self._window_steps += 1
        if self._window_steps >= params.window:
            self.end_window(model, ctx.dist)

    def end_window(self, model: nn.Module, dist: DistContext | None = None) -> None:
        """Window end: choose the channels under pressure from counts and redundancy; reset the counts.
        With ``dist`` the probe sees BN statistics averaged over ranks and rank 0's choice is broadcast."""
        params = self.params
        dist = dist or DistContext()
        self._ensure_state(model)
        check_redundancy = params.redundancy_every > 0 and self._windows % params.redundancy_every == 0
        responses = {}
        if check_redundancy and params.redundancy_source == "responses" and self._probe is not None:
            dist.sync_norm_statistics(model)
            responses = response_similarity(model, self._probe, params.max_positions)
        totals = {"window": self._windows + 1, "live": 0, "rare": 0, "redundant": 0, "pressured": 0, "dead": 0}
        for name, mask in iter_masks(model):
            state = self._state[name]
            if mask.frozen:
                continue
            live = ~state.dead & (mask.weight.detach() != 0).cpu()
            rate = state.counts / max(1, self._window_steps)
            rare = live & (rate < params.min_rate)
            redundant = torch.zeros_like(live)
            strength = mask.weight.detach().abs().cpu().to(torch.float64)
            if check_redundancy:
                pair = responses.get(name) if params.redundancy_source == "responses" else weight_similarity(mask)
                if pair is not None:
                    similarity, strength = pair
                    redundant = redundant_channels(similarity, strength, params.similarity, candidates=live)
            state.pressured = self._capped(live, state.pressured, state.dead, redundant, rare, rate, strength, mask.channels)
            state.counts.zero_()
            totals["live"] += int(live.sum())
            totals["rare"] += int(rare.sum())
            totals["redundant"] += int(redundant.sum())
            totals["pressured"] += int(state.pressured.sum())
            totals["dead"] += int(state.dead.sum())
        dist.broadcast_(t for s in self._state.values() for t in (s.pressured, s.dead))
        self.history.append(totals)
        self._window_steps = 0
        self._windows += 1

    def _capped(self, live, pressured, dead, redundant, rare, rate, strength, channels: int) -> torch.Tensor:
        """The channels under pressure after a window: selected (``redundant | rare``) live channels, of
        which at most ``max_new_fraction`` of the live ones newly, all within max_pruned_fraction and
        min_channels. Priority: already under pressure, then the lowest rate, the weakest, the highest index."""
        selected = live & (redundant | rare)
        allowed = min(int(np.floor(self.params.max_pruned_fraction * channels)), channels - self.params.min_channels)
        room = max(0, allowed - int(dead.sum()))
        new_room = int(np.ceil(self.params.max_new_fraction * int(live.sum())))
        index = torch.nonzero(selected).flatten().tolist()
        index.sort(key=lambda c: (not bool(pressured[c]), float(rate[c]), float(strength[c]), -c))
        capped = torch.zeros_like(selected)
        taken = new = 0
        for c in index:
            if taken >= room:
                break
            if not bool(pressured[c]):
                if new >= new_room:
                    continue
                new += 1
            capped[c] = True
            taken += 1
        return capped

    def finalize_masks(self, model: nn.Module) -> MaskReport:
        self._ensure_state(model)
        prune = {}
        for name, _ in iter_masks(model):
            state = self._state[name]
            prune[name] = state.dead | state.pressured if self.params.finalize_pressured else state.dead.clone()
        return zero_channels(model, prune, self.params.min_channels)

    # -- state -----------------------------------------------------------------------------------------
    def _ensure_state(self, model: nn.Module) -> None:
        for name, mask in iter_masks(model):
            if name not in self._state or self._state[name].counts.numel() != mask.channels:
                channels = mask.channels
                self._state[name] = _MaskState(torch.zeros(channels, dtype=torch.int64),
                                               torch.zeros(channels, dtype=torch.bool),
                                               (mask.weight.detach() == 0).cpu())

    def channel_states(self) -> dict[str, dict[str, list[int]]]:
        """Per mask name: indices of channels under pressure and dead (for reports and tests)."""
        return {name: {"pressured": torch.nonzero(s.pressured).flatten().tolist(),
                       "dead": torch.nonzero(s.dead).flatten().tolist()} for name, s in self._state.items()}

    def state_dict(self) -> dict:
        return {"window_steps": self._window_steps, "windows": self._windows, "history": list(self.history),
                "masks": {name: {"counts": s.counts.clone(), "pressured": s.pressured.clone(), "dead": s.dead.clone(),
                                 "reference": [s.reference, s.reference_sum, s.reference_steps]}
                          for name, s in self._state.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._window_steps = int(state.get("window_steps", 0))
        self._windows = int(state.get("windows", 0))
        self.history = list(state.get("history", []))
        self._state = {}
        for name, s in state.get("masks", {}).items():
            reference, reference_sum, reference_steps = s.get("reference", (0.0, 0.0, 0))
            self._state[name] = _MaskState(s["counts"].clone(), s["pressured"].clone(), s["dead"].clone(),
                                           float(reference), float(reference_sum), int(reference_steps))
