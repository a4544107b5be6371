"""Which kept-count multiple makes whole pruned models fastest on this machine? (``--round-to auto``'s rule)

The graphs of ``tools/bench_latency_efficiency.py`` (ResNet-50, VGG-16, MobileNetV2, MobileNetV3-Small, a
YOLO-style detector, the inverted-residual segmentation net), pruned at each ``--ratios`` value with
``prune`` (L1, per-layer) rounding the kept counts to each ``--multiples`` value; all variants of one model
are timed together against the dense model (random order per round, 1 thread, batch 1). Per row: MACs
ratio (dense / pruned), median speedup, efficiency = speedup / MACs ratio; then per multiple the median and
minimum efficiency and the median speedup over all rows.

    python tools/bench_round_to_models.py --size 224 --rounds 12

``--masked DIR ...`` asks the same of ``slim`` (masks given, so rounding can only *keep* extra zero
channels): each DIR holds ``dense.onnx`` and ``masked.onnx`` (the Fashion-MNIST reproduction's
``runs/fmnist/onnx/<row>/``); ``masked.onnx`` is slimmed with each multiple (1 = no rounding) and timed
with ``dense.onnx``:

    python tools/bench_round_to_models.py --masked runs/fmnist/onnx/resnet20_* --multiples 1,4,8 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_latency_efficiency import MODELS, export_onnx  # noqa: E402


def measure(name: str, args, folder: Path) -> list[dict]:
    from onnxslim.graph.prune import prune
    from onnxslim.validate.bench import BenchOptions, benchmark

    path, shape = export_onnx(name, args.size, folder)
    shapes = {"input": [1, *shape]}
    variants, rows = [path], []
    for ratio in args.ratios:
        for multiple in args.multiples:
            out = folder / f"{name}_{ratio}_{multiple}.onnx"
            _, report, _ = prune(path, out, ratio=ratio, round_to=multiple, input_shapes=shapes)
            variants.append(out)
            rows.append({"model": name, "ratio": ratio, "multiple": multiple,
                         "macs_ratio": report.macs_before / report.macs_after})
    options = BenchOptions(threads=(1,), batch_sizes=(1,), input_shapes=shapes, warmup=3, repeat=args.rounds,
                           session_repeats=3, measure_memory=False)
    for row, comparison in zip(rows, benchmark(variants, options, progress=False).configs[0].comparisons):
        row["speedup"] = comparison.speedup
        row["efficiency"] = comparison.speedup / row["macs_ratio"]
    return rows


def measure_masked(folder: Path, args, tmp: Path) -> list[dict]:
    """Slim ``folder/masked.onnx`` rounding to each multiple; time the results with ``folder/dense.onnx``."""
    from onnxslim.graph.slim import slim
    from onnxslim.validate.bench import BenchOptions, benchmark

    variants, rows = [folder / "dense.onnx"], []
    for multiple in args.multiples:
        out = tmp / f"{folder.name}_{multiple}.onnx"
        _, report = slim(folder / "masked.onnx", out, round_to=multiple)
        variants.append(out)
        rows.append({"model": folder.name, "ratio": "masks", "multiple": multiple,
                     "macs_ratio": report.macs_before / report.macs_after})
    options = BenchOptions(threads=(1,), batch_sizes=(1,), warmup=3, repeat=args.rounds, session_repeats=3,
                           measure_memory=False)
    for row, comparison in zip(rows, benchmark(variants, options, progress=False).configs[0].comparisons):
        row["speedup"] = comparison.speedup
        row["efficiency"] = comparison.speedup / row["macs_ratio"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratios", default="0.4,0.7")
    parser.add_argument("--multiples", default="4,8,16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--masked", nargs="+", type=Path, default=None,
                        help="folders with dense.onnx and masked.onnx: time slim's rounding instead of prune's")
    args = parser.parse_args()
    from onnxslim.errors import parse_numbers

    args.ratios = parse_numbers("--ratios", args.ratios, float)
    args.multiples = parse_numbers("--multiples", args.multiples, int)
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxslim-roundto-") as tmp:
        for name in args.masked or args.models.split(","):
            rows += measure_masked(name, args, Path(tmp)) if args.masked else measure(name, args, Path(tmp))
            print(f"measured {name}", file=sys.stderr, flush=True)
    print("| model | ratio | multiple | MACs ratio | speedup | speedup / MACs ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['ratio']} | {r['multiple']} | {r['macs_ratio']:.2f} | {r['speedup']:.2f}x | "
              f"{r['efficiency']:.2f} |")
    print()
    for multiple in args.multiples:
        subset = [r for r in rows if r["multiple"] == multiple]
        eff = [r["efficiency"] for r in subset]
        print(f"multiple {multiple}: median efficiency {statistics.median(eff):.2f}, minimum {min(eff):.2f}, "
              f"median speedup {statistics.median(r['speedup'] for r in subset):.2f}x, geometric mean "
              f"{statistics.geometric_mean(r['speedup'] for r in subset):.2f}x over {len(subset)} rows")
    size = "the models' own input sizes" if args.masked else f"input {args.size}x{args.size}"
    print(f"{size}, {args.rounds} rounds, 1 thread, batch 1")
    return 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
