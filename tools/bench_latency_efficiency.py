"""Is a pruned model as fast as its MACs say? Speedup / MACs ratio over third-party-style graphs.

Graphs built here, exported with torch.onnx (legacy exporter, dynamic batch), random weights:
ResNet-50, VGG-16, MobileNetV2, MobileNetV3-Small (depthwise + squeeze-excitation + HardSwish, the
PP-LCNet family's blocks), a YOLO-style detector (C2f blocks with Split/Concat, SPPF, a two-level FPN and a
decoupled box/class head; defined in this file) and the inverted-residual segmentation net of the zoo.
Each is pruned with ``onnxslim.graph.prune.prune`` at every ``--ratios`` value with the command line's
defaults (L1 criterion, per-layer scope, ``round_to="auto"``; ``--round-to`` overrides) and timed with
:func:`onnxslim.validate.bench.benchmark` (dense and its pruned variants together, random order per
round) at every thread count and batch size. Per row: MACs ratio (dense / pruned, per sample), median
per-round speedup with its 95 % CI, and efficiency = speedup / MACs ratio (1.0: as fast as the MACs
say). Two more columns come from onnxruntime's profiler (kernel time, summed over the executed nodes):
*kernels: profiled* is the same ratio for the measured kernel-time speedup, *kernels: at dense rate*
for the kernel-time speedup these channel counts would give if every layer kept the dense model's time
per MAC (:func:`onnxslim.validate.profile.dense_rate_kernels_ms`). Where the latter is well below 1, the
layers whose MACs shrink least (depthwise convs, the stem, element-wise ops) hold more of the time than
of the MACs: that gap comes from the channel counts, not from the kernels. Where profiled is below it,
the kernels lost efficiency on the narrower layers; above it, they gained some (smaller tensors stay in
cache), so it is an estimate, not a bound. The summary line covers 1 thread, batch 1 (the issue's targets: median efficiency >= 0.95,
minimum >= 0.80, no model slower than dense).

    python tools/bench_latency_efficiency.py --size 224 --rounds 30            # the full run
    python tools/bench_latency_efficiency.py --size 96 --rounds 15 --threads 1 --batch 1   # reduced
    python tools/bench_latency_efficiency.py --target-latency 0.5 --models resnet50,mobilenet_v3_small
    python tools/bench_latency_efficiency.py --models "" --onnx face.onnx --onnx yolo.onnx --threads 1 --batch 1

``--onnx FILE`` adds a user's own graphs (e.g. real third-party exports), measured the same way at the
file's own image size (its inputs must be static except the batch).

With ``--target-latency F`` each model is pruned with ``prune --target-latency F`` instead
(:func:`onnxslim.graph.allocate.prune_to_target`, ``--allocation greedy`` (default: per-layer latency
table, cached per machine under ``--latency-cache``) or ``uniform``), then the result is timed against
the dense model in a separate A/B of ``--rounds`` rounds: target, achieved latency fraction
(1 / speedup) and its error, the latency table's points measured and cached, and the seconds taken.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from onnxslim.errors import OnnxSlimError  # noqa: E402

MODELS = ("resnet50", "vgg16", "mobilenet_v2", "mobilenet_v3_small", "yolo_style", "mobilenet_v3_small_seg")


def conv_bn_act(c1: int, c2: int, k: int = 1, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = conv_bn_act(c, c, 3), conv_bn_act(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 to 2c, split in halves, n bottlenecks on the last half, concat all, 1x1."""

    def __init__(self, c1: int, c2: int, n: int = 1):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = conv_bn_act(c1, 2 * self.c)
        self.blocks = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = conv_bn_act((2 + n) * self.c, c2)

    def forward(self, x):
        parts = list(self.cv1(x).split((self.c, self.c), 1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.cv1, self.cv2 = conv_bn_act(c1, c1 // 2), conv_bn_act(c1 // 2 * 4, c2)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class YoloStyle(nn.Module):
    """Backbone of C2f stages, SPPF, a two-level FPN (upsample + concat + C2f), decoupled head per level."""

    def __init__(self, classes: int = 20, w: int = 32):
        super().__init__()
        self.stem = nn.Sequential(conv_bn_act(3, w, 3, 2), conv_bn_act(w, 2 * w, 3, 2), C2f(2 * w, 2 * w))
        self.p3 = nn.Sequential(conv_bn_act(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, 2))
        self.p4 = nn.Sequential(conv_bn_act(4 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 2), SPPF(8 * w, 8 * w))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = C2f(12 * w, 4 * w)
        self.box = nn.ModuleList(nn.Sequential(conv_bn_act(c, 2 * w, 3), conv_bn_act(2 * w, 2 * w, 3),
                                               nn.Conv2d(2 * w, 64, 1)) for c in (4 * w, 8 * w))
        self.cls = nn.ModuleList(nn.Sequential(conv_bn_act(c, 2 * w, 3), conv_bn_act(2 * w, 2 * w, 3),
                                               nn.Conv2d(2 * w, classes, 1)) for c in (4 * w, 8 * w))

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        f3 = self.fuse(torch.cat([self.up(p4), p3], 1))
        outs = [torch.cat([box(f), cls(f)], 1).flatten(2) for f, box, cls in zip((f3, p4), self.box, self.cls)]
        return torch.cat(outs, 2)


def build(name: str, size: int) -> tuple[nn.Module, tuple[int, int, int]]:
    from onnxslim.zoo import get_model

    torch.manual_seed(0)
    if name == "yolo_style":
        return YoloStyle().eval(), (3, size, size)
    channels = 1 if name == "mobilenet_v3_small_seg" else 3
    model = get_model(name, {"input_size": size, "in_channels": channels})
    for module in model.modules():  # trained-looking BN statistics, so l1 scores and outputs are not degenerate
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-0.1, 0.1)
    return model.eval(), (channels, size, size)


def export_onnx(name: str, size: int, folder: Path) -> tuple[Path, dict[str, list[int]]]:
    """The built graph ``name`` exported to ``folder``, with its input shape at batch 1."""
    from onnxslim.training.export import export

    model, shape = build(name, size)
    path = folder / f"{name}.onnx"
    export(model, torch.randn(1, *shape), path, dynamo=False, opset=17, dynamic_batch=True)
    return path, {"input": [1, *shape]}


def fail(message: str) -> None:
    """The project's bad-input convention: one line ``error: ...`` on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def given_onnx(path: Path, folder: Path) -> tuple[Path, dict[str, list[int]]]:
    """A user's ONNX file with its graph inputs' shapes at batch 1; :func:`fail` when a file is missing or
    an input has another dynamic dim (export it with a static image size)."""
    import onnx

    if not path.is_file():
        fail(f"{path}: {'a folder, not an ONNX file' if path.is_dir() else 'no such file'}")
    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    shapes = {}
    for value in graph.input:
        if value.name in weights:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if any(d is None for d in dims[1:]):
            fail(f"{path}: input {value.name!r} has dynamic dims besides the batch: {dims}")
        shapes[value.name] = [1, *dims[1:]]
    if model.ir_version >= 4 and any(value.name in weights for value in graph.input):
        # slim drops weights from the graph inputs (onnxruntime then folds and fuses them): the dense side
        # gets the same (slim's own step), so that the speedup is the pruning's alone
        from onnxslim.graph.cleanup import sync_initializer_inputs

        sync_initializer_inputs(model, [])
        path = folder / path.name
        onnx.save(model, str(path))
        print(f"note: {path.name} lists weights as graph inputs; measured without them, as slim writes it",
              file=sys.stderr)
    return path, shapes


def graph_folder(args, tmp: Path) -> Path:
    """Where the graphs are written: ``--keep DIR`` (created) or ``tmp``. A folder holding a ``--onnx``
    file is refused: a file written there could replace the input."""
    if args.keep is None:
        return tmp
    if args.keep.exists() and not args.keep.is_dir():
        fail(f"--keep {args.keep}: not a folder")
    if any(path.resolve().parent == args.keep.resolve() for path in args.onnx):
        fail(f"--keep {args.keep}: holds an --onnx input; give another folder")
    args.keep.mkdir(parents=True, exist_ok=True)
    return args.keep


def sources(args, folder: Path):
    """(name, path, input shapes) of every graph to measure: the built ones, then ``--onnx`` files."""
    for name in filter(None, args.models.split(",")):
        yield (name, *export_onnx(name, args.size, folder))
    for path in args.onnx:
        yield (path.stem, *given_onnx(path, folder))


def measure(name: str, path: Path, shapes: dict, args, folder: Path) -> list[dict]:
    from onnxslim.graph.prune import prune
    from onnxslim.validate.bench import BenchOptions, benchmark

    variants, macs = [path], {}
    for ratio in args.ratios:
        out = folder / f"{name}_r{ratio}.onnx"
        _, report, _ = prune(path, out, ratio=ratio, round_to=args.round_to, input_shapes=shapes)
        variants.append(out)
        macs[ratio] = report.macs_before / report.macs_after
        rounding = report.rounding["description"] if report.rounding else "round-to 1"
    bench = benchmark(variants, BenchOptions(threads=tuple(args.threads), batch_sizes=tuple(args.batch),
                                             input_shapes=shapes, warmup=args.warmup, repeat=args.rounds,
                                             session_repeats=3, measure_memory=False,
                                             round_warmup=args.round_warmup),
                      names=["dense", *(f"r{r}" for r in args.ratios)], progress=False)
    rows = []
    for config in bench.configs:
        profiled = kernel_speedups(variants, args, config.threads, config.batch_size, shapes)
        for ratio, comparison, (kernels, best) in zip(args.ratios, config.comparisons, profiled):
            rows.append({"model": name, "ratio": ratio, "threads": config.threads, "batch": config.batch_size,
                         "macs_ratio": macs[ratio], "speedup": comparison.speedup,
                         "ci": [comparison.ci_low, comparison.ci_high],
                         "efficiency": comparison.speedup / macs[ratio], "dense_ms": config.models[0].median_ms,
                         "kernel_efficiency": kernels / macs[ratio], "dense_rate_efficiency": best / macs[ratio],
                         "rounding": rounding})
    return rows


def kernel_speedups(variants: list[Path], args, threads: int, batch: int, shapes: dict) -> list[tuple[float, float]]:
    """Per pruned variant, from onnxruntime profiles of ``--rounds`` runs: (the kernel-time speedup over
    ``variants[0]`` (dense), the kernel-time speedup if every layer kept the dense model's time per MAC
    (:func:`onnxslim.validate.profile.dense_rate_kernels_ms`): what the channel counts give at the dense rate)."""
    from onnxslim.validate.profile import dense_rate_kernels_ms, profile_layers
    from onnxslim.validate.runtime import SessionOptions

    profiles = [profile_layers(str(p), SessionOptions(threads=threads), runs=args.rounds, batch_size=batch,
                               input_shapes=shapes) for p in variants]
    dense = profiles[0]
    return [(dense.kernels_ms / after.kernels_ms,
             dense.kernels_ms / dense_rate_kernels_ms(dense, after, variants[0], path, shapes))
            for path, after in zip(variants[1:], profiles[1:])]


def measure_target(name: str, path: Path, shapes: dict, args) -> dict:
    from onnxslim.graph.allocate import prune_to_target
    from onnxslim.validate.speedcheck import verify_speed

    start = time.perf_counter()
    slimmed, report, _, result = prune_to_target(path, "latency", args.target_latency, rounds=args.rounds,
                                                 allocation=args.allocation, cache_dir=args.latency_cache,
                                                 progress=True, round_to=args.round_to, input_shapes=shapes)
    seconds = time.perf_counter() - start
    check = verify_speed(path, slimmed, report.macs_before, report.macs_after, rounds=args.rounds, input_shapes=shapes)
    achieved = 1.0 / check.speedup
    return {"model": name, "target": args.target_latency, "allocation": result.allocation,
            "search_achieved": result.achieved, "ratio": result.ratio, "prunes": len(result.steps),
            "verified_latency_fraction": achieved, "ci": [1.0 / check.ci_high, 1.0 / check.ci_low],
            "error": achieved / args.target_latency - 1.0, "macs_fraction": report.macs_after / report.macs_before,
            "points_measured": result.details.get("points_measured", 0),
            "points_cached": result.details.get("points_cached", 0), "seconds": seconds}


def print_table(rows: list[dict]) -> None:
    print("| model | ratio | threads | batch | dense ms | MACs ratio | speedup (95 % CI) | speedup / MACs ratio "
          "| kernels: profiled | kernels: at dense rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['ratio']} | {r['threads']} | {r['batch']} | {r['dense_ms']:.2f} | "
              f"{r['macs_ratio']:.2f} | {r['speedup']:.2f}x ({r['ci'][0]:.2f}-{r['ci'][1]:.2f}) | {r['efficiency']:.2f} "
              f"| {r['kernel_efficiency']:.2f} | {r['dense_rate_efficiency']:.2f} |")


def summary(rows: list[dict]) -> str:
    base = [r for r in rows if r["threads"] == 1 and r["batch"] == 1]
    if not base:
        return "no 1-thread batch-1 rows"
    eff = [r["efficiency"] for r in base]
    at_dense_rate = [r["dense_rate_efficiency"] for r in base]
    slower = [f"{r['model']}@{r['ratio']}" for r in base if r["speedup"] < 1.0]
    return (f"1 thread, batch 1, {len(base)} rows: median speedup / MACs ratio {statistics.median(eff):.2f} "
            f"(target >= 0.95), minimum {min(eff):.2f} (target >= 0.80), slower than dense: "
            f"{', '.join(slower) or 'none'}; kernel time if every layer kept the dense time per MAC: "
            f"median {statistics.median(at_dense_rate):.2f}, minimum {min(at_dense_rate):.2f}")


def check_options(args):
    """``args`` with the lists parsed and every value checked before anything is built or measured
    (:class:`OnnxSlimError`: one ``error:`` line, exit 2): ratios finite in [0, 1), thread counts >= 0,
    batch sizes, rounds and size >= 1, warm-ups >= 0, ``--round-to`` auto or >= 1, ``--target-latency`` in
    (0, 1], something to measure, a ``--json`` that is no ``--onnx`` input (it would be replaced), and no two
    graphs of one name (a.onnx and b/a.onnx: their rows and ``--keep`` files would be confused)."""
    from onnxslim.errors import parse_numbers
    from onnxslim.graph.rounding import parse_round_to
    from onnxslim.io import check_distinct_paths, pairs

    args.ratios = parse_numbers("--ratios", args.ratios, float)
    args.threads = parse_numbers("--threads", args.threads, int)
    args.batch = parse_numbers("--batch", args.batch, int)
    if not all(0.0 <= r < 1.0 for r in args.ratios):  # NaN fails this too
        raise OnnxSlimError(f"--ratios must be in [0, 1), got {args.ratios}")
    if min(args.threads) < 0 or min(args.batch) < 1:
        raise OnnxSlimError(f"--threads must be >= 0 and --batch >= 1, got {args.threads} and {args.batch}")
    if args.rounds < 1 or args.size < 1 or args.warmup < 0 or args.round_warmup < 0:
        raise OnnxSlimError(f"--rounds and --size must be >= 1, --warmup and --round-warmup >= 0, got "
                            f"{args.rounds}, {args.size}, {args.warmup}, {args.round_warmup}")
    args.round_to = parse_round_to(args.round_to)
    if args.target_latency is not None and not 0.0 < args.target_latency <= 1.0:
        raise OnnxSlimError(f"--target-latency must be in (0, 1], got {args.target_latency}")
    if not args.models.strip(",") and not args.onnx:
        raise OnnxSlimError("nothing to measure: give --models or --onnx")
    check_distinct_paths(pairs("--onnx", args.onnx), pairs("--json", [args.json]))
    names = [name for name in args.models.split(",") if name] + [path.stem for path in args.onnx]
    if len(set(names)) < len(names):  # rows and the graphs written to --keep are named by it
        raise OnnxSlimError(f"two graphs share the name {next(n for n in names if names.count(n) > 1)!r}: rename "
                            f"one --onnx file (rows and --keep files are named by the file's stem)")
    return args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="built graphs (empty: none)")
    parser.add_argument("--onnx", type=Path, action="append", default=[], metavar="FILE",
                        help="also measure this ONNX file (repeatable): e.g. real third-party exports")
    parser.add_argument("--ratios", default="0.4,0.7")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--round-warmup", type=int, default=1,
                        help="untimed runs of a model right before its timed run in every round (0: cold, after "
                             "the other models)")
    parser.add_argument("--round-to", default="auto")
    parser.add_argument("--target-latency", type=float, default=None)
    parser.add_argument("--allocation", choices=("greedy", "uniform"), default="greedy",
                        help="with --target-latency: per-layer greedy on the latency table, or one ratio (bisection)")
    parser.add_argument("--latency-cache", type=Path, default=None,
                        help="folder of the per-machine latency tables (default: onnxslim's cache folder)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="write the graphs to DIR (e.g. for `onnxslim bench --per-layer`): the built dense ones and every "
                             "pruned one (an --onnx file is its own dense graph)")
    args = check_options(parser.parse_args())
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    if max(args.threads) > cores:
        print(f"note: {max(args.threads)} threads on a {cores}-core machine: those rows oversubscribe the CPU")
    if args.target_latency is not None:
        return run_targets(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxslim-eff-") as tmp:
        folder = graph_folder(args, Path(tmp))
        for name, path, shapes in sources(args, folder):
            try:
                rows += measure(name, path, shapes, args, folder)
            except OnnxSlimError as exc:  # a user's file the engine refuses: say which one, measure the rest
                print(f"skipped {name}: {exc}", file=sys.stderr, flush=True)
                continue
            print(f"measured {name}", file=sys.stderr, flush=True)
    print_table(rows)
    print()
    print(summary(rows))
    sizes = f"built graphs at {args.size}x{args.size}" if args.models else ""
    sizes += ("; " if sizes and args.onnx else "") + ("given files at their own input sizes" if args.onnx else "")
    print(f"input: {sizes}, {args.rounds} rounds, {args.round_warmup} untimed run(s) of a model before its timed "
          f"one in every round, rounding: {rows[0]['rounding'] if rows else '-'}")
    if args.json:
        from onnxslim.io import write_json_atomic

        write_json_atomic(args.json, {"rows": rows, "size": args.size, "rounds": args.rounds, "cores": cores,
                                      "round_to": args.round_to, "round_warmup": args.round_warmup,
                                      "summary": summary(rows)})
    return 0


def run_targets(args) -> int:
    with tempfile.TemporaryDirectory(prefix="onnxslim-eff-") as tmp:
        rows = [measure_target(name, path, shapes, args) for name, path, shapes in sources(args, Path(tmp))]
    print("| model | allocation | target | search: ratio / cut | prunes | verified latency fraction (95 % CI) | error "
          "| MACs fraction | table points measured / cached | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['allocation']} | {r['target']:.2f} | {r['ratio']:.3f} | {r['prunes']} | "
              f"{r['verified_latency_fraction']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) | {r['error']:+.1%} | "
              f"{r['macs_fraction']:.3f} | {r['points_measured']} / {r['points_cached']} | {r['seconds']:.0f} |")
    print(f"input {args.size}x{args.size}, 1 thread, batch 1, {args.rounds} rounds per A/B")
    if args.json:
        from onnxslim.io import write_json_atomic

        write_json_atomic(args.json, {"targets": rows, "size": args.size, "rounds": args.rounds})
    return 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
