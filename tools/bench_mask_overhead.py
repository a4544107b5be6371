"""Mask-training overhead: time of a sparse-phase training step (masks + method) vs a plain dense step.

Both models are the same zoo model with the same weights; B has masks attached and runs the sparsity
method's step (regulariser / proximal update). Steps alternate A, B, B, A, ... on the same batches so
that machine-load drifts hit both; printed are the medians of the per-step times, their ratio, the
median of the per-batch B/A ratios, and the per-epoch estimate for the training split.

    PYTHONPATH=. python tools/bench_mask_overhead.py --model lenet5 --threads 2
    PYTHONPATH=. python tools/bench_mask_overhead.py --model resnet20 --param in_channels=1 --data mnist:32
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import numpy as np
import torch

from onnxslim.data import load_dataset
from onnxslim.training.masks import attach_masks
from onnxslim.training.methods import StepContext, get_method
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.zoo import get_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="model parameter (JSON value)")
    parser.add_argument("--data", default="mnist", help="dataset spec (train split is used)")
    parser.add_argument("--method", default="l1_mask")
    parser.add_argument("--method-params", default='{"lam": 0.015, "proximal": true, "mask_lr_scale": 20.0}')
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    params = {}
    for item in args.param:
        key, _, raw = item.partition("=")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    data = load_dataset(args.data, "train")
    torch.manual_seed(args.seed)
    dense = get_model(args.model, params)
    masked = copy.deepcopy(dense)
    example = torch.from_numpy(np.ascontiguousarray(data.images[:2]))
    attach_masks(masked, example)
    method = get_method(args.method, json.loads(args.method_params))
    options = TrainOptions(batch_size=args.batch_size, seed=args.seed, progress=False)
    dense_phase, sparse_phase = PhaseConfig("dense", 1, lr=0.01), PhaseConfig("sparse", 1, lr=0.01)
    runs = {
        "dense": (Trainer(dense, data, options=options), dense_phase),
        "masked": (Trainer(masked, data, method=method, options=options), sparse_phase),
    }
    optimizers = {name: trainer.optimizer_for(phase) for name, (trainer, phase) in runs.items()}
    for trainer, _ in runs.values():
        trainer.model.train()
    rng = np.random.default_rng(args.seed)
    times: dict[str, list[float]] = {"dense": [], "masked": []}
    for index in range(args.warmup + args.steps):
        chosen = rng.choice(len(data), args.batch_size, replace=False)
        inputs, targets = torch.from_numpy(data.images[chosen]), torch.from_numpy(data.labels[chosen])
        order = ("dense", "masked") if index % 2 == 0 else ("masked", "dense")
        for name in order:
            trainer, phase = runs[name]
            ctx = StepContext(trainer.model, trainer.task, optimizers[name], phase, 0, index, index, phase.lr,
                              trainer.device)
            started = time.perf_counter()
            trainer.step(ctx, inputs, targets)
            elapsed = time.perf_counter() - started
            if index >= args.warmup:
                times[name].append(elapsed)
    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    dense_ms, masked_ms = (statistics.median(times[k]) * 1e3 for k in ("dense", "masked"))
    print(f"model {args.model} {params or ''} on {data.name}, batch {args.batch_size}, {args.threads} threads, "
          f"method {args.method}, {args.steps} interleaved steps each")
    print(f"dense step  median {dense_ms:8.3f} ms  (epoch of {steps_per_epoch} steps ~ {dense_ms * steps_per_epoch / 1e3:.2f} s)")
    print(f"masked step median {masked_ms:8.3f} ms  (epoch ~ {masked_ms * steps_per_epoch / 1e3:.2f} s)")
    # each measured index timed both models back to back: the median of these paired ratios is robust
    # to load that drifts over the run
    paired = statistics.median(m / d for m, d in zip(times["masked"], times["dense"]))
    print(f"overhead: {100 * (masked_ms / dense_ms - 1):+.1f} % (ratio of medians {masked_ms / dense_ms:.3f}; "
          f"median paired ratio {paired:.3f}; target <= +10 %)")


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
