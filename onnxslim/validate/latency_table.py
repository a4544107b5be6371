"""Per-layer latency lookup table: measured onnxruntime time of one layer against its kept channels.

NetAdapt (Yang et al., ECCV 2018, sec. 3.3) and HALP (Shen et al., NeurIPS 2022, sec. 3.2) choose
channels against a table of each layer's measured latency as a function of its input and output
channel counts; this module builds that table for onnxruntime's CPU provider.

* A layer is a Conv, ConvTranspose, Gemm or MatMul (weight constant) with static shapes. Its
  :class:`LayerSignature` holds what its latency depends on: op type, attributes (kernel, strides,
  pads, dilations, transposes), input shape (the request's batch), full channel counts, bias, and the
  group structure: a grouped conv keeps its ``g`` groups; a depthwise conv (``group == Cin``) keeps
  ``group == kept channels`` and its outputs are tied to its inputs (one axis, not two). Layers with
  equal signatures (ResNet's repeated blocks) share one table.
* A grid point ``(kept inputs, kept outputs)`` is timed on a single-node model built with
  ``onnx.helper`` (random weights, the layer's attributes) in one onnxruntime session with the request's
  intra-op thread count and full graph optimisations (so NCHWc applies as in the network): warm-up
  runs, then the median of 5 to 30 runs (as many as fit in about 20 ms), in milliseconds.
* Grid per axis: the full count and about ``{3/4, 1/2, 1/4}`` of it plus one step, all multiples of
  ``step`` (the rounding multiple, times ``g`` for a grouped conv). Between grid points the table is
  interpolated bilinearly (:func:`numpy.interp` per axis; clamped outside the grid).
* Cache: one JSON file per machine and request, ``<dir>/<key>.json`` with ``key`` = CPU model and a
  hash of its flags, onnxruntime version, threads and batch (:func:`machine_key`); ``dir`` is the
  ``cache_dir`` argument, else ``$ONNXSLIM_CACHE_DIR/latency``, else ``~/.cache/onnxslim/latency``.
  Written atomically after measuring (merged with what another process wrote meanwhile); points
  already in it are never measured again; a damaged file is measured again.

What a single-node table misses (fused activations, the layout reorders between layers, the
executor's overhead) is left to the caller's whole-model check (:mod:`onnxslim.graph.allocate`).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxslim.errors import OnnxSlimError
from onnxslim.graph.model import Graph, get_attr
from onnxslim.validate.bench import cpu_model

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
GRID_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
CACHE_VARIABLE = "ONNXSLIM_CACHE_DIR"
_FORMAT = 1
Measure = Callable[[onnx.ModelProto, int], float]  # (single-node model, threads) -> milliseconds


@dataclasses.dataclass(frozen=True)
class LayerSignature:
    """What one layer's latency depends on (see the module docstring); hashable, used as a table key."""

    op_type: str
    attrs: tuple[tuple[str, object], ...]  # sorted (name, value), without ``group``
    x_shape: tuple[int, ...]  # input shape with the request's batch and the full input channels
    x_axis: int  # axis of the input channels in ``x_shape``
    kernel: tuple[int, ...]  # weight dims past the two channel axes (conv kernel), () for Gemm/MatMul
    cin: int
    cout: int
    groups: int  # conv groups kept fixed (1 for Gemm/MatMul); ignored when ``tied``
    tied: bool  # depthwise: group == kept inputs, outputs = kept inputs * cout / cin
    bias: bool

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def step(self, multiple: int) -> int:
        """Grid step of the input axis (outputs too unless ``tied``): the multiple, times the groups."""
        return max(multiple, 1) * (1 if self.tied else self.groups)

    def points(self, multiple: int) -> list[tuple[int, int]]:
        """The grid points ``(kept inputs, kept outputs)`` to measure."""
        ins = grid_levels(self.cin, self.step(multiple))
        if self.tied:
            return [(c, c * self.cout // self.cin) for c in ins]
        outs = grid_levels(self.cout, self.step(multiple))
        return [(a, b) for a in ins for b in outs]


def grid_levels(size: int, step: int) -> list[int]:
    """``size`` and about 3/4, 1/2, 1/4 of it and ``step``, as multiples of ``step`` (ascending)."""
    step = math.gcd(size, step)  # a count off the multiple (a grouped layer's odd width) uses what divides it
    levels = {size} | {max(step, int(round(size * f / step)) * step) for f in GRID_FRACTIONS} | {step}
    return sorted(level for level in levels if 0 < level <= size)


def _attr_value(attr: onnx.AttributeProto) -> object:
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    return tuple(v.decode() if isinstance(v, bytes) else v for v in value) if isinstance(value, list) else value


def layer_signature(node: onnx.NodeProto, index: Graph, batch: int) -> LayerSignature | None:
    """The signature of ``node`` at batch ``batch``; None when it is not a layer op, its weight is not a
    constant, or its input shape is not static past the batch axis."""
    if node.op_type not in LAYER_OPS or len(node.input) < 2:
        return None
    x, w = index.shape(node.input[0]), index.constant(node.input[1])
    if x is None or w is None or len(x) < 2 or any(not isinstance(d, int) or d < 1 for d in x[1:]):
        return None
    attrs = tuple(sorted((a.name, _attr_value(a)) for a in node.attribute if a.name != "group"))
    x_shape = (batch, *x[1:])
    groups = int(get_attr(node, "group", 1))
    bias = len(node.input) > 2 and bool(node.input[2])
    if node.op_type == "Conv":
        cin, cout, kernel = w.shape[1] * groups, w.shape[0], tuple(w.shape[2:])
    elif node.op_type == "ConvTranspose":
        cin, cout, kernel = w.shape[0], w.shape[1] * groups, tuple(w.shape[2:])
    elif node.op_type == "Gemm":
        if get_attr(node, "transA", 0) or len(x) != 2:
            return None
        cin, cout = (w.shape[1], w.shape[0]) if get_attr(node, "transB", 0) else w.shape
        kernel = ()
    else:  # MatMul with a constant 2-D weight (K, N)
        if w.ndim != 2:
            return None
        (cin, cout), kernel = w.shape, ()
    x_axis = len(x_shape) - 1 if node.op_type in ("Gemm", "MatMul") else 1
    if x_shape[x_axis] != cin:
        return None
    tied = node.op_type in ("Conv", "ConvTranspose") and groups > 1 and groups == cin
    return LayerSignature(node.op_type, attrs, x_shape, x_axis, kernel, int(cin), int(cout),
                          1 if tied else groups, tied, bias)


def probe_model(sig: LayerSignature, cin: int, cout: int) -> onnx.ModelProto:
    """A single-node model of ``sig`` with ``cin`` inputs and ``cout`` outputs kept (random weights)."""
    groups = cin if sig.tied else sig.groups
    x_shape = list(sig.x_shape)
    x_axis = sig.x_axis
    x_shape[x_axis] = cin
    transposed = dict(sig.attrs).get("transB", 0)
    weight_shape = {"Conv": [cout, cin // groups, *sig.kernel], "ConvTranspose": [cin, cout // groups, *sig.kernel],
                    "Gemm": [cout, cin] if transposed else [cin, cout], "MatMul": [cin, cout]}[sig.op_type]
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(weight_shape).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if sig.bias:
        weights.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        inputs.append("b")
    attrs = {name: list(value) if isinstance(value, tuple) else value for name, value in sig.attrs}
    if sig.op_type in ("Conv", "ConvTranspose"):
        attrs["group"] = groups
    node = helper.make_node(sig.op_type, inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "latency_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def measure_model(model: onnx.ModelProto, threads: int, budget_s: float = 0.02) -> float:
    """Median onnxruntime run time of ``model`` (one float input) in milliseconds: 2 warm-up runs, then
    5 to 30 timed runs (as many as fit in ``budget_s``). Raises OnnxSlimError when it cannot run."""
    from onnxslim.validate.runtime import SessionOptions, create_session

    session = create_session(model, SessionOptions(threads=threads))
    spec = session.get_inputs()[0]
    feed = {spec.name: np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)}
    for _ in range(2):
        session.run(None, feed)
    start = time.perf_counter()
    session.run(None, feed)
    first = time.perf_counter() - start
    times = [first]
    for _ in range(int(np.clip(budget_s / max(first, 1e-6), 5, 30)) - 1):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def machine_key(threads: int, batch: int) -> str:
    """The cache file's name (no suffix): CPU model, a hash of CPU flags and machine, onnxruntime's
    version, threads and batch, e.g. ``amd-epyc-7b13-3f2a91c0-ort1.32.0-t1-b1``."""
    import onnxruntime as ort

    from onnxslim.graph.rounding import cpu_flags

    name = "".join(c if c.isalnum() else "-" for c in cpu_model().lower()).strip("-")
    name = "-".join(part for part in name.split("-") if part)[:48] or "cpu"
    flags = hashlib.sha256((platform.machine() + " " + " ".join(sorted(cpu_flags()))).encode()).hexdigest()[:8]
    return f"{name}-{flags}-ort{ort.__version__}-t{threads}-b{batch}"


def default_cache_dir() -> Path:
    """``$ONNXSLIM_CACHE_DIR/latency`` when set, else ``~/.cache/onnxslim/latency``."""
    root = os.environ.get(CACHE_VARIABLE)
    return Path(root) / "latency" if root else Path.home() / ".cache" / "onnxslim" / "latency"


class LatencyTable:
    """Measured per-layer latencies of one machine, thread count and batch, cached in one JSON file;
    grids of ``multiple`` (the rounding multiple of the kept counts).

    ``measure`` (default :func:`measure_model`) times a single-node model; ``measured`` and ``cached``
    count the grid points timed now and found in the cache by :meth:`ensure`.
    """

    def __init__(self, threads: int = 1, batch: int = 1, multiple: int = 1,
                 cache_dir: str | os.PathLike | None = None, measure: Measure | None = None):
        if threads < 1 or batch < 1 or multiple < 1:
            raise OnnxSlimError(f"the latency table needs threads, batch and multiple >= 1, got {threads}, {batch}, "
                                f"{multiple}")
        self.threads, self.batch, self.multiple = threads, batch, multiple
        self.path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.path = self.path / f"{machine_key(threads, batch)}.json"
        self.measure = measure or measure_model
        self.measured = 0
        self.cached = 0
        self.points: dict[str, dict[str, float]] = self._load()
        self._grids: dict[str, _Grid] = {}  # parsed points per signature key

    def _load(self) -> dict[str, dict[str, float]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a damaged cache is measured again (and rewritten)
        return data.get("points", {}) if isinstance(data, dict) and data.get("format") == _FORMAT else {}

    def ensure(self, signatures: Iterable[LayerSignature], progress: bool = True) -> None:
        """Measure every grid point of ``signatures`` missing from the cache, then save it."""
        from tqdm import tqdm

        todo = []
        for sig in dict.fromkeys(signatures):
            known = self.points.get(sig.key(), {})
            for cin, cout in sig.points(self.multiple):
                if f"{cin},{cout}" in known:
                    self.cached += 1
                else:
                    todo.append((sig, cin, cout))
        for sig, cin, cout in tqdm(todo, desc="latency table", unit="point", disable=not progress or not todo,
                                   leave=False):
            self.points.setdefault(sig.key(), {})[f"{cin},{cout}"] = self.measure(probe_model(sig, cin, cout),
                                                                                   self.threads)
            self.measured += 1
        if todo:
            self._grids.clear()
            self._save()

    def _save(self) -> None:
        from onnxslim.io import write_json_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for key, points in self._load().items():  # what another process added meanwhile is kept
            self.points[key] = {**points, **self.points.get(key, {})}
        write_json_atomic(self.path, {"format": _FORMAT, "machine": self.path.stem, "cpu": cpu_model(),
                                      "threads": self.threads, "batch": self.batch, "points": self.points})

    def estimate(self, sig: LayerSignature, cin: float, cout: float) -> float:
        """Milliseconds of ``sig`` keeping ``cin`` inputs and ``cout`` outputs (see :meth:`curve`)."""
        return self.curve(sig)(cin, cout)

    def curve(self, sig: LayerSignature) -> Callable[[float, float], float]:
        """``f(kept inputs, kept outputs) -> ms`` for ``sig``, interpolated bilinearly on its grid points
        (a depthwise signature reads only the inputs). :meth:`ensure` first; raises OnnxSlimError for a
        signature not measured."""
        key = sig.key()
        grid = self._grids.get(key)
        if grid is None:
            known = self.points.get(key, {})
            wanted = [f"{cin},{cout}" for cin, cout in sig.points(self.multiple)]
            if any(point not in known for point in wanted):
                raise OnnxSlimError(f"latency of {sig.op_type} {list(sig.x_shape)} not measured: call ensure() first")
            grid = self._grids[key] = _Grid.of({point: known[point] for point in wanted}, sig.tied)
        return grid.at


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Measured points of one signature: inputs ``ins`` x outputs ``outs``; a tied (depthwise) grid has
    one output level per input level and is read along its diagonal."""

    ins: tuple[int, ...]
    outs: tuple[int, ...]
    values: tuple[tuple[float, ...], ...]  # values[i][j]: ms at (ins[i], outs[j]); NaN where not measured
    tied: bool

    @staticmethod
    def of(points: dict[str, float], tied: bool) -> _Grid:
        pairs = {tuple(int(v) for v in k.split(",")): ms for k, ms in points.items()}
        ins = sorted({a for a, _ in pairs})
        outs = sorted({b for _, b in pairs})
        values = tuple(tuple(pairs.get((a, b), math.nan) for b in outs) for a in ins)
        return _Grid(tuple(ins), tuple(outs), values, tied)

    def at(self, cin: float, cout: float) -> float:
        """Bilinear interpolation, clamped to the grid's edges."""
        i, s = _bracket(self.ins, cin)
        if self.tied:
            return (1 - s) * self.values[i][i] + s * self.values[i + 1][i + 1] if s else self.values[i][i]
        j, t = _bracket(self.outs, cout)
        row = self.values[i]
        low = row[j] if not t else (1 - t) * row[j] + t * row[j + 1]
        if not s:
            return low
        row = self.values[i + 1]
        return (1 - s) * low + s * (row[j] if not t else (1 - t) * row[j] + t * row[j + 1])


def _bracket(levels: tuple[int, ...], value: float) -> tuple[int, float]:
    """``(i, s)`` with ``value = (1 - s) * levels[i] + s * levels[i + 1]``, ``s`` in [0, 1); clamped."""
    if value <= levels[0]:
        return 0, 0.0
    if value >= levels[-1]:
        return len(levels) - 1, 0.0
    i = bisect.bisect_right(levels, value) - 1
    return i, (value - levels[i]) / (levels[i + 1] - levels[i])
