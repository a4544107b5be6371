"""Issue 4 acceptance figures for GAL (onnxslim.training.methods.gal), printed (and optionally saved).

For each model: train dense (``--dense`` epochs), then (a) a baseline trained densely for the same total
budget (``--sparse + --finetune`` more epochs) and (b) GAL from the dense model (sparse phase, then
fine-tune with labels); export both, slim the GAL model and compare:

* exact zeros: channel masks / structure scales that are exactly 0 after training;
* exact slim: max |PyTorch GAL model - slimmed ONNX| over the whole test set;
* params removed (slimmed ONNX vs the dense export) and accuracy (slimmed ONNX vs the baseline);
* for ResNet-20: residual blocks whose scale is 0 and the Conv / Add node counts before and after slim.

Usage (1 thread; LeNet-5 takes a few minutes, ResNet-20 longer)::

    PYTHONPATH=$PWD python tools/gal_acceptance.py lenet5 --json /tmp/gal_lenet.json
    PYTHONPATH=$PWD python tools/gal_acceptance.py resnet20 --width 0.5
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from onnxslim.data import mnist_split
from onnxslim.graph.slim import slim
from onnxslim.graph.stats import model_stats
from onnxslim.training.export import export
from onnxslim.training.masks import attach_masks, iter_masks
from onnxslim.training.methods import get_method
from onnxslim.training.structure import iter_structure_masks
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.zoo import get_model

DEFAULTS = {
    # epochs per phase, learning rates (dense and finetune: cosine; sparse: constant), GAL params
    "lenet5": dict(dense=5, sparse=4, finetune=11, lr=0.01, sparse_lr=0.01, finetune_lr=0.05, size=28,
                   params={"lam_channel": 0.03, "mask_step": 1}),
    "resnet20": dict(dense=4, sparse=3, finetune=3, lr=0.05, sparse_lr=0.01, finetune_lr=0.05, size=32,
                     params={"lam_channel": 0.1, "lam_structure": 0.8, "mask_step": 4}),
}


def run(name: str, width: float, epochs: tuple[int, int, int], params: dict, seed: int, batch_size: int,
        progress: bool) -> dict:
    dense_epochs, sparse_epochs, finetune_epochs = epochs
    defaults = DEFAULTS[name]
    size, lr, sparse_lr, finetune_lr = defaults["size"], defaults["lr"], defaults["sparse_lr"], defaults["finetune_lr"]
    sparse_phase = PhaseConfig(kind="sparse", epochs=sparse_epochs, lr=sparse_lr, schedule="constant")
    finetune_phase = PhaseConfig(kind="finetune", epochs=finetune_epochs, lr=finetune_lr, schedule="cosine")
    train, test = mnist_split(size)
    options = TrainOptions(batch_size=batch_size, seed=seed, progress=progress)
    torch.manual_seed(seed)
    model_params = {"in_channels": 1, "input_size": size, "width": width}
    dense = get_model(name, model_params)
    started = time.perf_counter()
    Trainer(dense, train, test_data=test, options=options).fit(
        [PhaseConfig(kind="dense", epochs=dense_epochs, lr=lr, schedule="cosine")])
    baseline = copy.deepcopy(dense)
    # the same phases (learning rates, schedules, epochs) as GAL's, trained densely with labels
    baseline_result = Trainer(baseline, train, test_data=test, options=options).fit(
        [dataclasses.replace(sparse_phase, kind="dense"), dataclasses.replace(finetune_phase, kind="dense")])
    example = torch.from_numpy(np.ascontiguousarray(train.images[:2]))
    masked = copy.deepcopy(dense)
    attach_masks(masked, example)
    method = get_method("gal", params)
    gal_result = Trainer(masked, train, test_data=test, method=method, options=options, reference_model=dense).fit(
        [sparse_phase, finetune_phase])
    train_seconds = time.perf_counter() - started

    zero_channels = sum(int((m.weight == 0).sum()) for _, m in iter_masks(masked))
    channels = sum(m.channels for _, m in iter_masks(masked))
    structures = {n: m.value for n, m in iter_structure_masks(masked)}
    with tempfile.TemporaryDirectory() as folder:
        dense_path, masked_path = Path(folder) / "dense.onnx", Path(folder) / "gal.onnx"
        masked.eval()
        baseline.eval()
        export(baseline, example, dense_path)
        export(masked, example, masked_path)
        shapes = {"input": [1, 1, size, size]}
        slimmed, report = slim(masked_path, input_shapes=shapes)
        dense_proto = onnx.load(str(dense_path))
        dense_stats = model_stats(dense_proto, shapes)
        session = ort.InferenceSession(slimmed.SerializeToString(), providers=["CPUExecutionProvider"])
        max_diff, max_out, correct = 0.0, 0.0, 0
        with torch.no_grad():
            for images, labels in test.batches(500):
                reference = masked(torch.from_numpy(np.ascontiguousarray(images))).numpy()
                (out,) = session.run(None, {"input": np.ascontiguousarray(images)})
                max_diff = max(max_diff, float(np.abs(out - reference).max()))
                max_out = max(max_out, float(np.abs(reference).max()))
                correct += int((out.argmax(1) == labels).sum())
        slim_accuracy = correct / len(test)
        ops_before = collections.Counter(n.op_type for n in dense_proto.graph.node)
        ops_after = collections.Counter(n.op_type for n in slimmed.graph.node)
    return {
        "model": name, "width": width, "epochs": {"dense": dense_epochs, "sparse": sparse_epochs,
                                                   "finetune": finetune_epochs}, "gal_params": params,
        "baseline_accuracy": baseline_result.test_metric, "gal_accuracy_pytorch": gal_result.test_metric,
        "slim_accuracy_onnx": slim_accuracy,
        "accuracy_drop_pt": 100 * (baseline_result.test_metric - slim_accuracy),
        "zero_channels": zero_channels, "channels": channels,
        "structures_zero": sorted(n for n, v in structures.items() if v == 0.0), "structures": len(structures),
        "params_dense": dense_stats.params, "params_slim": report.params_after,
        "params_removed": 1 - report.params_after / dense_stats.params,
        "macs_dense": dense_stats.macs, "macs_slim": report.macs_after,
        "max_abs_diff": max_diff, "max_abs_output": max_out,
        "conv_nodes": [ops_before["Conv"], ops_after["Conv"]], "add_nodes": [ops_before["Add"], ops_after["Add"]],
        "train_seconds": train_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(DEFAULTS))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--dense", type=int)
    parser.add_argument("--sparse", type=int)
    parser.add_argument("--finetune", type=int)
    parser.add_argument("--params", type=json.loads, help="GAL params as JSON (default: tuned per model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    defaults = DEFAULTS[args.model]
    epochs = (args.dense if args.dense is not None else defaults["dense"],
              args.sparse if args.sparse is not None else defaults["sparse"],
              args.finetune if args.finetune is not None else defaults["finetune"])
    result = run(args.model, args.width, epochs, args.params or defaults["params"], args.seed, args.batch_size,
                 not args.no_progress)
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        from onnxslim.io import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
