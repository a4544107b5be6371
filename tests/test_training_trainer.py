"""Trainer: phases, deterministic resume from per-epoch checkpoints, atomic checkpoint writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxslim.data import mnist_split
from onnxslim.errors import OnnxSlimError
from onnxslim.training import trainer as trainer_module
from onnxslim.training.masks import attach_masks, channel_masks
from onnxslim.training.methods import get_method
from onnxslim.training.trainer import (
    PhaseConfig,
    Trainer,
    TrainOptions,
    load_checkpoint,
    model_from_checkpoint,
)
from onnxslim.zoo import get_model

PHASES = [PhaseConfig("dense", 1, lr=0.02), PhaseConfig("sparse", 2, lr=0.02, schedule="constant"),
          PhaseConfig("finetune", 1, lr=0.02)]
METHOD = {"lam": 0.05, "proximal": True, "mask_lr_scale": 20.0, "epsilon": 0.0}


@pytest.fixture(scope="module")
def data():
    train, test = mnist_split()
    return train.subset(1000), test.subset(300)


def fresh_model(train):
    torch.manual_seed(3)
    model = get_model("lenet5", {"width": 0.25})
    attach_masks(model, torch.from_numpy(train.images[:2]))
    return model


def make_trainer(model, data, checkpoint):
    return Trainer(model, data[0], test_data=data[1], method=get_method("l1_mask", METHOD),
                   options=TrainOptions(batch_size=50, seed=7, progress=False), checkpoint=checkpoint,
                   extra={"model_spec": {"name": "lenet5", "params": {"width": 0.25}}})


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_resume_gives_the_same_model_as_an_uninterrupted_run(data, tmp_path, monkeypatch, stop_after):
    reference_model = fresh_model(data[0])
    reference = make_trainer(reference_model, data, tmp_path / "reference.pt").fit(PHASES)

    # the same run, interrupted after `stop_after` epochs (across phase boundaries), then resumed
    original = Trainer._run_epoch
    calls = {"n": 0}

    def interrupted(self, *args):
        if calls["n"] == stop_after:
            raise Interrupt
        calls["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_run_epoch", interrupted)
    with pytest.raises(Interrupt):
        make_trainer(fresh_model(data[0]), data, tmp_path / "run.pt").fit(PHASES)
    monkeypatch.setattr(Trainer, "_run_epoch", original)
    state = load_checkpoint(tmp_path / "run.pt")
    assert len(state["history"]) == stop_after

    torch.manual_seed(12345)  # a different global RNG state must not matter
    resumed_model = fresh_model(data[0])
    resumed = make_trainer(resumed_model, data, tmp_path / "run.pt").fit(PHASES, resume=True)

    for key, value in reference_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert resumed.test_metric == reference.test_metric
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in reference.history]
    assert resumed.finalize.zero_total == reference.finalize.zero_total


def test_completed_checkpoint_resumes_without_training(data, tmp_path, monkeypatch):
    model = fresh_model(data[0])
    first = make_trainer(model, data, tmp_path / "ckpt.pt").fit(PHASES)
    monkeypatch.setattr(Trainer, "_run_epoch", lambda *a: pytest.fail("trained again"))
    again_model = fresh_model(data[0])
    again = make_trainer(again_model, data, tmp_path / "ckpt.pt").fit(PHASES, resume=True)
    assert again.test_metric == first.test_metric
    assert all(m.frozen for m in channel_masks(again_model))
    rebuilt, state = model_from_checkpoint(tmp_path / "ckpt.pt")
    assert state["completed"] and state["masked"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key])


def test_checkpoint_is_written_atomically(data, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    make_trainer(fresh_model(data[0]), data, path).fit(PHASES[:1])
    good = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, target):
        real_save({"partial": True}, target)  # something lands in the temporary file ...
        raise OSError("disk full")  # ... then the write fails

    monkeypatch.setattr(trainer_module.torch, "save", broken_save)
    with pytest.raises(OnnxSlimError, match="disk full"):  # one error line on the command line
        make_trainer(fresh_model(data[0]), data, path).fit(PHASES[:1])
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_resume_rejects_a_checkpoint_of_other_phases(data, tmp_path):
    path = tmp_path / "ckpt.pt"
    make_trainer(fresh_model(data[0]), data, path).fit(PHASES[:1])
    with pytest.raises(OnnxSlimError, match="different phases"):
        make_trainer(fresh_model(data[0]), data, path).fit(PHASES, resume=True)


def test_phases_need_masks_and_a_method(data):
    model = get_model("lenet5", {"width": 0.25})
    with pytest.raises(OnnxSlimError, match="needs a sparsity method"):
        Trainer(model, data[0], options=TrainOptions(progress=False)).fit([PhaseConfig("sparse", 1)])
    with pytest.raises(OnnxSlimError, match="channel masks"):
        Trainer(model, data[0], method=get_method("l1_mask"), options=TrainOptions(progress=False)).fit(
            [PhaseConfig("sparse", 1)])


def test_dense_phase_learns_and_leaves_masks_alone(data):
    model = fresh_model(data[0])
    result = Trainer(model, data[0], test_data=data[1], options=TrainOptions(progress=False, batch_size=50)).fit(
        [PhaseConfig("dense", 2, lr=0.02)])
    assert result.test_metric > 0.7
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in channel_masks(model))


def test_divergence_is_reported(data):
    model = get_model("lenet5", {"width": 0.25})
    with pytest.raises(OnnxSlimError, match="diverged"):
        Trainer(model, data[0], options=TrainOptions(progress=False)).fit([PhaseConfig("dense", 1, lr=1e6)])


def test_lr_schedules():
    cosine = PhaseConfig("dense", 1, lr=0.1, schedule="cosine")
    assert cosine.lr_at(0, 100) == pytest.approx(0.1) and cosine.lr_at(50, 100) == pytest.approx(0.05)
    step = PhaseConfig("dense", 1, lr=0.1, schedule="step")
    assert [step.lr_at(s, 100) for s in (0, 60, 80)] == pytest.approx([0.1, 0.01, 0.001])
    with pytest.raises(OnnxSlimError):
        PhaseConfig("warmup", 1)
    assert np.isclose(PhaseConfig("dense", 1, lr=0.1, schedule="constant").lr_at(99, 100), 0.1)


def test_cuda_request_without_cuda_is_a_clear_error(data):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(OnnxSlimError, match="CUDA is not available"):
        Trainer(get_model("lenet5", {"width": 0.25}), data[0], options=TrainOptions(device="cuda"))
