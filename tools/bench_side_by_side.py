"""Is training the dense baseline beside the mask training (two processes) faster than one after the other?

Runs :func:`onnxslim.pipeline.train_models` on the demo recipe with no dense phase and a short baseline
and mask training (``--epochs`` sparse,finetune) with ``--threads`` PyTorch threads, once one after the
other (one process, all threads) and once side by side (two processes, half the threads each), for
``--rounds`` interleaved rounds; prints the seconds of each (the side-by-side figures overlap).

    python tools/bench_side_by_side.py --threads 2 --epochs 2,1 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_demo import variant  # noqa: E402

from onnxslim import pipeline  # noqa: E402
from onnxslim.errors import parse_numbers  # noqa: E402
from onnxslim.recipes import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "models" / "lenet5_mnist.toml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", default="2,1", help="sparse,finetune epochs")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparse, finetune = parse_numbers("--epochs", args.epochs, int, count=2)
    recipe = variant(load_recipe(args.recipe), (0, sparse, finetune), {}, 1.0)
    train, test = pipeline.load_data(recipe)
    for index in range(args.rounds):
        for side_by_side in (True, False):
            with tempfile.TemporaryDirectory() as out:
                started = time.perf_counter()
                trained = pipeline.train_models(recipe, out, train, test, progress=False, side_by_side=side_by_side)
                wall = time.perf_counter() - started
            how = "side by side  " if side_by_side else "one after other"
            print(f"round {index} {how}: baseline {trained.seconds['baseline']:.1f} s, masked "
                  f"{trained.seconds['masked']:.1f} s, wall {wall:.1f} s ({args.threads} threads)", flush=True)


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
