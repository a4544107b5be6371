"""How fast does AULM reach a filter sparsity, compared with proximal group lasso (Lin et al. claim ~2.5x)?

Both solvers start from the same dense LeNet-5 (trained ``--dense-epochs`` on the bundled MNIST-10k,
not timed), use the same per-layer lambdas, learning rate, momentum, weight decay, batch size and the
same data order (seeded), and stop when ``--target`` of all conv/fc filters (the masked channels:
20 + 50 + 500 for LeNet-5) are zero groups:

* **AULM** (``ssr_l21``): SGD on ``L(W) + rho/2 ||W - F + Y/rho||^2``; every ``--update-every`` steps
  ``F = prox_{lam/rho}(W + Y/rho)`` (group soft threshold) and ``Y += rho (W - F)``. Zero groups: F_i = 0.
* **prox-GL** (SSL-style group lasso, solved directly): SGD step on ``L(W)``, then the group soft
  threshold ``W_i <- W_i max(||W_i|| - lam * lr, 0) / ||W_i||`` after every step. Zero groups: W_i = 0.

Timed: the training steps only (forward, backward, optimizer step, the solver's own updates); checking
the sparsity and evaluating are not. Printed per solver: steps, seconds, the sparsity reached and the
test accuracy of the pruned network at that point (zero groups masked, no fine-tuning); then the ratio
of wall times prox-GL / AULM. A solver that does not reach the target within ``--max-steps`` is
reported as such (then the ratio is only a lower bound, or undefined when AULM did not reach it).

    python tools/bench_aulm.py --target 0.7 --max-steps 3000 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onnxslim.data import mnist_split
from onnxslim.training.masks import attach_masks, iter_masks
from onnxslim.training.methods import StepContext, get_method
from onnxslim.training.methods.ssr import filter_groups, prox_scale
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.zoo import get_model

DEFAULT_LAMS = "features.conv1=0.005,features.conv2=0.015,classifier.fc1=0.015"  # models/lenet5_mnist_ssr_l21.toml


def parse_lams(text: str) -> list[list]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, _, value = item.partition("=")
        pairs.append([pattern, float(value)])
    return pairs


def batch_order(count: int, batch_size: int, seed: int, max_steps: int):
    """The same (epoch, batch indices) sequence for every solver."""
    steps, epoch = 0, 0
    while steps < max_steps:
        order = np.random.default_rng([seed, 99, epoch]).permutation(count)
        for start in range(0, count, batch_size):
            if steps >= max_steps:
                return
            yield order[start:start + batch_size]
            steps += 1
        epoch += 1


def accuracy(model, dataset, batch_size=500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in dataset.batches(batch_size):
            correct += int((model(torch.from_numpy(images)).argmax(1) == torch.from_numpy(labels)).sum())
    model.train()
    return correct / len(dataset)


def pruned_accuracy(model, zero: dict[str, torch.Tensor], dataset) -> float:
    """Test accuracy with the zero groups' masks set to 0 (the network that would be slimmed)."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in iter_masks(pruned):
            mask.weight[zero[name]] = 0.0
    return accuracy(pruned, dataset)


def run_solver(kind: str, dense, train, test, args) -> dict:
    torch.manual_seed(args.seed)
    model = copy.deepcopy(dense)
    attach_masks(model, torch.from_numpy(train.images[:2]))
    lams = parse_lams(args.lams)
    method = get_method("ssr_l21", {"lam": args.lam, "layer_lams": lams, "rho": args.rho,
                                    "update_every": args.update_every})
    method.setup(model)
    groups = filter_groups(model, method.params)
    total = sum(g.mask.channels for g in groups)
    phase = PhaseConfig("sparse", 1, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                        schedule="constant")
    optimizer = torch.optim.SGD(method.param_groups(model, phase)[0]["params"], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    seconds, steps, sparsity, zero = 0.0, 0, 0.0, None
    model.train()
    for steps, chosen in enumerate(batch_order(len(train), args.batch_size, args.seed, args.max_steps), start=1):
        inputs, targets = torch.from_numpy(train.images[chosen]), torch.from_numpy(train.labels[chosen])
        ctx = StepContext(model, None, optimizer, phase, 0, steps - 1, steps - 1, args.lr, torch.device("cpu"))
        started = time.perf_counter()
        loss = F.cross_entropy(model(inputs), targets)
        if kind == "aulm":
            loss = loss + method.regularization(model, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if kind == "aulm":
            method.after_step(model, ctx)
        else:
            with torch.no_grad():
                for group in groups:
                    factors = prox_scale(group.norms(), "l21", group.lam * args.lr, 1.0)
                    for tensor in group.tensors:
                        tensor.param.copy_(tensor.scaled(tensor.param, factors))
        seconds += time.perf_counter() - started
        if kind == "aulm":
            zero = method.zero_groups()
        else:
            zero = {g.mask_name: g.norms() == 0 for g in groups}
        sparsity = sum(int(z.sum()) for z in zero.values()) / total
        if sparsity >= args.target:
            break
    reached = sparsity >= args.target
    return {"solver": kind, "reached": reached, "steps": steps, "seconds": seconds, "sparsity": sparsity,
            "seconds_per_step": seconds / max(1, steps),
            "live": {name: int((~z).sum()) for name, z in zero.items()},
            "accuracy": pruned_accuracy(model, zero, test)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.7, help="fraction of conv/fc filters that must be zero")
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--lams", default=DEFAULT_LAMS, help="per-layer lambdas: pattern=value,...")
    parser.add_argument("--lam", type=float, default=0.0, help="lambda of layers no pattern matches")
    parser.add_argument("--rho", type=float, default=1.0)
    parser.add_argument("--update-every", type=int, default=25, help="AULM: K, steps between F/Y updates")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dense-epochs", type=int, default=5)
    parser.add_argument("--width", type=float, default=1.0, help="LeNet-5 width multiplier")
    parser.add_argument("--train-samples", type=int, default=0, help="0: all 8,000")
    parser.add_argument("--test-samples", type=int, default=0, help="0: all 2,000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train, test = mnist_split()
    train, test = train.subset(args.train_samples or None), test.subset(args.test_samples or None)
    torch.manual_seed(args.seed)
    dense = get_model("lenet5", {"width": args.width})
    Trainer(dense, train, options=TrainOptions(batch_size=args.batch_size, seed=args.seed, progress=False)).fit(
        [PhaseConfig("dense", args.dense_epochs, lr=args.lr, momentum=args.momentum,
                     weight_decay=args.weight_decay)])
    dense_accuracy = accuracy(dense, test)
    print(f"LeNet-5 (width {args.width}), {len(train)} train / {len(test)} test samples, dense accuracy "
          f"{100 * dense_accuracy:.2f}% after {args.dense_epochs} epochs; target: {100 * args.target:.0f}% of "
          f"filters zero; lambdas {args.lams} (other {args.lam}); lr {args.lr}, momentum {args.momentum}, "
          f"batch {args.batch_size}, {args.threads} thread(s)")
    results = []
    for kind, label in (("aulm", f"AULM (rho {args.rho}, K {args.update_every})"), ("prox", "prox-GL (every step)")):
        result = run_solver(kind, dense, train, test, args)
        result["label"] = label
        results.append(result)
        live = ", ".join(f"{name.removesuffix('.mask')} {count}" for name, count in result["live"].items())
        status = "reached" if result["reached"] else f"NOT reached within {args.max_steps} steps"
        print(f"{label:28s} {status}: {result['steps']} steps, {result['seconds']:.2f} s "
              f"({1000 * result['seconds_per_step']:.1f} ms/step), sparsity {100 * result['sparsity']:.1f}%, "
              f"accuracy of the pruned net {100 * result['accuracy']:.2f}% (live: {live})")
    aulm, prox = results
    ratio = prox["seconds"] / aulm["seconds"] if aulm["reached"] and prox["reached"] else None
    if ratio is None and aulm["reached"]:
        print(f"ratio prox-GL / AULM wall time: > {prox['seconds'] / aulm['seconds']:.2f}x (lower bound: prox-GL "
              f"stopped at --max-steps; steps > {prox['steps'] / aulm['steps']:.2f}x)")
    elif ratio is None:
        print("ratio: undefined (AULM did not reach the target)")
    else:
        print(f"ratio prox-GL / AULM wall time: {ratio:.2f}x (steps {prox['steps'] / aulm['steps']:.2f}x)")
    if args.json is not None:
        from onnxslim.io import write_json_atomic

        write_json_atomic(args.json, {"args": vars(args) | {"json": str(args.json)}, "dense_accuracy": dense_accuracy,
                                      "results": results, "ratio": ratio})
    return 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
