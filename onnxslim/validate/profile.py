"""Per-layer latency from onnxruntime's own profiler, and a before/after table of two models.

Source: onnxruntime's built-in profiler (``SessionOptions.enable_profiling``; the Chrome-trace JSON it
writes, one ``"cat": "Node"`` event named ``<node>_kernel_time`` per executed node and run, ``dur`` in
microseconds, ``args.op_name`` the operator; one ``"cat": "Session"`` event ``model_run`` per run).

Procedure: one session with profiling on; ``warmup + runs`` runs of the same random feed; a node's
events are attributed to the run whose ``model_run`` interval contains them and the first ``warmup``
runs are dropped. Per node: the median over runs of its kernel time. The nodes are those onnxruntime
*executes*, after its graph optimisations: fused nodes (``Conv`` + ``Relu``), NCHWc layout nodes
(``ReorderInput``/``ReorderOutput``) and renamed nodes appear as onnxruntime names them; with
``opt_level="disable"`` they are the model's own nodes. ``overhead_ms`` is the median run time minus the
kernels' sum (the executor, allocation, Python binding).

Unnamed nodes are named after their first output before profiling (onnxruntime would number them,
and numbers differ between a model and its slimmed copy). Comparing two models
(:func:`compare_profiles`) matches nodes by name (slim keeps node and tensor names), then by op type
and position for nodes without a partner.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxslim.errors import OnnxSlimError
from onnxslim.validate.runtime import (
    ModelSource,
    SessionOptions,
    create_session,
    input_specs,
    model_name,
    random_feeds,
    resolve_shapes,
)

_KERNEL_SUFFIX = "_kernel_time"


@dataclasses.dataclass(frozen=True)
class LayerTime:
    """One executed node: median kernel time over the profiled runs, in milliseconds."""

    node: str
    op_type: str
    median_ms: float
    output_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """All executed nodes of one model in execution order, with the run's median total (ms)."""

    name: str
    layers: tuple[LayerTime, ...]
    run_ms: float
    runs: int
    threads: int

    @property
    def kernels_ms(self) -> float:
        return float(sum(layer.median_ms for layer in self.layers))

    @property
    def overhead_ms(self) -> float:
        return max(self.run_ms - self.kernels_ms, 0.0)

    def by_op(self) -> dict[str, float]:
        """Milliseconds per operator type, largest first."""
        totals: dict[str, float] = {}
        for layer in self.layers:
            totals[layer.op_type] = totals.get(layer.op_type, 0.0) + layer.median_ms
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "run_ms": self.run_ms, "kernels_ms": self.kernels_ms,
                "overhead_ms": self.overhead_ms, "runs": self.runs, "threads": self.threads,
                "by_op_ms": self.by_op(), "layers": [dataclasses.asdict(layer) for layer in self.layers]}


def profile_layers(model: ModelSource, session_options: SessionOptions | None = None, *, runs: int = 20,
                   warmup: int = 3, batch_size: int | None = None, input_shapes: dict | None = None,
                   seed: int = 0, name: str | None = None) -> LayerProfile:
    """Profile ``model`` with onnxruntime's profiler; see the module docstring.

    Raises :class:`OnnxSlimError` for a model onnxruntime cannot load or run, or ``runs < 1``.
    """
    if runs < 1 or warmup < 0:
        raise OnnxSlimError(f"need runs >= 1 and warmup >= 0, got {runs}, {warmup}")
    session_options = session_options or SessionOptions()
    label = name or model_name(model)
    model = _named_nodes(model)
    with tempfile.TemporaryDirectory(prefix="onnxslim-profile-") as tmp:
        traced = dataclasses.replace(session_options, profile_prefix=str(Path(tmp) / "trace"))
        session = create_session(model, traced)
        specs = input_specs(session)
        shapes = resolve_shapes(specs, input_shapes or {}, batch_size, label=label)
        feed = random_feeds(specs, shapes, seed=seed)
        for _ in range(warmup + runs):
            session.run(None, feed)
        trace_path = session.end_profiling()
        events = json.loads(Path(trace_path).read_text())
    layers, run_ms = parse_trace(events, skip_runs=warmup)
    return LayerProfile(label, layers, run_ms, runs, session_options.threads)


def profiler_overhead_note(profiles: Sequence[LayerProfile], timed_medians_ms: Sequence[float],
                           limit: float = 1.5) -> str | None:
    """A caveat when profiling inflates a run: some model's profiled median run (``run_ms``) exceeds ``limit``
    times its timed median (``timed_medians_ms``, ms, the A/B benchmark's, same order), as on models of a
    fraction of a millisecond where the profiler's per-node events cost as much as the kernels. None otherwise."""
    worst = max(((p.run_ms / t, p, t) for p, t in zip(profiles, timed_medians_ms) if t > 0),
                default=None, key=lambda item: item[0])
    if worst is None or worst[0] <= limit:
        return None
    ratio, profile, timed = worst
    return (f"note: profiling inflates these runs ({profile.name}: {profile.run_ms:.3f} ms profiled against "
            f"{timed:.3f} ms timed, {ratio:.1f}x); per-node times of a model this fast are mostly the profiler's "
            f"own cost: trust the A/B speedup above")


def _named_nodes(model: ModelSource) -> ModelSource:
    """``model`` with every unnamed node named after its first output (a copy; files stay untouched)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        if all(node.name for node in model.graph.node):
            return model
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    else:
        path = Path(model)
        if path.suffix.lower() == ".ort" or not path.is_file():
            return model
        try:
            copy = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - not parseable here: the session will report it
            return model
        if all(node.name for node in copy.graph.node) or any(
                t.data_location == onnx.TensorProto.EXTERNAL for t in copy.graph.initializer):
            return model
    for node in copy.graph.node:
        if not node.name and node.output:
            node.name = node.output[0]
    return copy


def parse_trace(events: Sequence[dict], skip_runs: int = 0) -> tuple[tuple[LayerTime, ...], float]:
    """Per-node median kernel time (ms) and the median run time (ms) from an onnxruntime trace."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip_runs:]
    if not runs:
        raise OnnxSlimError("the onnxruntime profile holds no timed run")
    starts = np.array([start for start, _ in runs])
    per_node: dict[str, list[float]] = {}
    facts: dict[str, tuple[str, tuple[int, ...]]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(_KERNEL_SUFFIX):
            continue
        position = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if position < 0 or event["ts"] > runs[position][1]:
            continue  # a warm-up run
        node = event["name"][: -len(_KERNEL_SUFFIX)]
        per_node.setdefault(node, [0.0] * len(runs))[position] += event["dur"] / 1000.0
        if node not in facts:
            facts[node] = (event.get("args", {}).get("op_name", "?"), _output_shape(event))
    layers = tuple(LayerTime(node, facts[node][0], float(np.median(times)), facts[node][1])
                   for node, times in per_node.items())
    return layers, float(np.median([(end - start) / 1000.0 for start, end in runs]))


def _output_shape(event: dict) -> tuple[int, ...]:
    shapes = event.get("args", {}).get("output_type_shape") or [{}]
    dims = next(iter(shapes[0].values()), []) if shapes[0] else []
    return tuple(int(d) for d in dims)


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    """One node before and after (None where the node exists on one side only); times in ms. For a
    conv / GEMM / MatMul node (:func:`layer_macs`), its MACs before and after (None otherwise)."""

    node: str
    op_type: str
    before_ms: float | None
    after_ms: float | None
    macs_before: int | None = None
    macs_after: int | None = None

    @property
    def speedup(self) -> float | None:
        if self.before_ms is None or not self.after_ms:
            return None
        return self.before_ms / self.after_ms

    @property
    def macs_ratio(self) -> float | None:
        """MACs before / after: the speedup the MACs promise for this layer."""
        if not self.macs_before or not self.macs_after:
            return None
        return self.macs_before / self.macs_after


def compare_profiles(before: LayerProfile, after: LayerProfile,
                     macs: tuple[dict[str, int], dict[str, int]] | None = None) -> list[LayerComparison]:
    """Nodes of both models paired (:func:`pair_layers`), in ``before``'s execution order, then ``after``-only
    nodes. ``macs``: (:func:`layer_macs` of ``before``, of ``after``), to give the MAC nodes their MACs."""
    before_macs, after_macs = macs or ({}, {})
    partners = pair_layers(before, after)
    rows = []
    for layer in before.layers:
        partner = partners.get(layer.node)
        rows.append(LayerComparison(layer.node, layer.op_type, layer.median_ms,
                                    partner.median_ms if partner else None, before_macs.get(layer.node),
                                    after_macs.get(partner.node) if partner else None))
    paired = {partner.node for partner in partners.values()}
    rows.extend(LayerComparison(layer.node, layer.op_type, None, layer.median_ms, None, after_macs.get(layer.node))
                for layer in after.layers if layer.node not in paired)
    return rows


def layer_macs(profile: LayerProfile, model, input_shapes: dict[str, list[int]] | None = None) -> dict[str, int]:
    """Executed node name in ``profile`` -> the MACs of the conv / GEMM / MatMul node of ``model`` it runs
    (fused and NCHWc forms resolved, :func:`_mac_node_resolver`; MACs per
    :func:`onnxslim.graph.stats.model_stats`). Nodes whose MACs cannot be counted (dynamic shapes not
    fixed by ``input_shapes``) are left out."""
    from onnxslim.graph.stats import model_stats

    model = _loaded_named(model)
    counted = model_stats(model, input_shapes).layer_macs
    resolve = _mac_node_resolver(model)
    found = {layer.node: resolve(layer.node) for layer in profile.layers if layer.op_type in _MAC_OPS}
    return {node: counted[name] for node, name in found.items() if counted.get(name)}


def pair_layers(before: LayerProfile, after: LayerProfile, by_op_type: bool = True) -> dict[str, LayerTime]:
    """``before``'s node name -> its partner in ``after``: the node of the same name (slim keeps node and
    tensor names; a trailing ``_nchwc`` of onnxruntime's layout pass ignored), then, with ``by_op_type``,
    for nodes left without one (onnxruntime numbers the nodes it inserts, ``ReorderInput_token_12``), the
    next unpaired ``after`` node of the same op type in execution order."""
    remaining = {layer.node.removesuffix("_nchwc"): layer for layer in after.layers}
    partners = {}
    for layer in before.layers:
        partner = remaining.pop(layer.node.removesuffix("_nchwc"), None)
        if partner is not None:
            partners[layer.node] = partner
    for layer in before.layers if by_op_type else ():
        if layer.node not in partners:
            key = next((k for k, other in remaining.items() if other.op_type == layer.op_type), None)
            if key is not None:
                partners[layer.node] = remaining.pop(key)
    return partners


def format_comparison(before: LayerProfile, after: LayerProfile, max_rows: int | None = 30,
                      macs: tuple[dict[str, int], dict[str, int]] | None = None) -> str:
    """Terminal table: the slowest nodes of ``before`` (all with ``max_rows=None``), then totals. With
    ``macs`` (see :func:`compare_profiles`) the MAC nodes also get their MACs ratio and speedup / MACs
    ratio, and a line compares the MAC nodes' time with the rest's (where a shortfall against the MACs
    ratio comes from)."""
    from onnxslim.validate.bench import _text_table

    rows = compare_profiles(before, after, macs)
    ordered = sorted(rows, key=lambda r: -max(r.before_ms or 0.0, r.after_ms or 0.0))
    shown = ordered if max_rows is None else ordered[:max_rows]
    total = before.run_ms or 1.0

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def ratio(value: float | None, unit: str = "x") -> str:
        return f"{value:.2f}{unit}" if value else "-"

    table = [(r.node[:48], r.op_type, ms(r.before_ms), ms(r.after_ms), ratio(r.speedup),
              f"{100 * (r.before_ms or 0.0) / total:.1f} %", ratio(r.macs_ratio),
              ratio(r.speedup / r.macs_ratio if r.speedup and r.macs_ratio else None, ""))
             for r in shown]
    columns = ("node", "op", "before ms", "after ms", "speedup", "share before", "MACs ratio", "speedup / MACs")
    if macs is None:
        columns, table = columns[:6], [row[:6] for row in table]
    lines = [f"per-layer latency (onnxruntime profiler, median of {before.runs} runs, {before.threads} thread(s)): "
             f"{before.name} -> {after.name}"]
    lines += _text_table(columns, table)
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} faster nodes not shown")
    lines.append(f"kernels {before.kernels_ms:.3f} -> {after.kernels_ms:.3f} ms; overhead {before.overhead_ms:.3f} -> "
                 f"{after.overhead_ms:.3f} ms; run {before.run_ms:.3f} -> {after.run_ms:.3f} ms")
    if macs is not None:
        lines.append(_mac_share_line(rows))
    by_op = [(op, f"{t:.3f}", f"{after.by_op().get(op, 0.0):.3f}") for op, t in before.by_op().items()]
    lines += ["", *_text_table(("op", "before ms", "after ms"), by_op)]
    return "\n".join(lines)


def _mac_share_line(rows: Sequence[LayerComparison]) -> str:
    """One line: the conv / GEMM nodes' kernel time before -> after against their MACs ratio, and the other
    nodes' (element-wise, pooling, layout), whose time shrinks at most with their output size."""
    counted = [r for r in rows if r.macs_ratio and r.before_ms and r.after_ms]
    mac_before, mac_after = sum(r.before_ms for r in counted), sum(r.after_ms for r in counted)
    macs_before, macs_after = sum(r.macs_before for r in counted), sum(r.macs_after for r in counted)
    rest_before = sum(r.before_ms or 0.0 for r in rows) - mac_before
    rest_after = sum(r.after_ms or 0.0 for r in rows) - mac_after
    if not counted or not rest_after:
        return "MACs per layer: none could be paired and counted"
    return (f"conv/GEMM nodes: {mac_before:.3f} -> {mac_after:.3f} ms ({mac_before / mac_after:.2f}x) for a MACs "
            f"ratio of {macs_before / macs_after:.2f}x; other nodes: {rest_before:.3f} -> {rest_after:.3f} ms "
            f"({rest_before / rest_after:.2f}x)")


def format_profile(profile: LayerProfile, max_rows: int | None = 30) -> str:
    """Terminal table of one model's slowest nodes."""
    from onnxslim.validate.bench import _text_table

    ordered = sorted(profile.layers, key=lambda layer: -layer.median_ms)
    shown = ordered if max_rows is None else ordered[:max_rows]
    total = profile.run_ms or 1.0
    lines = [f"per-layer latency (onnxruntime profiler, median of {profile.runs} runs, {profile.threads} thread(s)): "
             f"{profile.name}"]
    lines += _text_table(("node", "op", "ms", "share", "output"),
                         [(layer.node[:48], layer.op_type, f"{layer.median_ms:.3f}",
                           f"{100 * layer.median_ms / total:.1f} %", "x".join(map(str, layer.output_shape)))
                          for layer in shown])
    lines.append(f"kernels {profile.kernels_ms:.3f} ms, overhead {profile.overhead_ms:.3f} ms, run {profile.run_ms:.3f} ms")
    return "\n".join(lines)


def plot_layer_latency(profiles: Sequence[LayerProfile], path, max_layers: int = 40) -> Path:
    """PNG: grouped horizontal bars of per-node time for every profile (the first one's slowest nodes)."""
    from onnxslim.plots import _figure, _save

    if not profiles or not profiles[0].layers:
        raise OnnxSlimError("no per-layer times to plot")
    base = sorted(profiles[0].layers, key=lambda layer: -layer.median_ms)[:max_layers]
    names = [layer.node for layer in base]
    figure = _figure(9.0, max(3.0, 0.28 * len(names) * max(1, len(profiles)) / 1.5 + 1.5))
    axes = figure.add_subplot(1, 1, 1)
    height = 0.8 / len(profiles)
    y = np.arange(len(names))
    for k, profile in enumerate(profiles):
        times = {layer.node: layer.median_ms for layer in profile.layers}
        axes.barh(y + k * height, [times.get(n, 0.0) for n in names], height=height,
                  label=f"{profile.name} ({profile.run_ms:.2f} ms/run)")
    axes.set_yticks(y + height * (len(profiles) - 1) / 2)
    axes.set_yticklabels([n[:40] for n in names], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("median kernel time per run (ms), onnxruntime profiler")
    axes.set_title(f"Per-layer latency, {profiles[0].threads} thread(s)")
    axes.legend(fontsize=8)
    return _save(figure, path)


# onnxruntime ops that run a layer counted in MACs (its own op, or its fused / NCHWc form)
_MAC_OPS = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
            # quantized layers (QOperator, dynamic int8) and what onnxruntime fuses them into
            "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul")


def dense_rate_kernels_ms(before: LayerProfile, after: LayerProfile, before_model, after_model,
                     input_shapes: dict[str, list[int]] | None = None) -> float:
    """The kernel time (ms) ``after_model`` would take if each of its layers ran at ``before_model``'s
    time per unit of work: what these channel counts give when no layer gets less (or more) efficient.

    For each node executed in ``before`` (its profiled kernel time ``t``): a conv / GEMM / MatMul node
    (``_MAC_OPS``, fused or NCHWc forms resolved to the model's node) counts ``t * MACs_after / MACs_before``
    (MACs per :func:`onnxslim.graph.stats.model_stats`, per node); another node ``t`` times its output
    size after over before (its partner of the same name in ``after``, :func:`pair_layers`). Nodes without
    a partner of the same name are the ones onnxruntime inserts and numbers per session (NCHWc
    ``ReorderInput_token_12``; their order and number change with the channel counts): they count at
    the time ``after`` measured for its own such nodes (those that are not a model's MAC node under
    another fused name). So ``before.kernels_ms / dense_rate_kernels_ms(...)`` is the kernel speedup of
    the pruned channel counts at the dense rate, and dividing it by the MACs ratio gives the efficiency
    the channel counts allow: below 1 when the layers whose MACs shrink least (depthwise convs, stems,
    element-wise ops) hold more of the time than of the MACs. An estimate, not a bound: narrow layers can
    run slower per MAC, smaller tensors that stay in cache faster. Kernel time only: the profiler's own
    per-node cost inflates ``run_ms`` on small models. ``input_shapes`` fixes dynamic input dims for the
    MAC counts.
    Raises :class:`OnnxSlimError` when a model's MACs cannot be counted.
    """
    from onnxslim.graph.stats import model_stats

    before_model, after_model = _loaded_named(before_model), _loaded_named(after_model)
    stats = [model_stats(m, input_shapes) for m in (before_model, after_model)]
    if not all(s.macs_complete for s in stats):
        raise OnnxSlimError("the MACs of some layer cannot be counted (dynamic shapes): give input_shapes")
    resolve = _mac_node_resolver(before_model)
    names = {node.name for node in before_model.graph.node} | {o for node in before_model.graph.node for o in node.output}
    partners = {node: partner for node, partner in pair_layers(before, after, by_op_type=False).items()
                if node.removesuffix("_nchwc") in names}  # not onnxruntime's own "ReorderOutput" of each session
    paired = {partner.node for partner in partners.values()}
    after_resolve = _mac_node_resolver(after_model)
    total = sum(layer.median_ms for layer in after.layers  # onnxruntime's own nodes, at their time after
                if layer.node not in paired and not (layer.op_type in _MAC_OPS and after_resolve(layer.node)))
    for layer in before.layers:
        node = resolve(layer.node) if layer.op_type in _MAC_OPS else None
        partner = partners.get(layer.node)
        if node is not None and node in stats[1].layer_macs and stats[0].layer_macs.get(node):
            total += layer.median_ms * stats[1].layer_macs[node] / stats[0].layer_macs[node]
        elif partner is not None and np.prod(layer.output_shape) > 0:
            total += layer.median_ms * np.prod(partner.output_shape) / np.prod(layer.output_shape)
    return float(total)


def _loaded_named(model):
    """``model`` (a path or a ModelProto) as a ModelProto whose nodes are named as :func:`_named_nodes`
    names them for the profiler (weights not loaded from external files: only shapes are read)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return _named_nodes(model)


def _mac_node_resolver(model):
    """A function: onnxruntime's name for an executed node -> the name of the model's MAC-counting node
    it runs, or None. onnxruntime names a fused node (Conv + Relu, Conv + Add) after the last op it
    absorbed, an NCHWc node after its output tensor plus ``_nchwc``, a node its layout pass rewrote (an
    int8 QLinearConv) after the node plus ``_token_<n>``; so the name is looked up as a node
    name, then as a tensor name (its producer), and followed back to a MAC-counting producer (3 steps)."""
    from onnxslim.graph.rules import default_rules

    rules = default_rules()
    nodes = {node.name: node for node in model.graph.node}
    producers = {output: node for node in model.graph.node for output in node.output}

    def resolve(name: str):
        name = re.sub(r"_token_\d+$", "", name.removesuffix("_nchwc"))  # layout passes' copies (QLinearConv)
        node = nodes.get(name) or producers.get(name)
        for _ in range(3):
            if node is None or rules.rule_for(node).counts_macs:
                break
            upstream = [producers[i] for i in node.input if i in producers]
            node = next((n for n in upstream if rules.rule_for(n).counts_macs), upstream[0] if upstream else None)
        return node.name if node is not None and rules.rule_for(node).counts_macs else None

    return resolve
