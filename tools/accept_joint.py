"""Acceptance figures of the joint sparsity method (issue 4): dense vs joint-sparsified, same epoch budget.

For one setting (``--setting unet-mnistseg`` or ``lenet5-mnist``), whose model, data, method, phases and
targets are those of its recipe (``models/unet_mnistseg_joint.toml``, ``models/lenet5_mnist_joint.toml``):

1. *dense baseline*: the model trained for ``dense + sparse + finetune`` epochs (one dense phase);
2. *joint*: the same model with channel masks attached, trained ``dense`` epochs (masks frozen at 1),
   ``sparse`` epochs with the joint method, ``finetune`` epochs with the masks frozen — the same total;
3. both exported to ONNX (``onnxslim.training.export.export``), the masked one slimmed
   (``onnxslim.graph.slim.slim``, input shapes fixed to one sample so Flatten/Reshape resolve); test metrics of the dense ONNX and of the slimmed ONNX computed with
   onnxruntime (``onnxslim.validate.accuracy.evaluate``: top-1 or mIoU); the largest absolute difference
   between the PyTorch masked model and the slimmed ONNX over the whole test set.

Printed: one JSON line per run and a summary with parameters removed (slimmed params vs the dense
model's), the metric drop in points and whether the targets are met (UNet: mIoU within 1 pt, >= 50 %
params removed; LeNet-5: top-1 within 1 pt, >= 80 % params removed, max diff <= 1e-4).

    python tools/accept_joint.py --setting lenet5-mnist     # about 1 min on one core
    python tools/accept_joint.py --setting unet-mnistseg    # about 33 min on one core

Measured (2026-11-23, 1 thread): LeNet-5 top-1 98.05 % dense -> 97.70 % slimmed (-0.35 pt), 85.7 % params
removed, max diff 1.5e-5; UNet (base 32 channels, `--threads 1`, 1,971 s with another job on the second
core) mIoU 95.81 % dense -> 95.65 % slimmed (-0.15 pt), 79.4 % params removed, max diff 1.7e-5.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from onnxslim.graph.slim import slim
from onnxslim.graph.stats import model_stats
from onnxslim.pipeline import load_data
from onnxslim.recipes import load_recipe
from onnxslim.training.export import export
from onnxslim.training.masks import attach_masks
from onnxslim.training.methods import get_method
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.validate.accuracy import evaluate
from onnxslim.zoo import get_model

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SETTINGS = {"lenet5-mnist": "lenet5_mnist_joint.toml", "unet-mnistseg": "unet_mnistseg_joint.toml"}


def max_abs_diff(model: torch.nn.Module, onnx_path: Path, images: np.ndarray) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    model.eval()
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(images), 200):
            batch = np.ascontiguousarray(images[start:start + 200])
            expected = model(torch.from_numpy(batch)).numpy()
            got = session.run(None, {"input": batch})[0]
            worst = max(worst, float(np.max(np.abs(expected - got))))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--epochs", type=int, nargs=3, metavar=("DENSE", "SPARSE", "FINETUNE"))
    parser.add_argument("--lr", type=float)
    parser.add_argument("--train-samples", type=int, default=0)
    parser.add_argument("--test-samples", type=int, default=0)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, help="training and data split seed (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method-params", default="{}", help="JSON object overriding the joint Params")
    parser.add_argument("--skip-dense", action="store_true", help="only the joint run (no baseline)")
    parser.add_argument("--out", type=Path, help="folder to keep the ONNX files and a summary JSON in")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = load_recipe(MODELS_DIR / SETTINGS[args.setting])
    training = recipe.training
    dense_epochs, sparse_epochs, finetune_epochs = args.epochs or (
        training.dense.epochs, training.sparse.epochs, training.finetune.epochs)
    lr = args.lr or training.dense.lr
    batch_size = args.batch_size or training.batch_size
    seed = training.seed if args.seed is None else args.seed

    def phase(config: PhaseConfig, epochs: int) -> PhaseConfig:
        return dataclasses.replace(config, epochs=epochs, lr=args.lr or config.lr)

    budget = dense_epochs + sparse_epochs + finetune_epochs
    data = dataclasses.replace(recipe.data, train_samples=args.train_samples or recipe.data.train_samples,
                               test_samples=args.test_samples or recipe.data.test_samples,
                               split_seed=recipe.data.split_seed if args.seed is None else args.seed)
    train, test = load_data(dataclasses.replace(recipe, data=data))
    model_name, model_params = recipe.model.name, recipe.model.params
    method_params = {**recipe.method.params, **json.loads(args.method_params)}
    options = TrainOptions(batch_size=batch_size, seed=seed, progress=args.progress,
                           evaluate_every_epoch=False)
    example = torch.from_numpy(np.ascontiguousarray(test.images[:2]))
    folder = args.out or Path(tempfile.mkdtemp(prefix="accept-joint-"))
    folder.mkdir(parents=True, exist_ok=True)
    summary: dict = {"setting": args.setting, "epochs": [dense_epochs, sparse_epochs, finetune_epochs], "lr": lr,
                     "optimizer": training.dense.optimizer, "batch_size": batch_size,
                     "train": len(train), "test": len(test), "method_params": method_params}

    torch.manual_seed(seed)
    dense_model = get_model(model_name, model_params)
    dense_params = sum(p.numel() for p in dense_model.parameters())
    if not args.skip_dense:
        started = time.perf_counter()
        Trainer(dense_model, train, test_data=test, options=options).fit([phase(training.dense, budget)])
        export(dense_model, example, folder / "dense.onnx")
        dense_metric = evaluate(folder / "dense.onnx", test, progress=False).value
        summary["dense"] = {"metric": dense_metric, "params": dense_params, "seconds": time.perf_counter() - started}
        print(json.dumps({"run": "dense", **summary["dense"]}), flush=True)

    started = time.perf_counter()
    torch.manual_seed(seed)
    model = get_model(model_name, model_params)
    attach_masks(model, example)
    method = get_method("joint", method_params)
    trainer = Trainer(model, train, test_data=test, method=method, options=options)
    trainer.fit([phase(training.dense, dense_epochs), phase(training.sparse, sparse_epochs),
                 phase(training.finetune, finetune_epochs)])
    masked = export(model, example, folder / "masked.onnx")
    input_shapes = {"input": [1, *test.images.shape[1:]]}
    _, report = slim(folder / "masked.onnx", output_path=folder / "slim.onnx", input_shapes=input_shapes)
    if args.skip_dense:  # still count the dense model's ONNX parameters (BN folded, like the slimmed one)
        export(dense_model, example, folder / "dense.onnx")
    dense_onnx_params = model_stats(onnx.load(str(folder / "dense.onnx")), input_shapes).params
    slim_metric = evaluate(folder / "slim.onnx", test, progress=False).value
    masked_metric = evaluate(folder / "masked.onnx", test, progress=False).value
    diff = max_abs_diff(model, folder / "slim.onnx", test.images)
    finalize = trainer.finalize_report
    summary["joint"] = {
        "metric_masked": masked_metric, "metric_slim": slim_metric, "params_dense": dense_params,
        "params_dense_onnx": dense_onnx_params, "params_masked_onnx": report.params_before,
        "params_slim": report.params_after, "params_removed": 1.0 - report.params_after / dense_onnx_params,
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "zero_channels": finalize.zero_total if finalize else None, "channels": finalize.channels if finalize else None,
        "deleted_masked_channels": report.deleted_masked_channels, "masked_channels": report.masked_channels,
        "max_abs_diff_torch_vs_slim": diff, "export_diff": masked.max_abs_diff,
        "windows": method.history[-3:], "seconds": time.perf_counter() - started,
        "per_mask": finalize.per_mask if finalize else None,
    }
    print(json.dumps({"run": "joint", **summary["joint"]}), flush=True)
    targets = recipe.targets
    checks = {
        "params_removed": summary["joint"]["params_removed"] >= targets.min_params_removed,
        "max_abs_diff": diff <= targets.max_abs_diff,
        "exact_zeros": bool(finalize and finalize.zero_total > 0),
    }
    if "dense" in summary:
        drop = 100.0 * (summary["dense"]["metric"] - slim_metric)
        summary["drop_pt"] = drop
        checks["metric_drop"] = drop <= targets.max_accuracy_drop_pt
    summary["checks"] = checks
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{args.setting}: dense {summary.get('dense', {}).get('metric', float('nan')):.4f}  "
          f"slim {slim_metric:.4f}  drop {summary.get('drop_pt', float('nan')):.2f} pt  "
          f"params {dense_onnx_params:,} -> {report.params_after:,} ({100 * summary['joint']['params_removed']:.1f}% removed)  "
          f"max diff {diff:.2e}  checks {checks}  (files in {folder})")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
