"""``allocation="greedy"`` of :mod:`onnxslim.graph.allocate`: cost model, greedy trace, cut, prune, correct.

1. The model is analysed once; every layer's cost is its MACs (:func:`onnxslim.graph.greedy.macs_cost`,
   with the MACs of the layers no choice changes as a fixed rest) or its latency interpolated in the
   per-machine table (:class:`onnxslim.validate.latency_table.LatencyTable`; grids of the rounding
   multiple; layers without static shapes cost nothing and are named in a note).
2. :func:`onnxslim.graph.greedy.greedy_trace` orders the removals once.
3. For an internal target ``t`` the trace is cut where its estimate reaches ``t``; the cut is settled
   against the removal plan (:func:`onnxslim.graph.selection.settle_choice`) and pruned
   (:func:`onnxslim.graph.prune.prune_selection`) on a fresh analysis of the input (the analysis is a
   pure function of the model, so class ids match); the caller's measure says what it achieved, and
   :func:`onnxslim.graph.allocate.correct_target` moves ``t``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from onnxslim.errors import OnnxSlimError
from onnxslim.graph.greedy import GreedyTrace, LayerCost, greedy_trace, kept_counts, macs_cost
from onnxslim.graph.selection import Layer, Selection, settle_choice


@dataclasses.dataclass(frozen=True)
class GreedyRequest:
    """What the greedy measures against: the metric, the most any layer output may lose, the latency
    table's threads, cache folder, measuring function (None:
    :func:`onnxslim.validate.latency_table.measure_model`) and progress bar."""

    metric: str
    max_layer_ratio: float = 0.8
    threads: int = 1
    cache_dir: str | os.PathLike | None = None
    measure: Callable | None = None
    progress: bool = False


def prune_greedy(model: Any, measured: Callable[[Any, Any], float], target: float, request: GreedyRequest,
                 tolerance: float, max_steps: int, options: dict[str, Any]):
    """Steps 1-3 of the module docstring; returns ``(TargetResult, (slimmed, report, masked))``."""
    from onnxslim.graph.allocate import correct_target
    from onnxslim.graph.prune import channel_scores
    from onnxslim.graph.rounding import resolve_round_to
    from onnxslim.graph.slim import analyse, load_model

    rounding = resolve_round_to(options.get("round_to", 1), options.get("target_device"))
    source, _ = load_model(model)
    analysis = analyse(source, options.get("input_shapes"), rules=options.get("rules"))
    scores = channel_scores(analysis, options.get("criterion", "l1"), options.get("seed", 0))
    cost, rest, details, notes = _cost_model(analysis, request, rounding.multiple, options.get("input_shapes"))
    trace = greedy_trace(analysis, scores, cost, min_channels=options.get("min_channels", 1),
                         max_layer_ratio=request.max_layer_ratio, multiple=rounding.multiple, rest=rest)

    def evaluate(internal: float):
        chosen, estimate = trace.cut(internal)
        slimmed, report, masked = _prune_cut(model, chosen, rounding, options, notes)
        return measured(slimmed, report), (slimmed, report, masked, chosen, estimate)

    result, (slimmed, report, masked, chosen, estimate) = correct_target(
        lambda internal: trace.cut(internal)[1], evaluate, target, tolerance=tolerance, max_steps=max_steps)
    details = {**details, "estimate": estimate, "greedy_steps": len(trace.steps),
               "kept": _kept(trace, analysis, chosen)}
    report.notes.extend(_table_note(details))
    return dataclasses.replace(result, details=details), (slimmed, report, masked)


def _cost_model(analysis, request: GreedyRequest, multiple: int, shapes) -> tuple[LayerCost, float, dict, list[str]]:
    """(cost per layer, fixed rest, details for the report, notes)."""
    from onnxslim.graph.stats import count_macs

    index = analysis.index
    total, _, per_node = count_macs(index.model, index.shapes, analysis.rules)
    layer_macs = {name: float(per_node.get(index.node_name(node), 0)) for name, node in analysis.creators.items()}
    if request.metric == "macs":
        return macs_cost(analysis, layer_macs), float(total) - sum(layer_macs.values()), {}, []
    from onnxslim.validate.latency_table import LAYER_OPS, LatencyTable, layer_signature

    batch = _batch(shapes)
    signatures = {name: layer_signature(node, index, batch) for name, node in analysis.creators.items()}
    untimed = sorted({analysis.creators[name].op_type for name in signatures} - set(LAYER_OPS))
    if signatures and all(sig is None for sig in signatures.values()) and untimed:
        raise OnnxSlimError(f"--target-latency times {', '.join(LAYER_OPS)} layers alone; this model's layers are "
                            f"{', '.join(untimed)}: give --target-macs or --ratio instead")
    table = LatencyTable(request.threads, batch, multiple, request.cache_dir, request.measure)
    table.ensure((sig for sig in signatures.values() if sig is not None), progress=request.progress)
    missing = [node for name, node in analysis.creators.items() if signatures[name] is None]
    notes = []
    for timed, why in ((True, "without static shapes are not in it (give --input-shape)"),
                       (False, "of an op it cannot time alone are not in it (they count as no time)")):
        names = sorted(index.node_name(node) for node in missing if (node.op_type in LAYER_OPS) == timed)
        if names:
            notes.append(f"latency table: {len(names)} layer(s) {why}: " + ", ".join(names[:5])
                         + (" ..." if len(names) > 5 else ""))

    curves = {name: (sig, table.curve(sig)) for name, sig in signatures.items() if sig is not None}

    def cost(layer: Layer, removed_in: int, removed_out: int) -> float:
        if layer.name not in curves:
            return 0.0
        sig, curve = curves[layer.name]
        cin = sig.cin * (1 - removed_in / layer.in_size) if layer.in_size else sig.cin
        return curve(cin, sig.cout * (1 - removed_out / layer.size))

    details = {"table": str(table.path), "points_measured": table.measured, "points_cached": table.cached,
               "threads": request.threads, "batch": batch}
    return cost, 0.0, details, notes


def _batch(shapes: dict[str, list[int]] | None) -> int:
    """The request's batch: the leading dim of the given input shapes (1 when none is given)."""
    leading = [int(shape[0]) for shape in (shapes or {}).values() if shape]
    return max(leading) if leading else 1


def _prune_cut(model, chosen: set[int], rounding, options: dict[str, Any], notes: list[str]):
    """Prune the classes ``chosen`` (element ids of class roots) from a fresh analysis of ``model``."""
    from onnxslim.graph.prune import _criterion_notes, channel_scores, load_input, prune_selection
    from onnxslim.graph.slim import analyse

    masked, before = load_input(model, options.get("rules"))
    analysis = analyse(masked, options.get("input_shapes"), rules=options.get("rules"))
    settled = settle_choice(analysis, chosen) if chosen else set()
    criterion = options.get("criterion", "l1")
    selection = Selection(np.array(sorted(settled), np.int64), _criterion_notes(analysis, criterion) + list(notes))
    slimmed, report = prune_selection(masked, analysis, selection,
                                      channel_scores(analysis, criterion, options.get("seed", 0)), rounding,
                                      placement=options.get("placement", "consumers"),
                                      input_shapes=options.get("input_shapes"), rules=options.get("rules"),
                                      **before)
    return slimmed, report, masked


def _kept(trace: GreedyTrace, analysis, chosen: set[int]) -> dict[str, list[int]]:
    """Per layer: [kept, total] output channels the greedy's cut chose (before settling and rounding)."""
    return {name: list(counts) for name, counts in kept_counts(trace, analysis, chosen).items()}


def _table_note(details: dict) -> list[str]:
    if "table" not in details:
        return [f"greedy allocation on exact MACs: {details['greedy_steps']} steps; kept channels per layer: "
                "the table above (all of them with --all, JSON: target.details.kept)"]
    return [f"latency table: {details['table']} ({details['points_measured']} points measured now, "
            f"{details['points_cached']} cached; {details['threads']} thread(s), batch {details['batch']}); "
            f"greedy: {details['greedy_steps']} steps, estimate {details['estimate']:.3f} of the layers' latency; "
            "kept channels per layer: the table above (all with --all; JSON: target.details.kept)"]
