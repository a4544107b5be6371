"""Worker for tests/test_distributed.py: trains a tiny CNN with every method through ``Trainer`` under
torchrun (or as one process), recording each rank's masks after every phase.

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py [--train OUT] [--resume FROM OUT] [--methods a,b]

``--train OUT`` trains every method from scratch; ``--resume FROM OUT`` resumes every method from the
checkpoint ``FROM/<method>.sparse.pt`` (written after the sparse epoch, by any number of processes).
Writes ``OUT/<method>.rank<r>.pt`` (masks and state after the sparse phase, after finalize, at the end; a
digest of the whole state; the test metric) and, on rank 0, ``OUT/<method>.sparse.pt`` and
``OUT/<method>.onnx`` (the final masked model, legacy exporter).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from onnxslim.data import mnist_split
from onnxslim.training.distributed import init_from_env, shutdown
from onnxslim.training.masks import attach_masks, iter_masks
from onnxslim.training.methods import get_method
from onnxslim.training.structure import iter_structure_masks
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions

METHODS = {
    "l1_mask": {"lam": 0.05, "proximal": True, "mask_lr_scale": 20.0, "epsilon": 0.0},
    "bn_slimming": {"lam": 1e-3, "percent": 0.4},
    "l1_norm": {"ratio": 0.5},
    "ssr_l21": {"lam": 0.3, "layer_lams": [], "update_every": 2},
    "ssr_l20": {"lam": 0.3, "layer_lams": [], "update_every": 2},
    "gal": {"lam_channel": 0.1, "lam_structure": 0.5, "mask_step": 1, "mask_lr_scale": 5.0, "d_hidden": [16]},
    "joint": {"window": 3, "similarity": 0.9, "decay": 0.3, "max_new_fraction": 0.5, "probe_samples": 32},
}
PHASES = [PhaseConfig("sparse", 1, lr=0.05, schedule="constant"), PhaseConfig("finetune", 1, lr=0.05)]
BATCH, SAMPLES = 32, 384


class TinyNet(nn.Module):
    """conv-BN-ReLU, a residual conv-BN block (coupled masks, a GAL structure scale), pool, two linears."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 7 * 7, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def data():
    train, test = mnist_split()
    return train.subset(SAMPLES), test.subset(200)


def masks(model) -> dict[str, torch.Tensor]:
    """Channel masks and GAL's structure scales by name."""
    found = {name: mask.weight.detach().clone() for name, mask in iter_masks(model)}
    found.update({name: mask.weight.detach().clone().reshape(-1) for name, mask in iter_structure_masks(model)})
    return found


def digest(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build(train):
    torch.manual_seed(0)
    model = TinyNet()
    attach_masks(model, torch.from_numpy(train.images[:2]))
    return model


def train_one(name: str, out: Path, rank: int, resume_from: Path | None) -> None:
    train, test = data()
    model = build(train)
    checkpoint = out / f"{name}.ckpt.pt"
    if resume_from is not None and rank == 0:
        shutil.copy(resume_from / f"{name}.sparse.pt", checkpoint)
    trainer = Trainer(model, train, test_data=test, method=get_method(name, METHODS[name]),
                      options=TrainOptions(batch_size=BATCH, seed=1, progress=False, evaluate_every_epoch=False),
                      checkpoint=checkpoint)
    record: dict[str, object] = {}
    begin, save = trainer.controller.begin_phase, trainer._save_checkpoint

    def begin_phase(phase, **kw):
        if phase.kind == "finetune":
            record["after_sparse"] = masks(model)
            record["sparse_params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        groups = begin(phase, **kw)
        if phase.kind == "finetune":
            record["after_finalize"] = masks(model)
        return groups

    def save_checkpoint(phases, index, epoch, optimizer):
        save(phases, index, epoch, optimizer)
        if index == 0:
            shutil.copy(checkpoint, out / f"{name}.sparse.pt")

    trainer.controller.begin_phase, trainer._save_checkpoint = begin_phase, save_checkpoint
    result = trainer.fit(PHASES, resume=resume_from is not None)
    record.update(final=masks(model), digest=digest(model), test_metric=result.test_metric,
                  structure=[name for name, _ in iter_structure_masks(model)],
                  params={k: v.detach().clone() for k, v in model.state_dict().items()},
                  method_state=trainer.method.state_dict())
    torch.save(record, out / f"{name}.rank{rank}.pt")
    exported = trainer.controller.export(out / f"{name}.onnx", torch.from_numpy(test.images[:2]), dynamo=False)
    assert (exported is None) == (rank != 0)


def main(argv: list[str]) -> None:
    jobs, methods, args = [], list(METHODS), list(argv)
    while args:
        flag = args.pop(0)
        if flag == "--train":
            jobs.append((Path(args.pop(0)), None))
        elif flag == "--resume":
            source = Path(args.pop(0))
            jobs.append((Path(args.pop(0)), source))
        elif flag == "--methods":
            methods = args.pop(0).split(",")
        else:
            raise SystemExit(f"unknown argument {flag}")
    torch.set_num_threads(1)
    dist = init_from_env("cpu")
    try:
        for out, resume_from in jobs:
            out.mkdir(parents=True, exist_ok=True)
            for name in methods:
                train_one(name, out, dist.rank, resume_from)
    finally:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
