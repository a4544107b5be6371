"""Fashion-MNIST reproduction: every sparsity method at matched cost, three seeds, beside Torch-Pruning.

Protocol (docs/faithfulness.md, "How the reproduction avoids the test split"):

* data: ``--train`` images for training and ``--val`` for validation, both drawn from the 60,000 training
  images with a fixed seed (disjoint); the 10,000 test images are used once per row, for its figure;
* **matched cost**: each method's strength (its one knob in :data:`KNOBS`) is chosen by bisection so that
  the mask training removes the target share of MACs (``--costs``, default 50 % and 70 %). A probe is the
  dense model of seed 0 trained through the sparse phase; only its MACs after slimming decide. The
  validation accuracy of each probe is recorded, the test split is not touched. The knob chosen for seed
  0 is used for every seed;
* every row: dense phase (shared per model and seed), sparse phase, zero masks, fine-tune; the **dense
  baseline** of a seed is trained for the same total epochs on the same split; the masked ONNX model is
  slimmed at ``round_to="auto"`` (the CLI's default) and evaluated with onnxruntime on the test split;
  speedup is dense over slimmed ONNX latency (1 thread, batch 1, interleaved rounds); max |PyTorch
  masked - slimmed ONNX| over the test images;
* **Torch-Pruning** (``pip install torch-pruning``, an optional dependency of this tool only): the
  dense model of the same seed pruned to the same MACs with its magnitude (L1) and group-norm importance
  (``MetaPruner``), then fine-tuned for the same sparse + fine-tune epochs.

Each row is written to ``OUT/rows/<key>.json`` with a fingerprint of its settings as soon as it is done;
a rerun skips rows whose fingerprint matches (so the table can be built over several runs) and redoes
those whose settings changed. ``REPRODUCE_FMNIST.md`` / ``.json`` and ``accuracy_vs_macs.png`` are written
from every finished row.

    python tools/reproduce_fmnist.py --data ../shared/data/fashion-mnist --out runs/fmnist --threads 1
    python tools/reproduce_fmnist.py --data DIR --models lenet5 --methods l1_mask,ssr_l21 --seeds 0
    python tools/reproduce_fmnist.py --data DIR --quick      # smoke run: tiny data, one epoch per phase
    python tools/reproduce_fmnist.py --data DIR --torch-pruning --table-only --publish docs/reproduce/fmnist

``--table-only`` trains nothing: it builds the table and plot from the finished rows and lists the rows
still to compute with the command that finishes them (what a partial table publishes). ``--remeasure``
trains nothing either: it slims every finished row's ``masked.onnx`` again at ``round_to="auto"`` and
measures its accuracy, speedup and max diff again (for rows measured before, or on a busy machine).
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxslim.data import ArrayDataset, fashion_mnist_files, load_dataset  # noqa: E402
from onnxslim.errors import OnnxSlimError  # noqa: E402
from onnxslim.io import write_json_atomic, write_text_atomic  # noqa: E402
from onnxslim.training.masks import attach_masks, masked_summary  # noqa: E402
from onnxslim.training.methods import get_method  # noqa: E402
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions  # noqa: E402
from onnxslim.zoo import get_model  # noqa: E402

METHODS = ("l1_mask", "bn_slimming", "l1_norm", "ssr_l21", "ssr_l20", "gal", "joint")

# per model: zoo params, input size, epochs (dense, sparse, fine-tune), SGD lr, batch, training images,
# bisection probes and seeds (the issue allows one seed for VGG-16 and ResNet-56), sized for this
# project's 2-core machine:
# one core, one training step of 64 images timed per model and scaled to a 10,000-image epoch: LeNet-5 7 s,
# VGG-16 (width 0.25) 37 s, ResNet-20 69 s, ResNet-56 179 s; hence LeNet-5 ~1.8 h (1.54 h recorded),
# ResNet-20 ~3.7 h (3 seeds), VGG-16 ~0.8 h (1 seed); ResNet-56 (1 seed) gets what is left of the 8 hours:
# 2,500 images, 10 + 2 + 2 epochs, 2 probes (7 methods x 2 costs x (2 probes x 2 + 4) epochs + Torch-Pruning
# 4 x 4 + dense 10 + baseline 4 = 142 epochs of 2,500 images x 45 s: ~1.8 h). The dense phase is trained
# once per seed and shared by every row, so it is the cheap place to spend: with 3 dense epochs (117 SGD
# steps) the dense baseline reached only 58.02 % test accuracy.
# a model's own bisection range for a method's knob. SSR-L2,0's hard threshold acts on filter norms, which BN
# keeps alike within a layer: LeNet-5 (no BN) responds between lam 0.17 and 0.25, the BN nets near 0.6-0.7
# (ResNet-20 on MNIST: 0.6 -> 12 %, 0.7 -> 91 % of params zero, models/resnet20_mnist_ssr_l20.toml); with
# LeNet-5's range (0.05, 0.5) every probe on ResNet-20 and VGG-16 removed nothing.
_BN_NET_RANGES = {"ssr_l20": (0.3, 1.5)}
MODELS = {
    "lenet5": {"params": {"num_classes": 10, "in_channels": 1, "input_size": 28}, "size": 28,
               "epochs": (3, 3, 3), "lr": 0.02, "batch": 64, "train": 10000, "probes": 4, "seeds": (0, 1, 2)},
    "resnet20": {"params": {"num_classes": 10, "in_channels": 1, "input_size": 28}, "size": 28,
                 "epochs": (4, 2, 3), "lr": 0.05, "batch": 64, "train": 5000, "probes": 3, "seeds": (0, 1, 2),
                 "ranges": _BN_NET_RANGES},
    "resnet56": {"params": {"num_classes": 10, "in_channels": 1, "input_size": 28}, "size": 28,
                 "epochs": (10, 2, 2), "lr": 0.05, "batch": 64, "train": 2500, "probes": 2, "seeds": (0,),
                 "ranges": _BN_NET_RANGES},
    "vgg16": {"params": {"num_classes": 10, "in_channels": 1, "input_size": 32, "width": 0.25}, "size": 32,
              "epochs": (4, 2, 3), "lr": 0.02, "batch": 64, "train": 5000, "probes": 3, "seeds": (0,),
              "ranges": _BN_NET_RANGES},
}

# per method: fixed params, the knob bisected to reach a MACs target, its range, and its scale
KNOBS = {
    "l1_mask": ({"proximal": True, "mask_lr_scale": 20.0, "criterion": "mean_abs"}, "lam", (1e-3, 0.3), "log"),
    "bn_slimming": ({"target": "bn", "lam": 1e-4}, "percent", (0.05, 0.95), "linear"),
    "l1_norm": ({"scope": "layer"}, "ratio", (0.05, 0.95), "linear"),  # the paper prunes per layer
    "ssr_l21": ({"layer_lams": [], "update_every": 25, "include_norm": True}, "lam", (1e-3, 1.0), "log"),
    # SSR-L2,0's response is a cliff (LeNet-5: lam 0.173 removed 23 % of the MACs, 0.247 removed 92 %): a
    # narrower range puts the third and fourth probes inside it
    "ssr_l20": ({"layer_lams": [], "update_every": 25, "include_norm": True}, "lam", (0.05, 0.5), "log"),
    "gal": ({"lam_structure": 0.0, "mask_step": 1}, "lam_channel", (1e-3, 1.0), "log"),
    # the joint method's strength is its significance threshold; its default pacing (10 % of a mask's live
    # channels per 50-step window, masks decaying 2 % per step) cannot prune more than ~37 % of LeNet-5's
    # MACs in a 3-epoch sparse phase whatever the threshold, so the pacing is faster here (measured on
    # seed 0: significance 0.5 / 1 / 2 removed 47 / 74 / 89 % of the MACs)
    "joint": ({"decay": 0.05, "max_new_fraction": 0.25, "max_pruned_fraction": 0.95}, "significance", (0.25, 4.0),
              "log"),
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything that shapes a row's result (its fingerprint)."""

    data: str
    train: int
    val: int
    model: str
    epochs: tuple[int, int, int]
    quick: bool

    def fingerprint(self, **extra) -> str:
        payload = json.dumps({**dataclasses.asdict(self), **extra}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def split_data(folder: str, train: int, val: int, size: int, seed: int = 0):
    """(train, val, test): disjoint train/val subsets of the training images (fixed seed), full test."""
    full = load_dataset(f"fashion-mnist:{folder}", "train")
    test = load_dataset(f"fashion-mnist:{folder}", "test")
    order = np.random.default_rng(seed).permutation(len(full.images))
    if train + val > len(order):
        print(f"error: --train + --val ({train + val}) exceeds the {len(order)} training images", file=sys.stderr)
        raise SystemExit(2)
    parts = [_subset(full, order[:train], size, "train"), _subset(full, order[train:train + val], size, "val")]
    return (*parts, _subset(test, np.arange(len(test.images)), size, "test"))


def _subset(data: ArrayDataset, index: np.ndarray, size: int, name: str) -> ArrayDataset:
    images = torch.from_numpy(np.ascontiguousarray(data.images[index]))
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return dataclasses.replace(data, images=np.ascontiguousarray(images.numpy()),
                               labels=np.ascontiguousarray(data.labels[index]), name=f"fashion-mnist {name}")


def knobs(ctx, method: str) -> tuple[dict, str, tuple[float, float], str]:
    """``KNOBS[method]`` with the model's own bisection range for it (``MODELS[model]["ranges"]``)."""
    fixed, knob, bounds, scale = KNOBS[method]
    return fixed, knob, tuple(ctx.spec.get("ranges", {}).get(method, bounds)), scale


def phases(spec: dict, setting: Setting) -> tuple[PhaseConfig, PhaseConfig, PhaseConfig]:
    dense, sparse, finetune = setting.epochs
    lr = spec["lr"]
    return (PhaseConfig("dense", dense, lr=lr), PhaseConfig("sparse", sparse, lr=lr, schedule="constant"),
            PhaseConfig("finetune", finetune, lr=lr))


def dense_model(ctx, seed: int) -> torch.nn.Module:
    """The dense phase of ``seed`` (trained once, cached as a state dict of plain tensors)."""
    path = ctx.out / "dense" / f"{ctx.setting.model}_seed{seed}_{ctx.setting.fingerprint(seed=seed)}.pt"
    torch.manual_seed(seed)
    model = get_model(ctx.setting.model, ctx.spec["params"])
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    options = TrainOptions(batch_size=ctx.spec["batch"], seed=seed, progress=ctx.progress)
    Trainer(model, ctx.train, options=options).fit([ctx.phases[0]])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def mask_train(ctx, method: str, knob_value: float, seed: int, finetune: bool) -> torch.nn.Module:
    fixed, knob, _, _ = KNOBS[method]
    model = copy.deepcopy(dense_model(ctx, seed))
    example = torch.from_numpy(ctx.train.images[:2])
    attach_masks(model, example)
    options = TrainOptions(batch_size=ctx.spec["batch"], seed=seed, progress=ctx.progress, evaluate_every_epoch=False)
    trainer = Trainer(model, ctx.train, test_data=ctx.val, method=get_method(method, {**fixed, knob: knob_value}),
                      options=options, reference_model=dense_model(ctx, seed))
    steps = [ctx.phases[1], ctx.phases[2] if finetune else dataclasses.replace(ctx.phases[2], epochs=0)]
    trainer.fit(steps)
    return model


def inapplicable(ctx, method: str) -> str | None:
    """Why ``method`` (with its fixed params) cannot train this model (the method's own check), or None."""
    fixed, knob, (low, high), _ = knobs(ctx, method)
    model = get_model(ctx.setting.model, ctx.spec["params"])
    attach_masks(model, torch.from_numpy(ctx.train.images[:2]))
    return get_method(method, {**fixed, knob: low}).applicable(model)


def macs_removed(model: torch.nn.Module, example: torch.Tensor) -> float:
    summary = masked_summary(model, example)
    return 1.0 - summary.macs_live / summary.macs


def calibrate(ctx, method: str, target: float, probes: int) -> dict:
    """Bisect the method's knob (seed 0) until the MACs removed are closest to ``target``."""
    _, knob, (low, high), scale = knobs(ctx, method)
    started = time.perf_counter()
    example = torch.from_numpy(ctx.train.images[:2])
    tried = []
    for _ in range(probes):
        value = math.sqrt(low * high) if scale == "log" else (low + high) / 2
        try:
            removed = macs_removed(mask_train(ctx, method, value, seed=0, finetune=False), example)
        except OnnxSlimError as exc:  # a knob so strong that training diverged: too strong, go lower
            if "diverged" not in str(exc):
                raise
            removed = None
        tried.append({knob: value, "macs_removed": removed})
        low, high = (value, high) if removed is not None and removed < target else (low, value)
    converged = [t for t in tried if t["macs_removed"] is not None]
    if not converged:
        raise OnnxSlimError(f"{method}: every probe of {knob} diverged ({[t[knob] for t in tried]})")
    best = min(converged, key=lambda t: abs(t["macs_removed"] - target))
    return {"knob": knob, "value": best[knob], "macs_removed_probe": best["macs_removed"], "probes": tried,
            "seconds": time.perf_counter() - started}


def onnx_row(ctx, model: torch.nn.Module, dense: torch.nn.Module, tag: str) -> dict:
    """Export the masked and the dense model, keep the masked model's PyTorch logits on the test split
    (``reference.npy``), then :func:`measure_onnx`."""
    from onnxslim.io import atomic_open
    from onnxslim.training.export import export

    folder = ctx.out / "onnx" / tag
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(ctx.test.images[:2])
    model.eval()
    dense.eval()
    export(model, example, folder / "masked.onnx")
    export(dense, example, folder / "dense.onnx")
    with torch.no_grad():
        reference = np.concatenate([model(torch.from_numpy(x)).numpy() for x, _ in ctx.test.batches(500)])
    with atomic_open(folder / "reference.npy") as handle:
        np.save(handle, reference)
    return measure_onnx(ctx, folder)


def measure_onnx(ctx, folder: Path) -> dict:
    """Slim ``masked.onnx`` at ``round_to="auto"`` (the CLI's default), and measure the slimmed model:
    top-1 on the test split, params and MACs against ``dense.onnx`` (Torch-Pruning rows come already
    pruned, so "masked" is no reference there), onnxruntime speedup of slimmed over dense (1 thread, batch 1,
    interleaved rounds) and max |reference - slimmed| over the test images, the reference being the masked
    model's PyTorch logits (``reference.npy``) or, for rows measured before those were kept, ``masked.onnx``
    in onnxruntime (``diff_reference`` says which). ``slim_diff`` is max |masked.onnx - slimmed| with both
    in onnxruntime: what slimming itself changed, apart from PyTorch's and onnxruntime's kernels summing in
    different orders (which grows with depth and with the logits' magnitude)."""
    import onnx
    import onnxruntime as ort

    from onnxslim.graph.slim import slim
    from onnxslim.graph.stats import model_stats
    from onnxslim.validate.accuracy import evaluate
    from onnxslim.validate.bench import BenchOptions, benchmark

    shape = {"input": [1, *ctx.test.images.shape[1:]]}
    _, report = slim(folder / "masked.onnx", folder / "slim.onnx", input_shapes=shape, round_to="auto")
    accuracy = evaluate(str(folder / "slim.onnx"), ctx.test, progress=False).value

    def logits(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"input": x})[0] for x, _ in ctx.test.batches(500)])

    kept = folder / "reference.npy"
    masked_logits = logits(folder / "masked.onnx")
    reference = np.load(kept, allow_pickle=False) if kept.exists() else masked_logits
    options = BenchOptions(threads=(1,), batch_sizes=(1,), warmup=5 if ctx.setting.quick else 30,
                           repeat=20 if ctx.setting.quick else 200, measure_memory=False)
    bench = benchmark([str(folder / "dense.onnx"), str(folder / "slim.onnx")], options, progress=False)
    before = model_stats(onnx.load(str(folder / "dense.onnx")), shape)
    after = model_stats(onnx.load(str(folder / "slim.onnx")), shape)
    exact, _ = slim(folder / "masked.onnx", input_shapes=shape)  # every zero channel gone: the masks' cost
    slimmed_logits = logits(folder / "slim.onnx")
    masks = model_stats(exact, shape)
    return {"accuracy": accuracy, "params_before": before.params, "params_after": after.params,
            "params_masked": masks.params, "macs_masked": masks.macs,
            "macs_before": before.macs, "macs_after": after.macs, "deleted_masked_channels": report.deleted_masked_channels,
            "max_abs_diff": float(np.abs(reference - slimmed_logits).max()),
            "slim_diff": float(np.abs(masked_logits - slimmed_logits).max()),
            "diff_reference": "PyTorch masked" if kept.exists() else "masked.onnx (onnxruntime)",
            "round_to": report.rounding.get("multiple"), "speedup": bench.comparisons[0].speedup}


def remeasured(ctx, key: str, row: dict | None) -> dict | None:
    """With ``--remeasure``: ``row`` with its ONNX figures measured again (:func:`measure_onnx`) from the
    files its training left in ``OUT/onnx/<key>/``, and written back; otherwise ``row``."""
    folder = ctx.out / "onnx" / key
    if row is None or not ctx.remeasure or not (folder / "masked.onnx").exists():
        return row
    row = {**row, **measure_onnx(ctx, folder)}
    write_json_atomic(ctx.out / "rows" / f"{key}.json", row)
    print(f"   {key}: measured again", flush=True)
    return row


def run_row(ctx, method: str, target: float, seed: int, knob: dict) -> dict:
    started = time.perf_counter()
    model = mask_train(ctx, method, knob["value"], seed, finetune=True)
    row = onnx_row(ctx, model, dense_model(ctx, seed), f"{ctx.setting.model}_{method}_{target}_{seed}")
    return {**row, "method": method, "target": target, "seed": seed, "knob": knob["knob"], "value": knob["value"],
            "seconds": time.perf_counter() - started}


def baseline_accuracy(ctx, seed: int) -> float:
    """Top-1 (test) of the dense model trained for the whole budget (dense + sparse + fine-tune epochs)."""
    model = copy.deepcopy(dense_model(ctx, seed))
    options = TrainOptions(batch_size=ctx.spec["batch"], seed=seed, progress=ctx.progress, evaluate_every_epoch=False)
    extra = [dataclasses.replace(ctx.phases[1], kind="dense"), dataclasses.replace(ctx.phases[2], kind="dense")]
    return Trainer(model, ctx.train, test_data=ctx.test, options=options).fit(extra).test_metric


def torch_pruning_row(ctx, importance: str, target: float, seed: int) -> dict:
    """Torch-Pruning's MetaPruner with L1 magnitude or group-norm importance, to ``target`` MACs removed."""
    import torch_pruning as tp

    started = time.perf_counter()
    dense = dense_model(ctx, seed)
    example = torch.from_numpy(ctx.train.images[:2])
    base_macs, _ = tp.utils.count_ops_and_params(dense, example)
    low, high, best = 0.0, 0.95, None
    for _ in range(8):  # bisect the pruning ratio on MACs only
        ratio = (low + high) / 2
        model = copy.deepcopy(dense)
        imp = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "group_norm"  # group L2 norm
               else tp.importance.MagnitudeImportance(p=1))
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=[last]).step()
        removed = 1.0 - tp.utils.count_ops_and_params(model, example)[0] / base_macs
        if best is None or abs(removed - target) < abs(best[1] - target):
            best = (model, removed, ratio)
        low, high = (ratio, high) if removed < target else (low, ratio)
    model = best[0]
    options = TrainOptions(batch_size=ctx.spec["batch"], seed=seed, progress=ctx.progress, evaluate_every_epoch=False)
    steps = [dataclasses.replace(ctx.phases[1], kind="dense"), dataclasses.replace(ctx.phases[2], kind="dense")]
    Trainer(model, ctx.train, options=options).fit(steps)
    row = onnx_row(ctx, model, dense, f"{ctx.setting.model}_tp-{importance}_{target}_{seed}")
    return {**row, "method": f"torch-pruning {importance}", "target": target, "seed": seed, "knob": "pruning_ratio",
            "value": best[2], "seconds": time.perf_counter() - started}


@dataclasses.dataclass
class Context:
    setting: Setting
    spec: dict
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    out: Path
    progress: bool
    table_only: bool = False  # read finished rows, compute nothing
    remeasure: bool = False  # measure the ONNX figures of finished rows again
    pending: list[str] = dataclasses.field(default_factory=list)  # rows not (yet) computed

    @property
    def phases(self):
        return phases(self.spec, self.setting)


def cached(ctx: Context, key: str, fingerprint: str, compute) -> dict | None:
    """A row from ``OUT/rows/<key>.json`` when its fingerprint matches, else computed and written
    (``None``, and the key listed as pending, with ``--table-only``)."""
    path = ctx.out / "rows" / f"{key}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint:
            return stored
        if not ctx.table_only:
            print(f"   {key}: settings changed since it was written, redoing it", flush=True)
    if ctx.table_only:
        ctx.pending.append(key)
        return None
    result = {**compute(), "fingerprint": fingerprint}
    write_json_atomic(path, result)
    return result


def run_model(ctx: Context, methods, targets, seeds, probes: int, with_tp: bool) -> list[dict]:
    """Every row of one model (computed, or read back when finished); calibrations are kept as rows
    with ``method`` and ``calibration`` so the table can report their cost."""
    rows = []
    model = ctx.setting.model
    baselines = {s: cached(ctx, f"{model}_baseline_{s}", ctx.setting.fingerprint(seed=s),
                           lambda s=s: {"accuracy": baseline_accuracy(ctx, s)}) for s in seeds}
    for method in methods:
        why = inapplicable(ctx, method)
        if why:  # e.g. BN-slimming on a net without BatchNorm: a row that says so, not a crash
            rows.extend({"model": model, "method": method, "target": t, "not_applicable": why} for t in targets)
            print(f"== {model} {method}: not applicable ({why})", flush=True)
            continue
        for target in targets:
            knob = cached(ctx, f"{model}_{method}_{target}_calibration",
                          ctx.setting.fingerprint(method=method, target=target, knobs=knobs(ctx, method), probes=probes),
                          lambda m=method, t=target: calibrate(ctx, m, t, probes))
            if knob is None:
                ctx.pending.extend(f"{model}_{method}_{target}_{seed}" for seed in seeds)
                continue
            rows.append({"model": model, "method": method, "target": target, "calibration": True,
                         "seconds": knob.get("seconds")})
            for seed in seeds:
                fp = ctx.setting.fingerprint(method=method, target=target, seed=seed, knob=knob["value"])
                key = f"{model}_{method}_{target}_{seed}"
                row = remeasured(ctx, key, cached(ctx, key, fp, lambda m=method, t=target, s=seed, k=knob:
                                                  run_row(ctx, m, t, s, k)))
                if row is not None:
                    rows.append(_announce({**row, "model": model, "baseline": _accuracy(baselines[seed])}))
    if with_tp:
        for importance in ("magnitude", "group_norm"):
            for target in targets:
                for seed in seeds:
                    fp = ctx.setting.fingerprint(tp=importance, target=target, seed=seed)
                    key = f"{model}_tp-{importance}_{target}_{seed}"
                    row = remeasured(ctx, key, cached(ctx, key, fp, lambda i=importance, t=target, s=seed:
                                                      torch_pruning_row(ctx, i, t, s)))
                    if row is not None:
                        rows.append(_announce({**row, "model": model, "baseline": _accuracy(baselines[seed])}))
    return rows


def _accuracy(baseline: dict | None) -> float | None:
    return None if baseline is None else baseline["accuracy"]


def _announce(row: dict) -> dict:
    dense = "pending" if row["baseline"] is None else f"{row['baseline']:.4f}"
    print(f"== {row['model']} {row['method']} target {row['target']:.0%} seed {row['seed']}: MACs -"
          f"{1 - row['macs_after'] / row['macs_before']:.1%}, acc {row['accuracy']:.4f} (dense {dense}), "
          f"{row['speedup']:.2f}x", flush=True)
    return row


def _mean_std(values) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "pending"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _seconds(rows: list[dict]) -> tuple[float, int]:
    """Recorded compute seconds of the rows and calibrations, and how many lack a record."""
    known = [r["seconds"] for r in rows if r.get("seconds") is not None]
    return sum(known), len(rows) - len(known)


def markdown(rows: list[dict], command: str, pending: list[str], finish: str) -> str:
    from onnxslim.report import markdown_table

    results = [r for r in rows if not r.get("calibration") and not r.get("not_applicable")]
    skipped = {(r["model"], r["method"]): r["not_applicable"] for r in rows if r.get("not_applicable")}
    seconds, unrecorded = _seconds([r for r in rows if not r.get("not_applicable")])
    lines = ["# Fashion-MNIST reproduction (matched cost)", "", f"Table built by `{command}`.", "",
             f"Recorded compute: {seconds / 3600:.2f} core-hours over {len(rows)} rows and calibrations"
             + (f" ({unrecorded} written before times were recorded: not counted)" if unrecorded else "")
             + "; each row trains on one core (`--threads 1`).", ""]
    groups: dict[tuple, list[dict]] = {}
    for row in results:
        groups.setdefault((row["model"], row["target"], row["method"]), []).append(row)
    table = []
    for (model, target, method), subset in groups.items():
        table.append((model, f"{target:.0%}", method, str(len(subset)), _mean_std([r["baseline"] for r in subset]),
                      _mean_std([r["accuracy"] for r in subset]),
                      f"{statistics.mean(1 - r['params_after'] / r['params_before'] for r in subset):.1%}",
                      f"{statistics.mean(1 - r.get('macs_masked', r['macs_after']) / r['macs_before'] for r in subset):.1%}",
                      f"{statistics.mean(1 - r['macs_after'] / r['macs_before'] for r in subset):.1%}",
                      f"{statistics.mean(r['speedup'] for r in subset):.2f}x",
                      f"{max(r['max_abs_diff'] for r in subset):.1e}", _max_slim_diff(subset)))
    lines.append(markdown_table(("model", "target MACs removed", "method", "seeds", "dense top-1 %", "slimmed top-1 %",
                                 "params removed", "MACs removed by the masks", "MACs removed (slimmed)",
                                 "ORT speedup", "max abs diff", "slim diff"), table, align="lllrrrrrrrrr"))
    lines += ["", "Top-1 on the 10,000 test images (mean ± std over seeds), onnxruntime for the slimmed model; the "
              "dense baseline is trained for the same total epochs on the same split. Knobs were chosen on MACs "
              "only (seed 0, validation split for the probes' accuracy); the test split is evaluated once per row. "
              "Speedup: dense over slimmed ONNX latency, 1 thread, batch 1, interleaved rounds. MACs removed by "
              "the masks: every zero channel deleted (what the knob was matched on); slimmed: the measured model, "
              "which keeps zero channels up to the channel multiple (params removed are the slimmed model's). Max abs "
              "diff: PyTorch masked model against the slimmed ONNX model on the test logits; slim diff: the masked "
              "ONNX model against the slimmed one, both in onnxruntime (what slimming changed; – where the row was "
              "measured before it was recorded).", "",
              _how_measured([r for r in rows if "accuracy" in r and "model" in r])]
    unmatched = _unmatched(groups)
    if unmatched:
        lines += ["", f"**Cost not matched** (MACs removed by the masks more than {UNMATCHED:.0%} from the target: "
                  "the knob's response jumps between the bisection's probes, or the final training removed "
                  "another share than its probe): " + "; ".join(unmatched) + "."]
    for (model, method), why in skipped.items():
        lines += ["", f"{model} / {method}: not applicable ({why})."]
    if pending:
        lines += ["", f"**Not yet computed ({len(pending)} rows):** {', '.join(sorted(pending))}.", "",
                  f"Finish them with `{finish}` (rows resume: finished ones are reused)."]
    return "\n".join(lines) + "\n"


def _max_slim_diff(subset: list[dict]) -> str:
    """The largest ``slim_diff`` of the rows, or "–" when a row was measured before it was recorded."""
    values = [r.get("slim_diff") for r in subset]
    return "–" if None in values else f"{max(values):.1e}"


UNMATCHED = 0.10  # a row whose masks removed a share of the MACs this far from its target is flagged


def _unmatched(groups: dict[tuple, list[dict]]) -> list[str]:
    """``"model method target: achieved"`` for the rows whose mean share of MACs removed by the masks is
    more than :data:`UNMATCHED` from the target (as fractions of the dense MACs)."""
    flagged = []
    for (model, target, method), subset in groups.items():
        achieved = statistics.mean(1 - r.get("macs_masked", r["macs_after"]) / r["macs_before"] for r in subset)
        if abs(achieved - target) > UNMATCHED:
            flagged.append(f"{model} {method} {target:.0%}: {achieved:.1%}")
    return flagged


def _how_measured(rows: list[dict]) -> str:
    """How many rows were slimmed at which ``round_to`` (rows without the field: 1, the Python API's
    default they were measured with) and against which reference their max diff was taken."""
    if not rows:
        return ""
    rounding = collections.Counter(r.get("round_to", 1) for r in rows)
    reference = collections.Counter(r.get("diff_reference", "PyTorch masked") for r in rows)
    return ("Channel multiple the rows were slimmed at (`round_to` auto, the CLI default, resolves to the "
            "machine's; 1: measured before the tool used auto): "
            + ", ".join(f"{k}: {v} rows" for k, v in sorted(rounding.items())) + ". Max abs diff against: "
            + ", ".join(f"{k}: {v} rows" for k, v in sorted(reference.items())) + ".")


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against MACs: one panel per model, one point per method and target (mean over seeds)
    and the dense baseline (mean over seeds)."""
    from onnxslim.plots import plot_accuracy_vs_macs

    points, dense = [], {}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("calibration") or row.get("not_applicable"):
            continue
        groups.setdefault((row["model"], row["method"], row["target"]), []).append(row)
        if row["baseline"] is not None:
            dense.setdefault(row["model"], {})[row["seed"]] = (row["baseline"], row["macs_before"])
    for (model, method, _), subset in groups.items():
        points.append({"label": model, "method": method, "macs": statistics.mean(r["macs_after"] for r in subset),
                       "accuracy": statistics.mean(r["accuracy"] for r in subset)})
    for model, per_seed in dense.items():
        points.append({"label": model, "method": "dense", "macs": statistics.mean(v[1] for v in per_seed.values()),
                       "accuracy": statistics.mean(v[0] for v in per_seed.values())})
    if points:
        plot_accuracy_vs_macs(points, path, title="Fashion-MNIST: top-1 vs MACs at matched cost")


def publish(rows: list[dict], command: str, pending: list[str], finish: str, folder: Path) -> str:
    """REPRODUCE_FMNIST.md / .json and accuracy_vs_macs.png into ``folder``; returns the markdown."""
    text = markdown(rows, command, pending, finish)
    write_json_atomic(folder / "REPRODUCE_FMNIST.json", {"command": command, "finish": finish, "pending": pending,
                                                         "rows": rows})
    write_text_atomic(folder / "REPRODUCE_FMNIST.md", text)
    plot(rows, folder / "accuracy_vs_macs.png")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fmnist")
    parser.add_argument("--models", default="lenet5,resnet20", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--costs", default="0.5,0.7", help="target shares of MACs removed")
    parser.add_argument("--seeds", default=None, help="comma-separated (default: per model, MODELS: 0,1,2 for "
                        "LeNet-5 and ResNet-20, 0 for VGG-16 and ResNet-56)")
    parser.add_argument("--train", type=int, default=None, help="training images (default: per model, MODELS)")
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--probes", type=int, default=None,
                        help="bisection probes per method and cost (default: per model, MODELS)")
    parser.add_argument("--torch-pruning", action="store_true", help="add Torch-Pruning rows (pip install torch-pruning)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 512/256 images, one epoch per phase, 2 probes")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: build the table and plot from the finished rows, list the pending ones")
    parser.add_argument("--publish", type=Path, default=None,
                        help="also write the table, JSON and plot to this folder (e.g. docs/reproduce/fmnist)")
    parser.add_argument("--remeasure", action="store_true",
                        help="train nothing: slim every finished row's masked.onnx again (round_to auto) and measure "
                             "its accuracy, speedup and max diff again (run it on an idle machine)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS] + [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    try:
        args.costs = [float(v) for v in args.costs.split(",")]
        args.seeds = None if args.seeds is None else [int(v) for v in args.seeds.split(",")]
    except ValueError as exc:
        parser.error(f"--costs takes numbers and --seeds integers, comma-separated: {exc}")
    if not all(0.0 < c < 1.0 for c in args.costs):
        parser.error(f"--costs are shares of the MACs to remove, each in (0, 1): got {args.costs}")
    for name in ("train", "val", "probes", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.torch_pruning and not (args.table_only or args.remeasure) and importlib.util.find_spec("torch_pruning") is None:
        parser.error("--torch-pruning needs the torch-pruning package: pip install -e \".[repro]\"")
    try:  # the data folder is checked before anything trains
        fashion_mnist_files(args.data, "train"), fashion_mnist_files(args.data, "test")
    except OnnxSlimError as exc:
        parser.error(str(exc))
    return args


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, pending = [], []
    for model in args.models:
        spec = MODELS[model]
        train_n, val_n, probes = (512, 256, 2) if args.quick else \
            (args.train or spec["train"], args.val, args.probes or spec["probes"])
        epochs = (1, 1, 1) if args.quick else spec["epochs"]
        train, val, test = split_data(args.data, train_n, val_n, spec["size"])
        if args.quick:
            test = dataclasses.replace(test, images=test.images[:512], labels=test.labels[:512])
        setting = Setting(str(Path(args.data).resolve()), train_n, val_n, model, epochs, args.quick)
        ctx = Context(setting, spec, train, val, test, args.out, not args.no_progress,
                      args.table_only or args.remeasure, remeasure=args.remeasure)
        rows += run_model(ctx, args.methods, args.costs, args.seeds or list(spec["seeds"]), probes, args.torch_pruning)
        pending += ctx.pending
    argv = [a for a in sys.argv[1:] if a not in ("--table-only", "--remeasure")]
    if "--publish" in argv:  # the command that finishes the rows does not need to publish
        at = argv.index("--publish")
        argv = argv[:at] + argv[at + 2:]
    command = "python tools/reproduce_fmnist.py " + " ".join(sys.argv[1:])
    finish = "python tools/reproduce_fmnist.py " + " ".join(argv)
    text = publish(rows, command, pending, finish, args.out)
    if args.publish:
        publish(rows, command, pending, finish, args.publish)
    print(text)
    return 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
