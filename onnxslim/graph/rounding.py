"""Channel counts the onnxruntime CPU kernels like: ``--round-to auto`` and ``--target-device``.

onnxruntime's CPU provider runs convolutions in a blocked layout, NCHWc (MLAS ``snchwc.cpp``; the
graph rewrite ``NchwcTransformer``): channels are packed in blocks of ``b`` floats, one SIMD register —
``b = 8`` with AVX/AVX2 (256-bit), ``b = 16`` with AVX-512F (512-bit); the ARM64 NEON NCHWc kernels
(``MLAS_NEON_NCHWC_BLOCK_SIZE``) use 16. A convolution is rewritten to NCHWc only when its input
channel count is a multiple of ``b`` (or the network input); its output count is padded up to ``b``.
A layer that keeps a count off the block therefore drops its *consumer* back to the plain NCHW
im2col + GEMM path, with layout reorders around it. The measurement behind this module
(``tools/bench_channel_sweep.py``, written down in ``docs/latency.md``) shows the step at every
multiple of ``b`` on this project's AVX2 machine.

The rule: ``auto`` = the NCHWc block size of the target (this machine's CPU unless one is named), except
on 4-wide (SSE) machines, where whole pruned models measured fastest at multiples of 8 (12 graphs at two
ratios, ``docs/latency.md``, "Rounding on a 4-wide machine"): ``auto`` = 8 there.

* ``slim`` (the masks decide): a count can only go *up* — extra masked channels are kept (those with
  the largest filter norms; :meth:`RemovalPlan.round_layers`), so the output stays exact.
* ``prune`` (channels still to be chosen): the *kept* count is rounded as Torch-Pruning's
  ``round_to`` does — to the nearest multiple (never below one block, never above the layer), by
  removing a few more or a few fewer of the lowest-scoring channels (:func:`round_choice`).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onnxslim.errors import OnnxSlimError
from onnxslim.graph.bundles import GroupStructures


@dataclasses.dataclass(frozen=True)
class Target:
    """A CPU family and the channel multiple its onnxruntime kernels want; ``reason`` says why."""

    name: str
    block: int  # the NCHWc block: channels per SIMD register of floats
    reason: str
    multiple: int = 0  # the kept-count multiple ``auto`` rounds to; 0: the block itself

    @property
    def round_to(self) -> int:
        """The multiple of channels ``--round-to auto`` keeps on this target: ``multiple`` where one was
        measured (8 on 4-wide SSE machines: docs/latency.md, "Rounding on a 4-wide machine"), else the
        NCHWc ``block`` of onnxruntime's convolution kernels."""
        return self.multiple or self.block


TARGETS: Mapping[str, Target] = {
    "x86-avx2": Target("x86-avx2", 8, "onnxruntime NCHWc convolutions use blocks of 8 channels with AVX/AVX2"),
    "x86-avx512": Target("x86-avx512", 16, "onnxruntime NCHWc convolutions use blocks of 16 channels with AVX-512F"),
    "arm64": Target("arm64", 16, "onnxruntime's ARM64 NEON NCHWc kernels use blocks of 16 channels, and its "
                                 "NEON SGEMM packs 16 columns"),
    "x86-sse": Target("x86-sse", 4, "onnxruntime NCHWc convolutions use blocks of 4 channels with SSE only; "
                                    + "whole models ran fastest at multiples of 8 (measured, docs/latency.md)", 8),
    "generic": Target("generic", 4, "no wide SIMD found: multiples of 4 (one 128-bit register of floats)"),
}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of this CPU from ``/proc/cpuinfo`` (``flags``/``Features``); empty elsewhere."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


@functools.lru_cache(maxsize=1)
def probe_nchwc_block() -> int | None:
    """The NCHWc block size the installed onnxruntime uses on this machine, found by asking it.

    A depthwise 3x3 Conv of ``b`` channels is converted to NCHWc only when ``b`` is a multiple of the
    block (``NchwcTransformer``); the smallest ``b`` in 4, 8, 16 whose optimised graph holds a
    ``com.microsoft.nchwc`` node is the block. None when none is (no NCHWc kernels: another provider,
    or an onnxruntime built without them). The answer can differ from what the CPU flags suggest (a
    virtual machine that hides AVX state from the OS gets the 4-wide SSE kernels).
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    for block in (4, 8, 16):
        weight = numpy_helper.from_array(np.ones((block, 1, 3, 3), np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], group=block, pads=[1, 1, 1, 1])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, block, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, block, 8, 8])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        with tempfile.TemporaryDirectory(prefix="onnxslim-probe-") as tmp:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            options.log_severity_level = 3
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            optimized = onnx.load(options.optimized_model_filepath)
        if any(node.domain == "com.microsoft.nchwc" for node in optimized.graph.node):
            return block
    return None


def detect_target(machine: str | None = None, flags: set[str] | None = None, probe: bool = True) -> Target:
    """The :class:`Target` of this machine: onnxruntime's own NCHWc block (``probe``, see
    :func:`probe_nchwc_block`), else the CPU's architecture and instruction-set flags."""
    if probe and machine is None and flags is None:
        block = probe_nchwc_block()
        if block is not None:
            import onnxruntime as ort

            named = {4: "x86-sse", 8: "x86-avx2", 16: "x86-avx512"}
            name = "arm64" if platform.machine().lower() in ("aarch64", "arm64") else named[block]
            multiple = TARGETS[name].multiple if name in TARGETS else 0
            why = f"; {TARGETS[name].reason.split('; ', 1)[1]}" if multiple else ""
            return Target(name, block, f"onnxruntime {ort.__version__} on this machine runs NCHWc convolutions in "
                                       f"blocks of {block} channels (probed: a depthwise Conv of {block} channels "
                                       f"is converted, none narrower){why}", multiple)
    machine = (machine or platform.machine()).lower()
    flags = cpu_flags() if flags is None else flags
    if machine in ("aarch64", "arm64"):
        found = TARGETS["arm64"]
        return dataclasses.replace(found, reason=f"this CPU is {machine}: {found.reason}")
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if "avx512f" in flags:
            found = TARGETS["x86-avx512"]
            return dataclasses.replace(found, reason=f"this CPU has AVX-512F: {found.reason}")
        if "avx2" in flags or "avx" in flags or not flags:
            found = TARGETS["x86-avx2"]
            seen = "AVX2" if "avx2" in flags else "AVX" if "avx" in flags else "x86 (flags unknown)"
            return dataclasses.replace(found, reason=f"this CPU has {seen}: {found.reason}")
    return TARGETS["generic"]


@dataclasses.dataclass(frozen=True)
class Rounding:
    """What ``round_to`` resolved to: the multiple (1 = none), the target and the reason, for reports."""

    multiple: int
    requested: str
    target: str | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.requested != "auto":
            return f"round-to {self.multiple}" + (" (off)" if self.multiple == 1 else "")
        return f"round-to auto = {self.multiple} for {self.target} ({self.reason})"

    def to_dict(self, kept_counts: bool = False) -> dict:
        """For reports; ``kept_counts``: prune's rounding of kept counts (else slim's extra channels)."""
        how = ("kept counts rounded to the nearest multiple" if kept_counts
               else "extra masked channels kept up to the multiple")
        return {**dataclasses.asdict(self), "description": f"{self.describe()}; {how}"}


def parse_round_to(round_to: int | str | None) -> int | str:
    """``round_to`` checked: ``"auto"`` (also for None) or an int >= 1 (digit strings accepted).

    Raises :class:`OnnxSlimError` for anything else. Never probes onnxruntime.
    """
    if round_to is None or round_to == "auto":
        return "auto"
    if isinstance(round_to, bool):
        raise OnnxSlimError(f"round_to must be 'auto' or an integer >= 1, got {round_to!r}")
    if isinstance(round_to, str) and round_to.strip().isdigit():
        round_to = int(round_to)
    if not isinstance(round_to, int) or round_to < 1:
        raise OnnxSlimError(f"round_to must be 'auto' or an integer >= 1, got {round_to!r}")
    return round_to


def resolve_round_to(round_to: int | str | None, target_device: str | None = None) -> Rounding:
    """``round_to`` (see :func:`parse_round_to`) as a :class:`Rounding`; ``auto`` is the NCHWc block of
    ``target_device`` (a key of :data:`TARGETS`) or of this machine (:func:`detect_target`).

    Raises :class:`OnnxSlimError` for a bad value or an unknown target.
    """
    if target_device is not None and target_device not in TARGETS:
        raise OnnxSlimError(f"unknown target device {target_device!r}; choose one of {', '.join(TARGETS)}")
    parsed = parse_round_to(round_to)
    if parsed != "auto":
        return Rounding(int(parsed), str(parsed))
    target = TARGETS[target_device] if target_device else detect_target()
    reason = f"named target: {target.reason}" if target_device else target.reason
    return Rounding(target.round_to, "auto", target.name, reason)


def rounded_kept(kept: int, total: int, multiple: int) -> int:
    """Torch-Pruning's rounding of a kept count: the nearest multiple, at least one, at most ``total``.

    A layer narrower than ``multiple`` keeps ``kept``; a result above ``total`` falls to the multiple below.
    """
    if multiple <= 1 or total < multiple or kept == total:
        return kept
    target = max(multiple, int(np.floor(kept / multiple + 0.5)) * multiple)
    return target if target <= total else (total // multiple) * multiple


def removed_channels(analysis, chosen: np.ndarray, layers) -> int:
    """How many output channels of ``layers`` (creating tensors' names) the classes ``chosen`` (root ids) remove."""
    roots, chosen_set = analysis.uf.roots(), {int(r) for r in chosen}
    return sum(int(root) in chosen_set for name in layers for root in roots[analysis.info[name].ids])


def rounding_note(analysis, chosen: np.ndarray, rounded: np.ndarray, layers, multiple: int) -> list[str]:
    """A note when rounding the kept counts changed how many channels of ``layers`` go ([] when not)."""
    before, after = removed_channels(analysis, chosen, layers), removed_channels(analysis, rounded, layers)
    if before == after:
        return []
    return [f"round-to {multiple}: the kept counts rounded to multiples of {multiple} remove {after} layer output "
            f"channels where the choice removed {before} (--round-to 1 removes exactly the choice)"]


def _own_goal(kept: int, total: int, multiple: int, low: int, high: int) -> int:
    """The kept count a layer rounds to: :func:`rounded_kept`, unless that needs classes of earlier layers
    while some multiple (or the whole layer) is reachable in ``[low, high]``, the counts that changing
    only the layer's own free classes gives; then the reachable one nearest to ``kept``."""
    goal = rounded_kept(kept, total, multiple)
    if low <= goal <= high:
        return goal
    reachable = [m for m in range(-(-max(low, 1) // multiple) * multiple, high + 1, multiple)]
    reachable += [total] if low <= total <= high else []
    return min(reachable, key=lambda m: (abs(m - kept), m)) if reachable else goal


def round_choice(analysis, chosen: np.ndarray, scores: Mapping[str, np.ndarray], multiple: int,
                 locked: np.ndarray, passes: int = 8) -> np.ndarray:
    """Adjust the chosen classes (element ids of class roots) so every scored layer keeps a multiple.

    Per creating layer (``scores`` keys, one score per output channel): the kept count is rounded by
    :func:`rounded_kept`; to keep fewer, the lowest-scoring free classes of the layer are chosen too;
    to keep more, its highest-scoring chosen classes are given back. Classes that no layer visited before
    has (in graph order) go first, and the goal is the nearest multiple that changing only those reaches
    when there is one (:func:`_own_goal`): the earlier layers stay as rounded, so a residual stream that
    each block widens with zero-padded channels (BlazeFace: 24, 28, 32 ... 96) settles instead of giving
    everything back. Around grouped convs classes are taken and given back in bundles that keep the groups
    equal (:class:`onnxslim.graph.bundles.GroupStructures`; one class at a time unbalanced them, and
    slim gave back 2856 of ShuffleNet v1's 6776 masked channels). Coupled layers share classes, so a few
    passes settle them (a layer may end off the multiple when its coupled layers disagree; ``slim``'s
    rounding then keeps extra channels). Returns the new sorted root ids.
    """
    if multiple <= 1:
        return chosen
    roots = analysis.uf.roots()
    groups = GroupStructures(analysis)
    score: dict[int, float] = {}
    for name, layer_scores in scores.items():
        for root, value in zip(roots[analysis.info[name].ids].tolist(), np.asarray(layer_scores).tolist()):
            score[root] = score.get(root, 0.0) + float(value)
    chosen_set = {int(r) for r in chosen}
    for _ in range(passes):
        changed = False
        seen: set[int] = set()  # the classes of the layers visited before, in this pass
        for name, layer_scores in scores.items():
            layer_roots = roots[analysis.info[name].ids]
            shared = np.array([int(r) in seen for r in layer_roots])
            seen.update(int(r) for r in layer_roots)
            removed = np.array([int(r) in chosen_set for r in layer_roots])
            kept, total = int((~removed).sum()), len(layer_roots)
            held = np.array([bool(locked[r]) for r in layer_roots], bool)
            goal = _own_goal(kept, total, multiple, int((~removed & (shared | held)).sum()),
                             int((~removed | ~shared).sum()))
            if goal == kept:
                continue
            if goal < kept:  # own classes first, lowest score first
                order = np.lexsort((layer_scores, shared))
                picked = _bundled([int(layer_roots[i]) for i in order if not removed[i] and not locked[layer_roots[i]]],
                                  kept - goal, layer_roots, groups, lambda r: not locked[r] and r not in chosen_set,
                                  score)
                chosen_set.update(picked)
            else:  # own classes first, highest score first
                order = np.lexsort((-np.asarray(layer_scores, np.float64), shared))
                negated = {r: -v for r, v in score.items()}
                picked = _bundled([int(layer_roots[i]) for i in order if removed[i]], goal - kept, layer_roots,
                                  groups, lambda r: r in chosen_set, negated)
                chosen_set.difference_update(picked)
            changed |= bool(picked)
        if not changed:
            break
    return np.array(sorted(chosen_set), np.int64)


def _bundled(candidates: list[int], count: int, layer_roots: np.ndarray, groups, free, score) -> list[int]:
    """Classes from ``candidates`` (in order), each with its bundle, covering exactly ``count`` channels
    of the layer (``layer_roots``: its channels' classes); a bundle that would overshoot is skipped, and
    none are returned when ``count`` is not reached (the layer then stays unrounded, as slim leaves it)."""
    width = dict(zip(*np.unique(layer_roots, return_counts=True)))
    picked: dict[int, None] = {}
    covered = 0
    for root in dict.fromkeys(candidates):
        if covered >= count:
            break
        if root in picked:
            continue
        bundle = groups.bundle(root, lambda r: free(r) and r not in picked, score, whole=False)
        n = sum(int(width.get(r, 0)) for r in bundle)
        if bundle and covered + n <= count:
            picked.update(dict.fromkeys(bundle))
            covered += n
    return list(picked) if covered == count else []
