"""Training throughput (samples/s) of mask training with 1 and 2 processes (torchrun, DDP), and on GPUs when
there are any.

    python tools/bench_ddp.py [--model resnet20] [--samples 2048] [--batch 64] [--epochs 2] [--method l1_mask]

Each configuration is a fresh ``torchrun --standalone`` launch of this file in worker mode; the worker
trains the zoo model with masks (sparse phase of ``--method``) on MNIST-10k (32x32 for CIFAR-style
models) through ``Trainer`` and reports the samples/s of its last epoch (the first one warms up), measured
by rank 0 from the epoch's wall time (every rank trains the same number of steps). The global batch is the
same for every process count; on the CPU the cores are split evenly between the processes (threads per
process = cores / processes), so the comparison is at equal hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch

    from onnxslim.data import mnist_split
    from onnxslim.training.distributed import init_from_env, shutdown
    from onnxslim.training.masks import attach_masks
    from onnxslim.training.methods import get_method
    from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
    from onnxslim.zoo import get_model

    torch.set_num_threads(args.threads)
    dist = init_from_env(args.device)
    size = 28 if args.model.startswith("lenet") else 32
    train, _ = mnist_split(size=size)
    train = train.subset(args.samples)
    torch.manual_seed(0)
    model = get_model(args.model, {"in_channels": 1, "input_size": size} if size == 32 else {})
    attach_masks(model, torch.from_numpy(train.images[:2]))
    trainer = Trainer(model, train, method=get_method(args.method),
                      options=TrainOptions(batch_size=args.batch, device=args.device, progress=False,
                                           evaluate_every_epoch=False))
    result = trainer.fit([PhaseConfig("sparse", args.epochs, lr=0.01, schedule="constant")])
    if dist.is_main:
        seconds = result.history[-1].seconds
        print("RESULT " + json.dumps({"samples_per_s": len(train) / seconds, "epoch_s": seconds}), flush=True)
    shutdown()


def launch(args: argparse.Namespace, nproc: int, threads: int, device: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", "--threads", str(threads), "--device", device, "--model", args.model,
               "--samples", str(args.samples), "--batch", str(args.batch), "--epochs", str(args.epochs),
               "--method", args.method]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {nproc} process(es) failed:\n{done.stderr[-2000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--method", default="l1_mask")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    cores = os.cpu_count() or 1
    print(f"model {args.model}, {args.samples} MNIST samples, global batch {args.batch}, method {args.method}, "
          f"{cores} CPU cores, torch {torch.__version__}")
    rows = [("cpu", 1, cores), ("cpu", 2, max(1, cores // 2))]
    gpus = torch.cuda.device_count()
    rows += [("cuda", n, 1) for n in sorted({1, min(2, gpus)}) if gpus]
    baseline = {}
    for device, nproc, threads in rows:
        result = launch(args, nproc, threads, device)
        baseline.setdefault(device, result["samples_per_s"])
        speedup = result["samples_per_s"] / baseline[device]
        print(f"{device:4s} {nproc} process(es) x {threads} thread(s): {result['samples_per_s']:8.1f} samples/s "
              f"(epoch {result['epoch_s']:.2f} s, x{speedup:.2f} vs 1 process)")
    if not gpus:
        print("no GPU here: CUDA/NCCL rows not measured")


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
