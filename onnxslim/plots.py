"""PNG plots for reports, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

* :func:`plot_layer_channels` — output channels per layer before and after slimming (bars), from the
  slim report's ``layers`` (objects or dicts with node, op_type, channels_before, channels_after and
  optionally module — the PyTorch module path, shown instead of the ONNX node name — or 4-tuples).
* :func:`plot_latency` — latency distributions per model (box plot over the per-run samples: median,
  quartiles, p5-p95 whiskers; one panel per thread/batch configuration), from a
  :class:`~onnxslim.validate.bench.BenchReport` or ``{name: samples_ms}``.
* :func:`plot_accuracy_vs_macs` — accuracy against MACs, one point per run, labelled by method, from
  dicts with ``method``, ``macs`` and ``accuracy`` (0..1).

Each function writes the file atomically and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxslim.errors import OnnxSlimError
from onnxslim.io import write_with_atomic


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    figure.tight_layout()
    write_with_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path


def _layer_tuple(layer: Any) -> tuple[str, str, int, int]:
    """(label, op_type, before, after); the label is the PyTorch module path when the layer has one."""
    if isinstance(layer, Mapping):
        return (layer.get("module") or layer["node"], layer["op_type"], int(layer["channels_before"]),
                int(layer["channels_after"]))
    if isinstance(layer, Sequence) and not isinstance(layer, str):
        node, op_type, before, after = layer
        return str(node), str(op_type), int(before), int(after)
    label = getattr(layer, "module", "") or layer.node
    return label, layer.op_type, int(layer.channels_before), int(layer.channels_after)


def plot_layer_channels(layers: Iterable[Any], path: str | os.PathLike, title: str = "Channels per layer") -> Path:
    """Grouped bars of output channels before/after for every layer, in graph order."""
    rows = [_layer_tuple(layer) for layer in layers]
    if not rows:
        raise OnnxSlimError("no layers to plot")
    import numpy as np

    figure = _figure(max(6.0, min(0.35 * len(rows) + 2, 40.0)), 4.5)
    axes = figure.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    before = [r[2] for r in rows]
    after = [r[3] for r in rows]
    axes.bar(x - 0.2, before, width=0.4, label="before", color="#b0b0b0")
    axes.bar(x + 0.2, after, width=0.4, label="after", color="#1f77b4")
    axes.set_xticks(x)
    axes.set_xticklabels([f"{r[0]} ({r[1]})" for r in rows], rotation=90, fontsize=7)
    axes.set_ylabel("output channels")
    axes.set_title(f"{title}: {sum(after)} / {sum(before)} channels kept")
    axes.legend()
    return _save(figure, path)


def plot_latency(source: Any, path: str | os.PathLike, title: str = "Latency per run") -> Path:
    """Box plots of per-run latency per model; one panel per configuration (threads, batch) of a report."""
    if isinstance(source, Mapping):
        panels = {"": {str(name): list(samples) for name, samples in source.items()}}
    else:
        panels = {f"{c.threads} thread(s), batch {c.batch_size}": {t.name: list(t.samples_ms) for t in c.models}
                  for c in source.configs}
    panels = {label: {k: v for k, v in series.items() if len(v)} for label, series in panels.items()}
    panels = {label: series for label, series in panels.items() if series}
    if not panels:
        raise OnnxSlimError("no latency samples to plot")
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    widest = max(len(series) for series in panels.values())
    figure = _figure(columns * max(4.0, 1.1 * widest + 1.5), rows * 4.0)
    for index, (label, series) in enumerate(panels.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        # runs beyond p5-p95 (a scheduler hiccup on a shared machine) would flatten the boxes: not drawn
        axes.boxplot(list(series.values()), showfliers=False, whis=(5, 95))
        axes.set_xticks(range(1, len(series) + 1))
        axes.set_xticklabels(list(series), rotation=20, ha="right", fontsize=8)
        axes.set_ylabel("ms per run (box p25-p75, whiskers p5-p95)", fontsize=8)
        axes.set_title(f"{title}: {label}" if label else title, fontsize=10)
        axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_accuracy_vs_macs(runs: Iterable[Mapping[str, Any]], path: str | os.PathLike,
                          title: str = "Accuracy vs MACs") -> Path:
    """Scatter of accuracy (%) against MACs (log scale), one colour per method, one panel per ``label``."""
    runs = list(runs)
    if not runs:
        raise OnnxSlimError("no runs to plot")
    for run in runs:
        missing = {"method", "macs", "accuracy"} - set(run)
        if missing:
            raise OnnxSlimError(f"run {run!r} lacks {', '.join(sorted(missing))}")
    # one panel per label (model): accuracies and MACs of different models do not share a scale
    labels = list(dict.fromkeys(str(run.get("label", "")) for run in runs))
    figure = _figure(5.0 * len(labels) + 1.0, 4.5)
    methods = sorted({str(run["method"]) for run in runs})
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    for index, label in enumerate(labels, start=1):
        axes = figure.add_subplot(1, len(labels), index)
        panel = [run for run in runs if str(run.get("label", "")) == label]
        for method in methods:
            points = [run for run in panel if str(run["method"]) == method]
            if not points:
                continue
            axes.scatter([p["macs"] for p in points], [100 * float(p["accuracy"]) for p in points],
                         label=method, s=40, color=colours[method])
            for p in points:
                axes.annotate(method, (p["macs"], 100 * float(p["accuracy"])), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
        if all(float(p["macs"]) > 0 for p in panel):
            axes.set_xscale("log")  # pruned models span an order of magnitude of MACs
        axes.set_xlabel("MACs per sample")
        axes.set_ylabel("accuracy (%)")
        axes.set_title(f"{title}: {label}" if label else title, fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    return _save(figure, path)
