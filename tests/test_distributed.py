"""Distributed mask training: 2 CPU processes (torchrun, gloo) against one process, for every method.

One torchrun launch trains all methods (tests/ddp_worker.py: a tiny CNN with BN and a residual block,
384 MNIST samples, global batch 32, one sparse and one fine-tune epoch) and resumes each from a
one-process checkpoint; the one-process runs happen in this process.

Tolerance against one process with the same global batch: after the sparse phase the parameters and
buffers differ by less than 15 % (relative L2 over the whole state; measured 0.3-8.1 %), not bit-exactly,
because each rank's BatchNorm normalises its 16 samples with their own batch statistics where one process
uses all 32 (SyncBatchNorm does not run on the CPU), gradients are summed in another order, and a
proximal step that zeroes a mask at a slightly different step amplifies that. Mask decisions taken from
near-equal scores may then differ for a few channels: at least 75 % must agree (measured 21-24 of 24).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ddp_worker
import numpy as np
import onnxruntime as ort
import pytest
import torch

from onnxslim.graph.slim import slim

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp")]
METHODS = list(ddp_worker.METHODS)
ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)  # written by the worker of this test run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    ddp_worker.main(["--train", str(base / "one")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(Path(__file__).with_name("ddp_worker.py")), "--train", str(base / "two"),
               "--resume", str(base / "one"), str(base / "one_then_two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp_worker.main(["--resume", str(base / "two"), str(base / "two_then_one")])
    return base


@pytest.mark.parametrize("method", METHODS)
def test_ranks_take_bit_identical_decisions(runs, method):
    rank0, rank1 = (_load(runs / "two" / f"{method}.rank{r}.pt") for r in (0, 1))
    for stage in ("after_sparse", "after_finalize", "final"):
        for name, value in rank0[stage].items():
            assert torch.equal(value, rank1[stage][name]), (stage, name)
    assert rank0["digest"] == rank1["digest"]  # every parameter and buffer, bit for bit
    assert rank0["test_metric"] == rank1["test_metric"]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_are_close_to_one_with_the_same_global_batch(runs, method):
    one, two = _load(runs / "one" / f"{method}.rank0.pt"), _load(runs / "two" / f"{method}.rank0.pt")
    floats = [k for k, v in one["sparse_params"].items() if v.is_floating_point()]
    diff = sum(float((two["sparse_params"][k] - one["sparse_params"][k]).norm() ** 2) for k in floats) ** 0.5
    norm = sum(float(one["sparse_params"][k].norm() ** 2) for k in floats) ** 0.5
    assert diff / norm < 0.15
    agree = sum(int(((one["after_finalize"][n] == 0) == (two["after_finalize"][n] == 0)).sum())
                for n in one["after_finalize"])
    total = sum(v.numel() for v in one["after_finalize"].values())
    assert agree >= 0.75 * total


@pytest.mark.parametrize("method", METHODS)
def test_resume_across_world_sizes_keeps_the_decisions(runs, method):
    # the checkpoint after the sparse epoch holds everything finalize decides from: the masks it finalizes
    # after resuming with another number of processes are exactly those of the uninterrupted run
    for source, resumed in (("one", "one_then_two"), ("two", "two_then_one")):
        reference = _load(runs / source / f"{method}.rank0.pt")
        again = _load(runs / resumed / f"{method}.rank0.pt")
        for name, value in reference["after_finalize"].items():
            assert torch.equal(value, again["after_finalize"][name]), (source, resumed, name)
        assert again["test_metric"] is not None
    rank0, rank1 = (_load(runs / "one_then_two" / f"{method}.rank{r}.pt") for r in (0, 1))
    assert rank0["digest"] == rank1["digest"]


@pytest.mark.parametrize("method", METHODS)
def test_the_distributed_model_slims_exactly(runs, method):
    masked_path = runs / "two" / f"{method}.onnx"
    record = _load(runs / "two" / f"{method}.rank0.pt")
    zeros = {name: int((v == 0).sum()) for name, v in record["final"].items()}
    assert sum(zeros.values()) > 0, "the method made no zero mask entry: the test's settings are too weak"
    slimmed, report = slim(masked_path, input_shapes={"input": [1, 1, 28, 28]})
    # every zero channel goes (a shared entry once per site); a zero GAL branch scale removes its branch
    channel_zeros = sum(count for name, count in zeros.items() if name not in record["structure"])
    assert report.deleted_masked_channels >= channel_zeros and report.params_after < report.params_before
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    masked = ort.InferenceSession(str(masked_path)).run(None, {"input": x})[0]
    session = ort.InferenceSession(slimmed.SerializeToString())
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.abs(out - masked).max() <= 1e-5 * max(1.0, float(np.abs(masked).max()))


TINY_RECIPE = """
name = "tiny-ddp"
[model]
name = "lenet5"
params = { width = 0.25 }
[data]
dataset = "mnist"
train_samples = 256
test_samples = 100
[method]
name = "l1_mask"
params = { lam = 0.05, proximal = true, mask_lr_scale = 20.0, epsilon = 0.0 }
[training]
batch_size = 32
[training.dense]
epochs = 1
lr = 0.02
[training.sparse]
epochs = 1
lr = 0.02
schedule = "constant"
[training.finetune]
epochs = 1
lr = 0.02
"""


def test_launch_command_strips_nproc():
    from onnxslim.training.distributed import launch_command

    command = launch_command(2, ["train", "r.toml", "--nproc", "2", "--out", "x", "--nproc=2"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "onnxslim",
                           "train", "r.toml", "--out", "x"]


def test_cli_train_with_nproc_then_resume_with_one_process(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cli = [sys.executable, "-m", "onnxslim", "train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run([*cli, "--nproc", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoint: ") == 1  # rank 0 alone reports
    state = _load(tmp_path / "run" / "masked.pt")
    assert state["world_size"] == 2 and state["batch_size"] == 32 and state["completed"]
    # the finished 2-process run resumes in one process: nothing is retrained, the same model comes out
    again = subprocess.run([*cli, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    masked = [line for line in done.stdout.splitlines() if line.startswith("masked ")]
    assert masked and masked == [line for line in again.stdout.splitlines() if line.startswith("masked ")]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


RECIPE = """
name = "tiny_ddp"
[model]
name = "lenet5"
params = { num_classes = 10, in_channels = 1, input_size = 28 }
[data]
dataset = "mnist"
train_samples = 512
test_samples = 256
[method]
name = "l1_mask"
params = { lam = 0.05, proximal = true, mask_lr_scale = 20.0 }
[training]
seed = 0
batch_size = 64
[training.dense]
epochs = 1
lr = 0.01
[training.sparse]
epochs = 1
lr = 0.01
[training.finetune]
epochs = 1
lr = 0.01
[validate]
warmup = 2
repeat = 5
"""


def test_run_with_nproc_2_trains_on_two_processes_and_slims_exactly(tmp_path):
    """`onnxslim run --nproc 2` relaunches itself under torchrun: both ranks train, rank 0 exports, slims,
    validates and reports; the slimmed ONNX model equals the masked PyTorch model."""
    import json

    (tmp_path / "tiny.toml").write_text(RECIPE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "onnxslim", "run", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "out"),
               "--nproc", "2", "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Grad strides do not match" not in done.stderr
    report = json.loads((tmp_path / "out" / "REPORT.json").read_text())
    # rounding to the NCHWc block may keep a few zero channels
    assert report["max_abs_diff"] <= 1e-4 and report["deleted_masked_channels"] > 0.9 * report["masked_channels"]
    checkpoint = torch.load(tmp_path / "out" / "masked.pt", weights_only=False)  # written by this test's run
    assert checkpoint["world_size"] == 2 and checkpoint["completed"]
