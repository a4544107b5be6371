"""Does rounding each layer's channel count up to a multiple of N make onnxruntime faster on this CPU?

Builds the ResNet-50 of ``bench_resnet50_speedup.py`` with per-channel masks keeping a random 30-70 %
of each mask point's channels (so the surviving counts are "odd" numbers such as 37 or 83), then
slims it with ``slim(masked, round_to=N)`` for N in {1, 4, 8, 16}: with N > 1 the engine keeps a few
extra (zero) channels so every count is a multiple of N. All variants are timed together with
``onnxslim.validate.bench.benchmark`` (interleaved rounds, one thread by default); printed per N:
median latency, MACs, and the median per-round ratio ``t_round_to=1 / t_round_to=N`` with its 95 % CI
(> 1: rounding helps).

When the installed engine has no ``round_to`` parameter (or with ``--hand``), the variants are built
directly by this script instead: the kept channel sets are padded with masked channels up to the next
multiple of N, which gives the same channel counts the engine would produce.

    python tools/bench_round_to.py --rounds 30
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet50_speedup import ResNetBuilder, resnet50_weights  # noqa: E402


def random_kept_fractions(full: dict[str, int], low: float, high: float, seed: int) -> dict[str, np.ndarray]:
    """Per mask point, a random sorted subset whose size is a random fraction in [low, high] of the channels."""
    rng = np.random.default_rng(seed + 7)
    kept = {}
    for key, count in full.items():
        size = int(np.clip(round(rng.uniform(low, high) * count), 1, count))
        kept[key] = np.sort(rng.choice(count, size=size, replace=False))
    return kept


def round_up_kept(kept: dict[str, np.ndarray], full: dict[str, int], multiple: int) -> dict[str, np.ndarray]:
    """Pad every kept set with the lowest-index masked channels up to a multiple of ``multiple`` (capped)."""
    rounded = {}
    for key, indices in kept.items():
        target = min(full[key], -(-len(indices) // multiple) * multiple)
        extra = np.setdiff1d(np.arange(full[key]), indices)[: target - len(indices)]
        rounded[key] = np.sort(np.concatenate([indices, extra]))
    return rounded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-to", default="1,4,8,16", help="multiples to compare; the first is the baseline")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--keep-range", default="0.3,0.7", help="random kept fraction per mask point")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hand", action="store_true", help="build the rounded variants here, not with the engine")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from onnxslim.errors import parse_numbers
    from onnxslim.io import write_json_atomic
    from onnxslim.validate.bench import BenchOptions, benchmark, median_ci

    multiples = parse_numbers("--round-to", args.round_to, int)
    low, high = parse_numbers("--keep-range", args.keep_range, float, count=2)
    weights, full = resnet50_weights(args.seed)
    kept = random_kept_fractions(full, low, high, args.seed)
    masked = ResNetBuilder("masked", weights, kept, full, args.size).build()

    slim = None
    if not args.hand:
        try:
            from onnxslim.graph.slim import slim
        except ImportError:
            print("engine not available (onnxslim.graph.slim missing): building the rounded variants by hand")
        else:
            if "round_to" not in inspect.signature(slim).parameters:
                print("the engine's slim() has no round_to parameter yet: building the rounded variants by hand")
                slim = None
    variants, macs, counts = [], [], []
    for multiple in multiples:
        if slim is not None:
            model, report = slim(masked, round_to=multiple)
            macs.append(report.macs_after)
            counts.append(sorted({layer.channels_after for layer in report.layers})[:6])
        else:
            rounded = round_up_kept(kept, full, multiple)
            builder = ResNetBuilder("hand", weights, rounded, full, args.size)
            model = builder.build()
            macs.append(builder.macs)
            counts.append(sorted({len(v) for v in rounded.values()})[:6])
        variants.append(model)
    source = "engine slim(round_to=N)" if slim is not None else "hand-built (same channel counts)"
    names = [f"round_to={m}" for m in multiples]
    report = benchmark(variants, BenchOptions(threads=(args.threads,), warmup=args.warmup, repeat=args.rounds,
                                              session_repeats=1, measure_memory=False), names=names)
    print(report.format_table())
    print()
    print(f"variants: {source}; ResNet-50 {args.size}x{args.size}, kept fraction per mask in [{low}, {high}], "
          f"{args.threads} thread(s), {args.rounds} rounds, {report.environment['processor']}")
    base = report.models[0]
    rows = []
    for multiple, timing, mac, count in zip(multiples, report.models, macs, counts):
        ratios = np.asarray(base.samples_ms) / np.asarray(timing.samples_ms)
        ci_low, ci_high, coverage = median_ci(ratios.tolist(), 0.95)
        speedup = float(np.median(ratios))
        verdict = ("baseline" if timing is base else "helps" if ci_low > 1 else "hurts" if ci_high < 1
                   else "no significant difference")
        print(f"round_to={multiple:<3} median {timing.median_ms:8.3f} ms  MACs {mac / 1e9:.3f} G  "
              f"speedup vs round_to={multiples[0]}: {speedup:.3f}x [{ci_low:.3f}, {ci_high:.3f}]"
              f"{'' if coverage >= 0.95 else f' (CI coverage only {coverage:.1%})'}  {verdict}  "
              f"(smallest channel counts {count})")
        rows.append({"round_to": multiple, "median_ms": timing.median_ms, "macs": mac, "speedup": speedup,
                     "ci": [ci_low, ci_high], "verdict": verdict})
    if args.json:
        write_json_atomic(args.json, {"source": source, "size": args.size, "threads": args.threads,
                                      "rounds": args.rounds, "results": rows, "environment": report.environment})
    return 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
