"""Reproduction table: every sparsity method on LeNet-5 (MNIST-10k) and ResNet-20 (MNIST-10k at 32x32).

Each (model, method) pair is one ``onnxslim run`` (:func:`onnxslim.pipeline.run_recipe`): dense
training -> mask training (sparse phase, zero masks, fine-tune) -> export -> slim -> onnxruntime
validation. **Every method gets the same epoch budget per model**: the dense phase is shared (trained
once, reused through the checkpoint), each method keeps the sparse phase (and fine-tune learning rate) it
was tuned with, and the rest of the budget goes to fine-tuning; the dense baseline of every row is trained for the same total
number of epochs. Method settings (params, sparse phase, fine-tune learning rate and schedule) come from the
method's recipe ``models/{recipe_prefix}{RECIPE_SUFFIX[method]}.toml`` (:func:`recipe_path`), whose strength
knob was chosen on a validation split with ``tools/tune_demo.py`` (its header records the trials); the model,
data, dense phase, export and validation settings are ``MODELS[model]["base"]``. A missing recipe is an error.

Writes ``REPRODUCE.md`` (the table: params and MACs removed, accuracy of the dense baseline and of the
slimmed ONNX, onnxruntime speedup of the slimmed over the dense model at 1 thread, batch 1, max |PyTorch
masked - slimmed ONNX|), ``REPRODUCE.json`` and ``accuracy_vs_macs.png`` into ``--out``.

    python tools/reproduce.py --threads 1 --out runs/reproduce     # everything (about an hour on one core)
    python tools/reproduce.py --models lenet5 --methods l1_mask,gal
    python tools/reproduce.py --device cuda                         # training on a GPU; ORT timing on the CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import typing
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("l1_mask", "bn_slimming", "l1_norm", "ssr_l21", "ssr_l20", "gal", "joint")

# per model: the shared recipe parts, the epoch budget, and the recipe file prefix of its tuned methods
MODELS = {
    "lenet5": {
        "title": "LeNet-5 / MNIST-10k",
        "recipe_prefix": "lenet5_mnist",
        "budget": 35,
        "base": {
            "model": {"name": "lenet5", "params": {"num_classes": 10, "in_channels": 1, "input_size": 28}},
            "data": {"dataset": "mnist", "split_seed": 0},
            "training": {"seed": 0, "batch_size": 64, "dense": {"epochs": 5, "lr": 0.01, "schedule": "cosine"}},
            "export": {"dynamo": True, "opset": 18},
            "validate": {"eval_batch_size": 256, "latency_threads": 1, "latency_batch": 1, "warmup": 50, "repeat": 300},
        },
        "finetune": {"lr": 0.01, "schedule": "cosine"},
    },
    "resnet20": {
        "title": "ResNet-20 / MNIST-10k 32x32",
        "recipe_prefix": "resnet20_mnist",
        "budget": 10,
        "base": {
            "model": {"name": "resnet20", "params": {"num_classes": 10, "in_channels": 1, "input_size": 32}},
            "data": {"dataset": "mnist:32", "split_seed": 0},
            "training": {"seed": 0, "batch_size": 64,
                         "dense": {"epochs": 4, "lr": 0.05, "schedule": "cosine", "weight_decay": 5e-4}},
            "export": {"dynamo": True, "opset": 18},
            "validate": {"eval_batch_size": 256, "latency_threads": 1, "latency_batch": 1, "warmup": 30, "repeat": 200},
        },
        "finetune": {"lr": 0.02, "schedule": "cosine"},
    },
}

# the recipe file of each method, after the model prefix ("" is the demo recipe)
RECIPE_SUFFIX = {"l1_mask": "", "ssr_l21": "_ssr_l21", "ssr_l20": "_ssr_l20", "gal": "_gal", "joint": "_joint",
                 "bn_slimming": "_bn_slimming", "l1_norm": "_l1_norm"}


def fail(message: str) -> typing.NoReturn:
    """Print ``error: message`` on stderr and exit with status 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def recipe_path(model: str, method: str) -> Path:
    """``models/{recipe_prefix}{RECIPE_SUFFIX[method]}.toml``: the recipe that holds ``method``'s settings on ``model``."""
    return ROOT / "models" / f"{MODELS[model]['recipe_prefix']}{RECIPE_SUFFIX[method]}.toml"


def method_settings(model: str, method: str) -> tuple[dict, dict, dict, str]:
    """(method params, sparse phase, fine-tune phase without its epochs, the recipe they came from).

    Read from :func:`recipe_path` (knobs chosen on a validation split, see each recipe's header); the
    fine-tune phase falls back to ``MODELS[model]["finetune"]`` when the recipe has none. Raises
    SystemExit(2) after one ``error: ...`` line on stderr (:func:`fail`) when the recipe is missing or
    names another method.
    """
    path = recipe_path(model, method)
    if not path.exists():
        fail(f"no recipe for {method} on {model}: {path.relative_to(ROOT)} does not exist")
    raw = tomllib.loads(path.read_text())
    if raw.get("method", {}).get("name") != method:
        fail(f"{path.relative_to(ROOT)} is a {raw.get('method', {}).get('name')!r} recipe, not {method!r}")
    finetune = {k: v for k, v in raw["training"].get("finetune", {}).items() if k != "epochs"}
    return (dict(raw["method"].get("params", {})), dict(raw["training"]["sparse"]),
            finetune or dict(MODELS[model]["finetune"]), str(path.relative_to(ROOT)))


def build_recipe(model: str, method: str, quick: bool, overrides: dict | None = None):
    """(the row's Recipe, where its settings came from); ``overrides`` are ``--set`` values per method.

    Raises SystemExit(2) after one ``error: ...`` line (:func:`fail`) when the recipe is missing or the
    result is not a valid recipe (a ``--set`` value of the wrong type or range, an unknown parameter).
    """
    from onnxslim.errors import OnnxSlimError
    from onnxslim.recipes import recipe_from_dict

    spec = MODELS[model]
    params, sparse, finetune, source = method_settings(model, method)
    for key, value in (overrides or {}).get(method, {}).items():
        if key == "sparse_epochs" and (not isinstance(value, int) or isinstance(value, bool)):
            # checked here: the budget arithmetic and --quick's clamp to 1 epoch would hide it from the recipe's check
            fail(f"--set {method}.sparse_epochs must be an integer, got {value!r}")
        if key in ("sparse_epochs", "sparse_lr"):
            sparse[key.split("_")[1]] = value
        else:
            params[key] = value
        source += f" {key}={value}"
    raw = copy.deepcopy(spec["base"])
    dense_epochs = raw["training"]["dense"]["epochs"]
    finetune = {**finetune, "epochs": spec["budget"] - dense_epochs - sparse["epochs"]}
    if finetune["epochs"] < 1:
        fail(f"{method} on {model}: its sparse phase leaves no fine-tuning in a {spec['budget']}-epoch budget")
    raw["training"]["sparse"] = sparse
    raw["training"]["finetune"] = finetune
    raw["method"] = {"name": method, "params": params}
    raw["name"] = f"{model}_{method}"
    if quick:  # a smoke run of the whole table: tiny data, one epoch per phase
        raw["data"].update(train_samples=256, test_samples=128)
        for phase in ("dense", "sparse", "finetune"):
            raw["training"][phase]["epochs"] = min(raw["training"][phase]["epochs"], 1)
        raw["validate"].update(warmup=2, repeat=10)
    try:
        return recipe_from_dict(raw, source=f"reproduce:{model}/{method}"), source
    except OnnxSlimError as error:
        fail(str(error))


# the fingerprint keys (onnxslim.pipeline.recipe_fingerprint) that shape the dense checkpoint
DENSE_KEYS = ("model.", "data.", "training.seed", "training.batch_size", "training.dense.")


def share_dense(source: Path, target: Path, recipe) -> bool:
    """Write the dense checkpoint ``source`` to ``target``, stamped with ``recipe``'s fingerprint.

    ``onnxslim run --resume`` refuses a checkpoint whose recorded recipe differs in any key, the method
    included, though the dense phase never sees the method; so the copy records ``recipe`` when every
    :data:`DENSE_KEYS` key is the same, and nothing is written (False) when one differs.
    """
    import torch

    from onnxslim.io import atomic_open
    from onnxslim.pipeline import recipe_fingerprint
    from onnxslim.training.trainer import load_checkpoint

    state = load_checkpoint(source)
    fingerprint = recipe_fingerprint(recipe)
    dense = lambda fp: {k: v for k, v in fp.items() if k.startswith(DENSE_KEYS)}  # noqa: E731
    if dense(state.get("extra", {}).get("fingerprint", {})) != dense(fingerprint):
        return False
    state["extra"] = {**state["extra"], "recipe": recipe.name, "fingerprint": fingerprint}
    with atomic_open(target) as handle:
        torch.save(state, handle)
    return True


def run_all(models, methods, out: Path, device: str | None, quick: bool, progress: bool,
            overrides: dict | None = None) -> list[dict]:
    from onnxslim.pipeline import run_recipe

    rows = []
    for model in models:
        shared_dense = None
        for method in methods:
            recipe, source = build_recipe(model, method, quick, overrides)
            run_dir = out / model / method
            run_dir.mkdir(parents=True, exist_ok=True)
            if shared_dense is not None and not (run_dir / "dense.pt").exists():
                share_dense(shared_dense, run_dir / "dense.pt", recipe)  # same dense phase: train it once
            started = time.perf_counter()
            print(f"== {model} / {method} ({source})", flush=True)
            report = run_recipe(recipe, run_dir, resume=True, progress=progress, device=device)
            shared_dense = shared_dense or run_dir / "dense.pt"
            t = recipe.training
            rows.append({
                "model": model, "method": method, "settings": source,
                "epochs": f"{t.dense.epochs}+{t.sparse.epochs}+{t.finetune.epochs}",
                "params_before": report.params_before, "params_after": report.params_after,
                "macs_before": report.macs_before, "macs_after": report.macs_after,
                "params_removed": report.params_removed, "macs_removed": report.macs_removed,
                "accuracy_before": report.accuracy_before, "accuracy_after": report.accuracy_after,
                "latency_ms_before": report.latency_ms_before, "latency_ms_after": report.latency_ms_after,
                "speedup": report.latency_ms_before / report.latency_ms_after,
                "max_abs_diff": report.max_abs_diff, "seconds": time.perf_counter() - started,
            })
            print(f"   params -{100 * report.params_removed:.1f}%  MACs -{100 * report.macs_removed:.1f}%  "
                  f"acc {100 * report.accuracy_before:.2f} -> {100 * report.accuracy_after:.2f}  "
                  f"speedup {rows[-1]['speedup']:.2f}x  max diff {report.max_abs_diff:.2g}", flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    from onnxslim.report import markdown_table

    lines = ["# Reproduction table", "", f"Produced by `{command}`.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        subset = [r for r in rows if r["model"] == model]
        budget = sum(int(e) for e in subset[0]["epochs"].split("+"))
        lines += [f"## {MODELS[model]['title']} (epochs dense+sparse+fine-tune = {budget})", "",
                  markdown_table(("method", "epochs", "params removed", "MACs removed", "accuracy dense",
                                  "accuracy slimmed", "ORT speedup", "max abs diff"),
                                 [(r["method"], r["epochs"], f"{100 * r['params_removed']:.1f} %",
                                   f"{100 * r['macs_removed']:.1f} %", f"{100 * r['accuracy_before']:.2f} %",
                                   f"{100 * r['accuracy_after']:.2f} %", f"{r['speedup']:.2f}x",
                                   f"{r['max_abs_diff']:.1e}") for r in subset], align="llrrrrrr"), ""]
    lines.append("Accuracy: top-1 of the dense baseline (same epoch budget) and of the slimmed ONNX model on the "
                 "2,000 test digits, with onnxruntime. Speedup: median onnxruntime latency of the dense model over "
                 "the slimmed one, 1 thread, batch 1, interleaved rounds. Max abs diff: PyTorch masked model vs "
                 "slimmed ONNX over the test set.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--device", default=None, help="training device (cpu, cuda); default: the recipe's")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, one epoch per phase")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="override a method parameter (JSON value), or sparse_epochs / sparse_lr; repeatable")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    overrides: dict[str, dict] = {}
    for item in args.overrides:
        target, _, value = item.partition("=")
        method, _, key = target.partition(".")
        if not key or not value:
            parser.error(f"--set expects METHOD.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        overrides.setdefault(method, {})[key] = value
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in models if m not in MODELS] + [m for m in [*methods, *overrides] if m not in METHODS]
    if unknown:
        parser.error(f"unknown: {', '.join(dict.fromkeys(unknown))}")
    unused = [m for m in overrides if m not in methods]
    if unused:
        parser.error(f"--set names {', '.join(unused)}, which --methods does not run")
    for model in models:  # every row's recipe is checked before anything trains
        for method in methods:
            build_recipe(model, method, args.quick, overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = run_all(models, methods, args.out, args.device, args.quick, not args.no_progress, overrides)

    from onnxslim.io import write_json_atomic, write_text_atomic
    from onnxslim.plots import plot_accuracy_vs_macs

    command = "python tools/reproduce.py " + " ".join(sys.argv[1:])
    write_text_atomic(args.out / "REPRODUCE.md", markdown(rows, command.strip()))
    write_json_atomic(args.out / "REPRODUCE.json", {"command": command.strip(), "rows": rows})
    points = [{"method": r["method"], "macs": r["macs_after"], "accuracy": r["accuracy_after"], "label": r["model"]}
              for r in rows]
    points += [{"method": "dense", "macs": r["macs_before"], "accuracy": r["accuracy_before"], "label": r["model"]}
               for r in rows[:1] + [r for i, r in enumerate(rows) if i and r["model"] != rows[i - 1]["model"]]]
    plot_accuracy_vs_macs(points, args.out / "accuracy_vs_macs.png", title="Accuracy vs MACs (slimmed ONNX)")
    print(markdown(rows, command.strip()))
    print(f"wrote {args.out / 'REPRODUCE.md'}, REPRODUCE.json, accuracy_vs_macs.png")
    return 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
