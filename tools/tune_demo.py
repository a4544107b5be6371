"""Tune a recipe's knobs (epochs, sparsity knobs) on a validation split, never on the test images.

Holds out ``--val`` (2,000) of the recipe's training split (a permutation seeded by ``--split-seed``),
trains on the rest (cut to the recipe's ``train_samples``) exactly as ``onnxslim run`` does (the
:mod:`onnxslim.pipeline` stages: dense, the dense baseline with the same epoch budget, mask training,
export, slim, validate) and prints per setting: params and MACs removed, the validation metric
(``metric``: top-1 accuracy, or mIoU for segmentation) of the baseline and of the slimmed ONNX model,
the drop in percentage points, and the training seconds. Settings with the same epochs share the dense and
baseline checkpoints (``--out/e<D>-<S>-<F>-lr<X>-b<B>-split<seed>/``: one per split, never shared across splits); the test split is not loaded.

    python tools/tune_demo.py --epochs 4,10,6 --set lam=0.015 --set mask_lr_scale=20 --threads 1
    python tools/tune_demo.py --epochs 4,10,6 --set lam=0.02 --set lam=0.01   # one trial per value

``--set KEY=VALUE`` overrides a ``[method] params`` key (repeat a key for several trials; several
keys give their product). ``--lr-scale X`` multiplies the three phases' learning rates, ``--batch-size``
replaces the recipe's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from onnxslim import pipeline
from onnxslim.data import load_dataset
from onnxslim.errors import OnnxSlimError
from onnxslim.recipes import Recipe, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]


def holdout(recipe: Recipe, val: int, seed: int):
    """(fit, val) datasets carved from the recipe's whole training split (the test split is not loaded).

    ``val`` images are held out by a permutation seeded by ``seed``; the rest, cut to the recipe's
    ``train_samples`` when set (the first of them in index order), is the fit set. So a recipe that uses
    only part of its training split (mnistseg: 2,000 of 4,000 canvases) keeps its training-set size when
    the held-out images fit beside it. Raises OnnxSlimError when ``val`` leaves no training image.
    """
    spec = recipe.data
    if spec.dataset.startswith("synthetic:"):
        raise OnnxSlimError("a recipe needs labelled data, not a synthetic spec")
    train = load_dataset(spec.dataset, "train", seed=spec.split_seed)
    if not 0 < val < len(train):
        raise OnnxSlimError(f"--val {val} must be between 1 and {len(train) - 1} ({len(train)} training images)")
    order = np.random.default_rng(seed).permutation(len(train))
    pick = lambda idx: dataclasses.replace(train, images=train.images[idx], labels=train.labels[idx])  # noqa: E731
    return pick(np.sort(order[val:])).subset(spec.train_samples or None), pick(np.sort(order[:val]))


def variant(recipe: Recipe, epochs: tuple[int, int, int], params: dict, lr_scale: float,
            batch_size: int | None = None) -> Recipe:
    """``recipe`` with the phase epochs, method params, batch size and learning-rate scale (all three
    phases) of one trial, and a fast latency measurement."""
    raw = recipe.to_dict()
    if batch_size is not None:
        raw["training"]["batch_size"] = batch_size
    for kind, count in zip(("dense", "sparse", "finetune"), epochs):
        raw["training"][kind]["epochs"] = count
        raw["training"][kind].pop("kind")
    for kind in ("dense", "sparse", "finetune"):
        raw["training"][kind]["lr"] *= lr_scale
    raw["method"]["params"].update(params)
    raw["validate"].update(warmup=2, repeat=5)
    return recipe_from_dict(raw, source=recipe.source, default_name=recipe.name)


def trial(recipe: Recipe, fit, val, folder: Path, shared: Path) -> dict:
    """Train (reusing the shared dense/baseline checkpoints), export, slim, validate on ``val``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dense.pt", "baseline.pt"):
        if (shared / name).exists() and not (folder / name).exists():
            shutil.copy(shared / name, folder / name)
    run = pipeline.Run(recipe, folder, fit, val, resume=True, progress=False)
    started = time.perf_counter()
    trained = pipeline.train(run)
    seconds = time.perf_counter() - started
    for name in ("dense.pt", "baseline.pt"):
        if not (shared / name).exists():
            shutil.copy(folder / name, shared / name)
    exported = pipeline.export(run, trained)
    slimmed = pipeline.slim(run, exported)
    report = pipeline.report(run, trained, exported, slimmed, pipeline.validate(run, trained, exported, slimmed))
    return {"params_removed": report.params_removed, "macs_removed": report.macs_removed,
            "metric": report.accuracy_metric, "val_baseline": report.accuracy_before, "val_slim": report.accuracy_after,
            "drop_pt": report.accuracy_drop_pt, "live": {k: v[0] for k, v in report.live_channels.items()},
            "train_seconds": round(seconds, 1), "stage_seconds": {k: round(v, 1) for k, v in run.seconds.items()}}


def parse_sets(items: list[str]) -> list[dict]:
    """``["lam=0.01", "lam=0.02", "mask_lr_scale=20"]`` -> the product of each key's values.

    A value is read as JSON (``0.01``, ``true``, ``[1, 2]``), else kept as the string (``criterion=mean_abs``);
    whether it fits the method's parameter is checked by :func:`variant`. Raises OnnxSlimError for an item
    without ``KEY=VALUE``.
    """
    values: dict[str, list] = {}
    for item in items:
        key, _, raw = item.partition("=")
        if not key or not raw:
            raise OnnxSlimError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        values.setdefault(key, []).append(value)
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())] or [{}]


def parse_epochs(text: str) -> tuple[int, int, int]:
    """``"4,10,6"`` -> (dense, sparse, fine-tune) epochs; raises OnnxSlimError unless three integers >= 0."""
    try:
        epochs = tuple(int(e) for e in text.split(","))
    except ValueError:
        epochs = ()
    if len(epochs) != 3 or min(epochs) < 0:
        raise OnnxSlimError(f"--epochs expects three integers >= 0 (dense,sparse,finetune), got {text!r}")
    return epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "models" / "lenet5_mnist.toml")
    parser.add_argument("--epochs", required=True, help="dense,sparse,finetune epochs, e.g. 4,10,6")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--lr-scale", type=float, default=1.0)
    parser.add_argument("--val", type=int, default=2000)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument("--out", type=Path, default=Path("runs/tune_demo"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:  # every trial's recipe is checked before anything trains
        base = load_recipe(args.recipe)
        epochs = parse_epochs(args.epochs)
        trials = [(params, variant(base, epochs, params, args.lr_scale, args.batch_size))
                  for params in parse_sets(args.set)]
        fit, val = holdout(base, args.val, args.split_seed)
    except (OnnxSlimError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    batch = args.batch_size or base.training.batch_size
    shared = args.out / f"e{epochs[0]}-{epochs[1]}-{epochs[2]}-lr{args.lr_scale:g}-b{batch}-split{args.split_seed}"
    shared.mkdir(parents=True, exist_ok=True)
    print(f"{len(fit)} train / {len(val)} validation images (split seed {args.split_seed}), epochs {epochs}, "
          f"batch {batch}, lr x{args.lr_scale:g}, {args.threads} thread(s)", flush=True)
    for params, recipe in trials:
        name = "-".join(f"{k}{v}" for k, v in params.items()) or "recipe"
        result = trial(recipe, fit, val, shared / name, shared)
        print(json.dumps({"params": params, **result}), flush=True)


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
