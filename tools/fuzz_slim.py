"""Fuzz campaign: slim random masked CNN graphs and compare them with onnxruntime.

Runs the generator of ``tests/random_graphs.py`` (every kind: grouped/depthwise convs, ConvTranspose,
Pad, Resize, Slice/Gather, Sub/Sum, SE and spatial gates, multi-output Split, shuffles, Transposes,
GroupNorm, QDQ, negative and whole-layer masks) from a seeded numpy generator: example ``i`` of seed
``S`` is always the same graph, so any failure is reproduced with ``--seed S --only i``.

    PYTHONPATH=. python tools/fuzz_slim.py --examples 5000 --seed 0
    PYTHONPATH=. python tools/fuzz_slim.py --seed 0 --only 1234 --save failing/   # one example, kept as .onnx
    PYTHONPATH=. python tools/fuzz_slim.py --examples 500 --prune 0.5             # prune them as well

Prints one line per failure (example, outcome, detail) and the totals: examples, ok, crashes, inexact,
larger (more params or MACs than the input), unsettled (slimming the output again changes it), over
budget (``--prune``: a layer lost far more than the ratio), generator errors, masked channels deleted,
time.
Exit code 1 when anything but "ok" happened.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from random_graphs import KINDS, RandomDraw, build_random_model, check_example, check_prune_example  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="number of random graphs")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed (example i uses the pair (seed, i))")
    parser.add_argument("--only", type=int, default=None, help="run only example number ONLY of the seed")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds of blocks to draw from")
    parser.add_argument("--max-steps", type=int, default=10, help="most blocks per graph")
    parser.add_argument("--save", type=Path, default=None, help="write every failing example here as .onnx")
    parser.add_argument("--prune", type=float, default=None, metavar="RATIO",
                        help="also prune every example at this ratio (scope layer for even examples, global "
                             "for odd ones) and compare with its masked reference")
    args = parser.parse_args(argv)
    unknown = set(args.kinds.split(",")) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if args.prune is not None and not 0.0 <= args.prune < 1.0:
        parser.error(f"--prune is prune's ratio, in [0, 1): got {args.prune}")
    if args.examples < 1 or args.max_steps < 1:
        parser.error(f"--examples and --max-steps must be >= 1, got {args.examples} and {args.max_steps}")
    return args


def run_example(seed: int, number: int, kinds: list[str], max_steps: int, prune_ratio: float | None = None):
    """(outcome, detail, model or None, slim report or None) of one example."""
    try:
        model, _ = build_random_model(RandomDraw((seed, number)), kinds, max_steps)
    except Exception as exc:  # noqa: BLE001  (a generator bug is counted, not fatal)
        return "generator", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", None, None
    outcome, detail, report = check_example(model)
    if outcome == "ok" and prune_ratio is not None:
        scope = "layer" if number % 2 == 0 else "global"
        pruned, pruned_detail, _ = check_prune_example(model, prune_ratio, scope, baseline=report)
        if pruned != "ok":
            return pruned, pruned_detail, model, report
    return outcome, detail, model, report


def main(argv: list[str] | None = None) -> int:
    import onnx
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors only: the campaign prints its own lines
    args = parse_args(argv)
    kinds = args.kinds.split(",")
    numbers = [args.only] if args.only is not None else range(args.examples)
    counts: collections.Counter[str] = collections.Counter()
    masked = deleted = 0
    start = time.perf_counter()
    for number in numbers:
        outcome, detail, model, report = run_example(args.seed, number, kinds, args.max_steps, args.prune)
        counts[outcome] += 1
        if report is not None:
            masked += report.masked_channels
            deleted += report.deleted_masked_channels
        if outcome != "ok":
            print(f"example {number} (seed {args.seed}): {outcome}: {detail}", flush=True)
            if args.save is not None and model is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                onnx.save(model, args.save / f"seed{args.seed}_example{number}.onnx")
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    print(f"examples: {total}  ok: {counts['ok']}  crashes: {counts['crash']}  inexact: {counts['inexact']}  "
          f"larger: {counts['larger']}  unsettled: {counts['unsettled']}  over budget: {counts['budget']}  generator errors: {counts['generator']}  "
          f"masked channels deleted: {deleted}/{masked}  "
          f"time: {elapsed:.1f} s ({1000 * elapsed / max(total, 1):.0f} ms per example)")
    return 0 if counts["ok"] == total else 1


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
