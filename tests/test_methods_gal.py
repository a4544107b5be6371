"""GAL (onnxslim.training.methods.gal) and structure masks (onnxslim.training.structure).

Covers the FISTA mask step on hand-made tensors, branch discovery, the slim engine removing a zero
residual block / Inception branch from the exported ONNX graph with outputs unchanged, a short GAL run
on a tiny ResNet-20 (MNIST), and exact checkpoint/resume.
"""

from __future__ import annotations

import collections
import copy
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxslim.data import mnist_split
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.slim import slim
from onnxslim.training.export import export
from onnxslim.training.masks import attach_masks, iter_masks
from onnxslim.training.methods import get_method
from onnxslim.training.methods.gal import GAL, Fista
from onnxslim.training.structure import (
    MaskedStructure,
    attach_structure_masks,
    find_structures,
    fold_structure_scales,
    iter_structure_masks,
    restore_structure_masks,
    structure_values,
)
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.zoo import get_model

# ----------------------------------------------------------------------------------------------------
# FISTA


def _with_grad(values, grad) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))
    param.grad = torch.tensor(grad, dtype=torch.float64)
    return param


def test_fista_first_step_is_a_nonnegative_soft_threshold():
    param = _with_grad([1.0, 0.05, -0.3, 0.5, 0.2], [0.1, 0.0, 0.0, -0.2, 0.0])
    eta, lam = 0.5, 0.2
    Fista().step([param], eta, [lam])
    v = np.array([1.0, 0.05, -0.3, 0.5, 0.2]) - eta * np.array([0.1, 0.0, 0.0, -0.2, 0.0])
    expected = np.maximum(np.sign(v) * np.maximum(np.abs(v) - eta * lam, 0.0), 0.0)
    assert np.allclose(param.detach().numpy(), expected)
    assert param[1].item() == 0.0 and param[2].item() == 0.0  # exact zeros: shrunk, and clamped at 0


def test_fista_momentum_sequence():
    # no L1, constant gradient 1: x_{k+1} = y_k - eta, y_k = x_k + (t_k - 1) / t_{k+1} * (x_k - x_{k-1})
    fista, eta = Fista(), 0.1
    param = _with_grad([1.0], [1.0])
    xs, t = [1.0], 1.0
    for _ in range(5):
        fista.step([param], eta, [0.0])
        xs.append(param.item())
    expected, previous, t = [1.0], 1.0, 1.0
    for k in range(5):
        current = expected[-1]
        if k == 0:
            y = current
        else:
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = current + (t - 1) / t_next * (current - previous)
            t = t_next
        previous = current
        expected.append(y - eta)
    assert np.allclose(xs, expected)
    assert xs[2] == pytest.approx(0.8)  # t_0 = 1: the second step has no momentum yet
    assert xs[3] < 0.7  # from then on the steps accelerate


def test_fista_state_round_trip_and_restart():
    a, b = Fista(), Fista()
    param_a, param_b = _with_grad([1.0, 2.0], [0.3, -0.1]), _with_grad([1.0, 2.0], [0.3, -0.1])
    for _ in range(3):
        a.step([param_a], 0.1, [0.5])
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        param_b.copy_(param_a)
    a.step([param_a], 0.1, [0.5])
    b.step([param_b], 0.1, [0.5])
    assert torch.equal(param_a, param_b)
    a.restart()
    assert a.t == 1.0 and a.previous is None


def test_fista_keeps_the_last_live_entries():
    param = _with_grad([0.01, 0.03, 0.02], [0.0, 0.0, 0.0])
    Fista().step([param], 1.0, [1.0], min_live=[1])
    assert param.tolist() == pytest.approx([0.0, 0.03, 0.0])  # the largest keeps its previous value


def test_params_are_checked():
    with pytest.raises(OnnxSlimError):
        get_method("gal", {"lam_channel": -1.0})
    with pytest.raises(OnnxSlimError):
        get_method("gal", {"lambda": 0.6})
    method = get_method("gal", {"lam_structure": 0.8, "d_hidden": [16, 8]})
    assert method.params.lam_structure == 0.8 and method.params.d_hidden == (16, 8)


# ----------------------------------------------------------------------------------------------------
# structure masks


def test_branches_are_found_without_tables():
    example = torch.randn(2, 1, 32, 32)
    resnet = get_model("resnet20", {"width": 0.25, "in_channels": 1})
    attach_masks(resnet, example)
    sites = find_structures(resnet, example)
    assert [s.name for s in sites] == [f"stage{i}.{j}.residual" for i in (1, 2, 3) for j in range(3)]
    assert all(s.kind == "residual" and s.producers == 2 for s in sites)  # never the projection shortcut
    googlenet = get_model("googlenet", {"width": 0.125, "in_channels": 1})
    sites = find_structures(googlenet, example)
    assert len(sites) == 16 and all(s.kind == "concat" for s in sites)
    assert find_structures(get_model("lenet5"), torch.randn(2, 1, 28, 28)) == []
    # identity shortcuts only: MobileNetV2 blocks without a residual addition get no structure mask
    mobilenet = get_model("mobilenet_v2", {"width": 0.25, "in_channels": 1})
    traced = {s.name for s in find_structures(mobilenet, example)}
    named = {s.name for s in find_structures(mobilenet)}  # no example: the zoo's named hook points
    assert traced and traced < named


class _FlatBlock(torch.nn.Module):
    """A torchvision-style block: the residual branch is not one submodule, the add is in place."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x
        return self.relu(out)


class _FlatNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(_FlatBlock(6), _FlatBlock(6))
        self.fc = torch.nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def test_flat_residual_block_gets_its_scale_after_the_last_bn(tmp_path):
    example = torch.randn(2, 1, 12, 12)
    torch.manual_seed(0)
    model = _FlatNet()
    _randomize_batchnorm(model, 2)
    attach_masks(model, example)
    sites = find_structures(model, example)
    assert [(s.name, s.kind, s.producers) for s in sites] == [("blocks.0.bn2", "residual", 2),
                                                             ("blocks.1.bn2", "residual", 2)]
    masks = attach_structure_masks(model, example)
    model.eval()
    with torch.no_grad():
        masks[0].weight.fill_(0.0)
        masks[1].weight.fill_(0.5)
    assert fold_structure_scales(model) == 1
    export(model, example, tmp_path / "flat.onnx", dynamo=False)
    masked = onnx.load(str(tmp_path / "flat.onnx"))
    slimmed, _ = slim(masked, input_shapes={"input": list(example.shape)})
    reference = model(example).detach().numpy()
    assert np.abs(_run(slimmed, example.numpy()) - reference).max() <= 1e-5 * np.abs(reference).max()
    assert (_ops(masked)["Conv"], _ops(slimmed)["Conv"]) == (5, 3)
    assert (_ops(masked)["Add"], _ops(slimmed)["Add"]) == (2, 1)


def test_structure_masks_keep_outputs_and_restore_from_a_state_dict():
    example = torch.randn(4, 1, 32, 32)
    torch.manual_seed(0)
    model = get_model("resnet20", {"width": 0.25, "in_channels": 1}).eval()
    reference = model(example)
    attach_masks(model, example)
    masks = attach_structure_masks(model, example)
    assert len(masks) == 9 and torch.equal(model(example), reference)
    with pytest.raises(OnnxSlimError):
        attach_structure_masks(model, example)
    with torch.no_grad():
        masks[4].weight.fill_(0.0)
    state = model.state_dict()
    fresh = get_model("resnet20", {"width": 0.25, "in_channels": 1})
    attach_masks(fresh, example)
    assert restore_structure_masks(fresh, state, example)
    fresh.load_state_dict(state)
    assert structure_values(fresh) == structure_values(model)
    assert not restore_structure_masks(fresh, state, example)


def _randomize_batchnorm(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_zero_inception_branch_is_removed_with_its_concat_slice(tmp_path):
    example = torch.randn(3, 1, 32, 32)
    torch.manual_seed(0)
    model = get_model("googlenet", {"width": 0.125, "in_channels": 1})
    _randomize_batchnorm(model, 1)
    attach_masks(model, example)
    attach_structure_masks(model, example)
    model.eval()
    branches = dict(iter_structure_masks(model))
    with torch.no_grad():
        for name, mask in branches.items():
            mask.weight.fill_(0.0 if name == "inception3b.branch2" else 0.75)
    assert fold_structure_scales(model) == len(branches) - 1  # the non-zero scales move into the branches
    export(model, example, tmp_path / "masked.onnx", dynamo=False)  # the TorchScript exporter: much faster here
    masked = onnx.load(str(tmp_path / "masked.onnx"))
    slimmed, _ = slim(masked, input_shapes={"input": list(example.shape)})
    x = example.numpy()
    reference = model(example).detach().numpy()
    assert np.abs(_run(slimmed, x) - reference).max() <= 1e-5 * np.abs(reference).max()
    removed_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.inception3b.branch2.modules())
    assert removed_convs == 2
    assert _ops(slimmed)["Conv"] == _ops(masked)["Conv"] - removed_convs
    assert _ops(slimmed)["Mul"] == 0  # masks and the folded scales are all gone
    concat_inputs = sorted(len(node.input) for node in slimmed.graph.node if node.op_type == "Concat")
    assert concat_inputs == [3, 4, 4, 4]


# ----------------------------------------------------------------------------------------------------
# a short GAL run: tiny ResNet-20 on 1,000 MNIST digits at 32x32


@pytest.fixture(scope="module")
def mnist32():
    train, test = mnist_split(size=32)
    return train.subset(1000), test.subset(500)


@pytest.mark.slow
def test_gal_resnet20_prunes_channels_and_a_whole_block(mnist32, tmp_path):
    train, test = mnist32
    options = TrainOptions(batch_size=32, seed=0, progress=False)
    torch.manual_seed(0)
    dense = get_model("resnet20", {"width": 0.25, "in_channels": 1})
    Trainer(dense, train, options=options).fit([PhaseConfig(kind="dense", epochs=3, lr=0.05, schedule="cosine")])
    example = torch.from_numpy(train.images[:2])
    student = copy.deepcopy(dense)
    attach_masks(student, example)
    method = get_method("gal", {"lam_channel": 0.1, "lam_structure": 0.8, "mask_step": 1})
    trainer = Trainer(student, train, test_data=test, method=method, options=options, reference_model=dense)
    result = trainer.fit([PhaseConfig(kind="sparse", epochs=3, lr=0.01, schedule="constant"),
                          PhaseConfig(kind="finetune", epochs=2, lr=0.05, schedule="cosine")])

    # FISTA zeros are exact, for channels and for whole blocks, and stay zero through fine-tuning
    assert result.finalize.zero_total > 0 and result.finalize.zeroed == 0
    assert sum(int((m.weight == 0).sum()) for _, m in iter_masks(student)) == result.finalize.zero_total
    zero_blocks = [name for name, value in structure_values(student).items() if value == 0.0]
    assert zero_blocks
    assert result.test_metric > 0.4  # 10 classes: chance is 0.1

    student.eval()
    dense.eval()
    export(dense, example, tmp_path / "dense.onnx", dynamo=False)
    export(student, example, tmp_path / "gal.onnx")
    dense_graph = onnx.load(str(tmp_path / "dense.onnx"))
    slimmed, report = slim(tmp_path / "gal.onnx", input_shapes={"input": [1, 1, 32, 32]})
    x = test.images[:64]
    reference = student(torch.from_numpy(x)).detach().numpy()
    assert np.abs(_run(slimmed, x) - reference).max() <= 1e-5 * np.abs(reference).max()
    # each zero block leaves the graph: its two convs and its Add
    assert _ops(slimmed)["Conv"] == _ops(dense_graph)["Conv"] - 2 * len(zero_blocks)
    assert _ops(slimmed)["Add"] == _ops(dense_graph)["Add"] - len(zero_blocks)
    assert report.params_after < report.params_before


# ----------------------------------------------------------------------------------------------------
# checkpoint / resume


class _Stop(Exception):
    pass


def _gal_run(train, checkpoint, stop_after_epochs: int | None):
    torch.manual_seed(0)
    model = get_model("resnet20", {"width": 0.25, "in_channels": 1, "input_size": 28})
    attach_masks(model, torch.from_numpy(train.images[:2]))
    method = get_method("gal", {"lam_channel": 0.05, "lam_structure": 0.5, "mask_step": 2})
    if stop_after_epochs is not None:
        epochs_done = []

        def stop(model_, ctx, original=method.after_epoch):
            original(model_, ctx)
            epochs_done.append(ctx.epoch)
            if len(epochs_done) > stop_after_epochs:
                raise _Stop  # before this epoch's checkpoint is written

        method.after_epoch = stop
    trainer = Trainer(model, train, method=method, options=TrainOptions(batch_size=32, seed=3, progress=False),
                      checkpoint=checkpoint)
    phases = [PhaseConfig(kind="sparse", epochs=2, lr=0.01, schedule="constant"),
              PhaseConfig(kind="finetune", epochs=1, lr=0.01, schedule="cosine")]
    try:
        trainer.fit(phases, resume=True)
    except _Stop:
        return None
    return model, method


def test_gal_checkpoint_resume_is_exact(tmp_path):
    train, _ = mnist_split(size=28)
    train = train.subset(192)
    straight_model, straight_method = _gal_run(train, tmp_path / "straight.pt", None)
    assert _gal_run(train, tmp_path / "resumed.pt", stop_after_epochs=1) is None
    resumed_model, resumed_method = _gal_run(train, tmp_path / "resumed.pt", None)
    straight, resumed = straight_model.state_dict(), resumed_model.state_dict()
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert isinstance(straight_method, GAL)
    for name, tensor in straight_method.discriminator.state_dict().items():
        assert torch.equal(tensor, resumed_method.discriminator.state_dict()[name])
    assert any(isinstance(m, MaskedStructure) for m in resumed_model.modules())


def test_gal_checkpoint_rebuilds_with_its_structure_masks(tmp_path):
    from onnxslim.training.trainer import model_from_checkpoint

    train, _ = mnist_split(size=28)
    model, _ = _gal_run(train.subset(96), tmp_path / "gal.pt", None)
    rebuilt, _ = model_from_checkpoint(tmp_path / "gal.pt", "resnet20", {"width": 0.25, "in_channels": 1, "input_size": 28})
    assert any(isinstance(m, MaskedStructure) for m in rebuilt.modules())
    x = torch.from_numpy(train.images[:4])
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.eval()(x), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# the authors' options: masks from N(0, 1) and their linear discriminator


def test_authors_mask_init_and_discriminator(tmp_path):
    train, _ = mnist_split(size=28)
    train = train.subset(192)
    torch.manual_seed(0)
    model = get_model("resnet20", {"width": 0.25, "in_channels": 1, "input_size": 28})
    x = torch.from_numpy(train.images[:8])
    with torch.no_grad():
        before = model.eval()(x)
    attach_masks(model, torch.from_numpy(train.images[:2]))
    method = get_method("gal", {"mask_init": "normal", "d_arch": "linear", "mask_step": 1, "lam_channel": 0.01})
    trainer = Trainer(model, train, method=method, options=TrainOptions(batch_size=32, seed=0, progress=False))
    trainer.controller  # noqa: B018  (sets the method up)
    drawn = torch.cat([m.detach().reshape(-1) for m in method.mask_parameters(model)])
    assert 0.3 < float((drawn < 0).float().mean()) < 0.7  # N(0, 1): about half start negative
    with torch.no_grad():  # the teacher is the model as it was before its masks were drawn
        assert torch.allclose(method.teacher.eval()(x), before, atol=1e-5)
    assert method.discriminator(torch.zeros(4, 10)).shape == (4, 128)  # K -> 128 -> 256 -> 128, no activations
    assert not any(isinstance(m, nn.LeakyReLU) for m in method.discriminator.modules())
    trainer.fit([PhaseConfig(kind="sparse", epochs=1, lr=0.01, schedule="constant"),
                 PhaseConfig(kind="finetune", epochs=1, lr=0.01)])
    masks = torch.cat([m.weight.detach().reshape(-1) for _, m in iter_masks(model)])
    assert bool((masks >= 0).all()) and int((masks == 0).sum()) > 0  # FISTA's clamp zeroed the negative ones
    model.eval()
    export(model, x[:2], tmp_path / "gal.onnx")
    slimmed, report = slim(tmp_path / "gal.onnx", input_shapes={"input": [1, 1, 28, 28]})
    assert report.deleted_masked_channels > 0
    reference = model(x).detach().numpy()
    assert np.abs(_run(slimmed, x.numpy()) - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max())
    with pytest.raises(OnnxSlimError):
        get_method("gal", {"mask_init": "uniform"})
