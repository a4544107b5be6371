"""SSR (structured-sparsity regularization solved by AULM): the F-step operators, the ADMM updates,
exact zero masks after a short LeNet-5 run, exact checkpoint resume, and an exactly slimmable export."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxslim.data import mnist_split
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.slim import slim
from onnxslim.graph.stats import model_stats
from onnxslim.training.export import export
from onnxslim.training.masks import attach_masks, channel_masks, iter_masks
from onnxslim.training.methods import StepContext, available_methods, get_method
from onnxslim.training.methods.ssr import (
    SSRL21,
    GroupTensor,
    SSRParams,
    filter_groups,
    prox_rows,
    prox_scale,
)
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.zoo import get_model

# ----------------------------------------------------------------------------------------------------
# operators on hand-made tensors


def rows_with_norms(norms, width=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(norms), width, generator=generator, dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True) * torch.tensor(norms, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("lam,rho", [(0.3, 1.0), (0.3, 2.0), (0.05, 0.5)])
def test_l21_step_shrinks_every_group_norm_by_lam_over_rho(lam, rho):
    norms = [0.0, 0.1, lam / rho, lam / rho + 1e-3, 0.7, 2.5]
    rows = rows_with_norms(norms)
    result = prox_rows(rows, "l21", lam, rho)
    expected = [max(n - lam / rho, 0.0) for n in norms]
    assert torch.allclose(result.norm(dim=1), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    for row, out, n in zip(rows, result, norms):
        if n > lam / rho:  # direction kept
            assert torch.allclose(out / out.norm(), row / row.norm(), atol=1e-12)
        else:  # exactly zero, not just small
            assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("lam,rho", [(0.4, 1.0), (0.02, 0.25)])
def test_l20_step_is_a_hard_threshold_at_sqrt_2lam_over_rho(lam, rho):
    threshold = math.sqrt(2 * lam / rho)
    norms = [0.0, 0.5 * threshold, threshold * (1 - 1e-6), threshold * (1 + 1e-6), 3 * threshold]
    rows = rows_with_norms(norms, seed=1)
    result = prox_rows(rows, "l20", lam, rho)
    for row, out, n in zip(rows, result, norms):
        if n > threshold:
            assert torch.equal(out, row)  # kept unchanged
        else:
            assert torch.count_nonzero(out) == 0


def test_prox_scale_accepts_per_group_lambdas_and_rejects_unknown_regularizers():
    norms = torch.tensor([1.0, 1.0, 1.0])
    scale = prox_scale(norms, "l21", torch.tensor([0.0, 0.5, 2.0]), 1.0)
    assert torch.equal(scale, torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(OnnxSlimError, match="unknown regularizer"):
        prox_scale(norms, "l1", 0.1, 1.0)


def test_conv_transpose_groups_follow_output_channels():
    deconv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    tensor = GroupTensor("w", deconv.weight, transposed_groups=2)
    weight = deconv.weight.detach()  # (Cin=4, Cout/g=3, 3, 3); output channel o = g*3 + j
    expected = torch.stack([weight[(o // 3) * 2:(o // 3 + 1) * 2, o % 3].square().sum() for o in range(6)])
    assert torch.allclose(tensor.sq_norms(weight), expected)
    factors = torch.arange(6, dtype=weight.dtype)
    scaled = tensor.scaled(weight, factors)
    for o in range(6):
        block = scaled[(o // 3) * 2:(o // 3 + 1) * 2, o % 3]
        assert torch.allclose(block, weight[(o // 3) * 2:(o // 3 + 1) * 2, o % 3] * o)


# ----------------------------------------------------------------------------------------------------
# params, registry, groups


def test_both_regularizers_are_registered_with_the_paper_defaults():
    assert {"ssr_l21", "ssr_l20"} <= set(available_methods())
    method = get_method("ssr_l20")
    assert method.regularizer == "l20" and get_method("ssr_l21").regularizer == "l21"
    params = method.params
    assert (params.rho, params.update_every) == (1.0, 200)
    assert params.lam_for("features.conv1") == 0.4 and params.lam_for("features.conv2") == 0.15
    assert params.lam_for("classifier.fc1") == 0.02 and params.lam_for("elsewhere") == params.lam


def test_layer_lams_from_a_recipe_table_and_their_errors():
    method = get_method("ssr_l21", {"lam": 0.1, "layer_lams": [["*.conv*", 0.3], ["features.conv2", 9.0]]})
    assert method.params.layer_lams == (("*.conv*", 0.3), ("features.conv2", 9.0))
    assert method.params.lam_for("features.conv2") == 0.3  # first match wins
    assert method.params.lam_for("classifier.fc1") == 0.1
    for bad in ([["conv1"]], [["conv1", "big"]], [["conv1", -1.0]], [[3, 0.1]]):
        with pytest.raises(OnnxSlimError, match="layer_lams|lambda"):
            get_method("ssr_l21", {"layer_lams": bad})
    with pytest.raises(OnnxSlimError, match="rho"):
        SSRParams(rho=0.0)
    with pytest.raises(OnnxSlimError, match="update_every"):
        SSRParams(update_every=0)


def test_groups_are_filter_rows_with_bias_and_optionally_the_bn_parameters():
    model = get_model("lenet5", {"width": 0.25, "batch_norm": True})
    attach_masks(model, torch.zeros(2, 1, 28, 28))
    groups = filter_groups(model, SSRParams())
    assert [g.layer for g in groups] == ["features.conv1", "features.conv2", "classifier.fc1"]
    assert [g.lam for g in groups] == [0.4, 0.15, 0.02]
    conv1 = model.features.conv1
    assert [t.param for t in groups[0].tensors] == [conv1.weight, conv1.bias]
    rows = torch.cat([conv1.weight.detach().reshape(conv1.out_channels, -1), conv1.bias.detach()[:, None]], 1)
    assert torch.allclose(groups[0].norms(), rows.norm(dim=1))
    with_norm = filter_groups(model, SSRParams(include_norm=True))
    bn1 = model.features.bn1.module if hasattr(model.features.bn1, "module") else model.features.bn1
    assert [t.param for t in with_norm[0].tensors][2:] == [bn1.weight, bn1.bias]
    with pytest.raises(OnnxSlimError, match="no channel masks"):
        filter_groups(get_model("lenet5", {"width": 0.25}), SSRParams())


# ----------------------------------------------------------------------------------------------------
# the ADMM updates on a small masked model


def tiny_masked_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.ReLU(),
                          nn.Linear(5, 3))
    attach_masks(model, torch.zeros(2, 2, 6, 6))
    return model


def group_rows(values):
    return torch.cat([v.reshape(v.shape[0], -1) for v in values], 1)


@pytest.mark.parametrize("name", ["ssr_l21", "ssr_l20"])
def test_f_and_y_updates_follow_the_rules(name):
    model = tiny_masked_model()
    rho, lam = 2.0, 0.35
    method = get_method(name, {"lam": lam, "layer_lams": [], "rho": rho, "update_every": 3})
    method.setup(model)
    method.update()  # F = prox(W0), Y = rho (W0 - F)
    with torch.no_grad():  # move W as a W-step would
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    Y_before = [y.clone() for y in method.Y]
    method.update()
    index = 0
    for group in method.groups:
        count = len(group.tensors)
        W = [t.param.detach() for t in group.tensors]
        T = [w + y / rho for w, y in zip(W, Y_before[index:index + count])]
        expected_F = prox_rows(group_rows(T), method.regularizer, lam, rho)
        assert torch.allclose(group_rows(method.F[index:index + count]), expected_F, atol=1e-6)
        for offset, w in enumerate(W):
            expected_Y = Y_before[index + offset] + rho * (w - method.F[index + offset])
            assert torch.allclose(method.Y[index + offset], expected_Y, atol=1e-6)
        index += count
    assert method.updates == 2


def test_w_step_gradient_is_rho_times_w_minus_f_plus_y_over_rho():
    model = tiny_masked_model()
    rho = 0.7
    method = get_method("ssr_l21", {"lam": 0.2, "layer_lams": [], "rho": rho})
    method.setup(model)
    method.update()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    method.update()
    model.zero_grad()
    ctx = StepContext(model, None, None, None, 0, 0, 0, 0.01, torch.device("cpu"))
    method.regularization(model, ctx).backward()
    for tensor, f, y in zip(method._tensors(), method.F, method.Y):
        assert torch.allclose(tensor.param.grad, rho * (tensor.param.detach() - f + y / rho), atol=1e-6)


def test_f_steps_happen_every_k_iterations():
    model = tiny_masked_model()
    method = get_method("ssr_l21", {"lam": 0.2, "layer_lams": [], "update_every": 4})
    method.setup(model)
    ctx = StepContext(model, None, None, None, 0, 0, 0, 0.01, torch.device("cpu"))
    updates = []
    for _ in range(10):
        method.regularization(model, ctx)
        method.after_step(model, ctx)
        updates.append(method.updates)
    assert updates == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


# ----------------------------------------------------------------------------------------------------
# a short LeNet-5 run on a small MNIST subset

SSR_RUN = {"lam": 0.0, "layer_lams": [["features.conv1", 0.02], ["features.conv2", 0.06],
                                      ["classifier.fc1", 0.08]], "update_every": 8}


@pytest.fixture(scope="module")
def data():
    train, test = mnist_split()
    return train.subset(1500), test.subset(500)


@pytest.fixture(scope="module")
def dense_lenet(data):
    torch.manual_seed(0)
    model = get_model("lenet5", {"width": 0.5})
    Trainer(model, data[0], options=TrainOptions(progress=False)).fit([PhaseConfig("dense", 2, lr=0.02)])
    return model


def ssr_phases(sparse=4, finetune=2):
    return [PhaseConfig("sparse", sparse, lr=0.02, schedule="constant", weight_decay=4e-5),
            PhaseConfig("finetune", finetune, lr=0.02, weight_decay=4e-5)]


def run_ssr(dense, data, name, params=SSR_RUN, checkpoint=None, method=None):
    model = copy.deepcopy(dense)
    attach_masks(model, torch.from_numpy(data[0].images[:2]))
    method = method or get_method(name, params)
    trainer = Trainer(model, data[0], test_data=data[1], method=method, checkpoint=checkpoint,
                      options=TrainOptions(progress=False, evaluate_every_epoch=False))
    return model, method, trainer


@pytest.fixture(scope="module")
def ssr_run(dense_lenet, data):
    zero_groups_at_finalize = {}

    class Spy(SSRL21):  # records the channels whose F is zero when the masks are zeroed
        def finalize_masks(self, model):
            report = super().finalize_masks(model)
            zero_groups_at_finalize.update(self.zero_groups())
            return report

    method = Spy(get_method("ssr_l21", SSR_RUN).params)
    model, method, trainer = run_ssr(dense_lenet, data, "ssr_l21", method=method)
    result = trainer.fit(ssr_phases())
    return model, method, result, zero_groups_at_finalize


def test_masks_are_exactly_zero_where_f_is_zero_and_the_pruned_model_predicts(ssr_run):
    model, method, result, zero_groups = ssr_run
    assert method.updates > 0
    total_zero = 0
    for name, mask in iter_masks(model):
        assert mask.frozen
        zero = zero_groups[name]
        if int((~zero).sum()) >= 1:  # min_channels=1 may keep one channel of an all-zero layer
            assert torch.equal(mask.weight.detach() == 0, zero)
        assert torch.all(mask.weight.detach()[~zero] == 1.0)  # masks were not trained
        total_zero += int(zero.sum())
    assert total_zero > 0 and result.finalize.zero_total == total_zero
    assert result.test_metric > 0.6, f"accuracy {result.test_metric} after pruning and fine-tuning"


def test_ssr_l20_prunes_and_predicts(dense_lenet, data):
    params = {"lam": 0.0, "layer_lams": [["features.conv2", 0.2], ["classifier.fc1", 0.17]], "update_every": 10}
    model, method, trainer = run_ssr(dense_lenet, data, "ssr_l20", params)
    result = trainer.fit(ssr_phases(sparse=2, finetune=1))
    zero = sum(int((mask.weight == 0).sum()) for mask in channel_masks(model))
    assert zero > 0 and zero == result.finalize.zero_total
    assert result.test_metric > 0.6


class Interrupted(Exception):
    pass


def test_resume_from_a_checkpoint_gives_identical_results(dense_lenet, data, tmp_path):
    phases = ssr_phases(sparse=3, finetune=1)
    # update_every=7 does not divide the 24 steps per epoch: F-steps straddle the checkpoints
    params = {**SSR_RUN, "update_every": 7}
    model_a, method_a, trainer_a = run_ssr(dense_lenet, data, "ssr_l21", params)
    trainer_a.fit(phases)

    class Crash(type(method_a)):
        def after_epoch(self, model, ctx):
            if ctx.epoch == 1:  # the checkpoint of epoch 1 is on disk, epoch 2 is lost
                raise Interrupted

    checkpoint = tmp_path / "ssr.pt"
    _, _, crashing = run_ssr(dense_lenet, data, "ssr_l21", method=Crash(method_a.params), checkpoint=checkpoint)
    with pytest.raises(Interrupted):
        crashing.fit(phases)
    model_b, method_b, trainer_b = run_ssr(dense_lenet, data, "ssr_l21", params, checkpoint=checkpoint)
    trainer_b.fit(phases, resume=True)
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    state_a, state_b = method_a.state_dict(), method_b.state_dict()
    assert (state_a["iterations"], state_a["updates"]) == (state_b["iterations"], state_b["updates"])
    for key in ("F", "Y"):
        for name in state_a[key]:
            assert torch.equal(state_a[key][name], state_b[key][name]), (key, name)


def test_export_slims_exactly_and_removes_parameters(ssr_run, data, tmp_path):
    model, _, _, _ = ssr_run
    example = torch.from_numpy(data[1].images[:4])
    exported = export(model, example, tmp_path / "masked.onnx")
    assert exported.mask_nodes == 3
    slimmed, report = slim(tmp_path / "masked.onnx", tmp_path / "slim.onnx", input_shapes={"input": [1, 1, 28, 28]})
    assert report.deleted_masked_channels > 0
    before = model_stats(onnx.load(str(tmp_path / "masked.onnx")), {"input": [1, 1, 28, 28]}).params
    assert model_stats(slimmed, {"input": [1, 1, 28, 28]}).params < before
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    images = np.ascontiguousarray(data[1].images[:200])
    masked_out = ort.InferenceSession(str(tmp_path / "masked.onnx"), options).run(None, {"input": images})[0]
    slim_out = ort.InferenceSession(str(tmp_path / "slim.onnx"), options).run(None, {"input": images})[0]
    assert np.max(np.abs(masked_out - slim_out)) <= 1e-5 * np.max(np.abs(masked_out))
    with torch.no_grad():
        torch_out = model.eval()(torch.from_numpy(images)).numpy()
    assert np.max(np.abs(torch_out - slim_out)) <= 1e-4 * max(1.0, np.max(np.abs(torch_out)))


def test_state_loaded_before_setup_is_applied_on_setup():
    model = tiny_masked_model()
    method = get_method("ssr_l20", {"lam": 0.1, "layer_lams": []})
    method.setup(model)
    method.update()
    state = method.state_dict()
    fresh = get_method("ssr_l20", {"lam": 0.1, "layer_lams": []})
    fresh.load_state_dict(state)
    fresh.setup(model)
    assert fresh.updates == 1 and all(torch.equal(a, b) for a, b in zip(fresh.F, method.F))
    with pytest.raises(OnnxSlimError, match="regularizer"):
        other = get_method("ssr_l21")
        other.setup(model)
        other.load_state_dict(state)


@pytest.mark.slow
def test_bench_aulm_tool_runs_and_reports_both_solvers(tmp_path):
    """Smoke run of tools/bench_aulm.py on a tiny setting (figures are not asserted, only reported)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(root) + (os.pathsep + os.environ["PYTHONPATH"]
                                                    if os.environ.get("PYTHONPATH") else "")}
    completed = subprocess.run(
        [sys.executable, str(root / "tools" / "bench_aulm.py"), "--width", "0.5", "--train-samples", "1000",
         "--test-samples", "300", "--dense-epochs", "1", "--max-steps", "100", "--update-every", "5",
         "--target", "0.2", "--lr", "0.05", "--lams", "features.conv2=0.3,classifier.fc1=0.3", "--json", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert [r["solver"] for r in figures["results"]] == ["aulm", "prox"]
    for result in figures["results"]:
        assert result["steps"] >= 1 and result["seconds"] > 0 and 0.0 <= result["accuracy"] <= 1.0
        assert (result["sparsity"] >= 0.2) == result["reached"]
    assert "ratio" in completed.stdout


# ----------------------------------------------------------------------------------------------------
# the layer-wise schedule of the authors' code

LAYERWISE = {**SSR_RUN, "schedule": "layerwise", "stage_finetune": 0.5}


def test_layerwise_stage_trains_only_its_layer(dense_lenet, data):
    model, method, trainer = run_ssr(dense_lenet, data, "ssr_l21", LAYERWISE)
    trainer.controller  # noqa: B018  (sets the method up)
    phase = ssr_phases(sparse=6)[0]
    optimizer = trainer.optimizer_for(phase)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    images, labels = data[0].images[:64], data[0].labels[:64]
    for epoch, layer in ((0, "features.conv1"), (2, "features.conv2")):  # first epoch of stages 1 and 2
        ctx = StepContext(model, trainer.task, optimizer, phase, epoch, 0, 0, phase.lr, torch.device("cpu"))
        trainer.step(ctx, torch.from_numpy(images), torch.from_numpy(labels))
        moved = {name.replace(".module", "") for name, p in model.named_parameters()
                 if not torch.equal(p.detach(), before[name])}
        assert moved == {f"{layer}.weight", f"{layer}.bias"}, moved
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ctx = StepContext(model, trainer.task, optimizer, phase, 1, 0, 0, phase.lr, torch.device("cpu"))
    assert method.regularization(model, ctx) is None  # the second epoch of stage 1 fine-tunes, no penalty
    trainer.step(ctx, torch.from_numpy(images), torch.from_numpy(labels))
    moved = {name.replace(".module", "") for name, p in model.named_parameters()
             if not torch.equal(p.detach(), before[name])}
    assert {"features.conv1.weight", "features.conv2.weight", "classifier.fc1.weight"} <= moved, moved


def test_layerwise_prunes_layer_by_layer_and_the_pruned_model_predicts(dense_lenet, data, tmp_path):
    params = {**LAYERWISE, "update_every": 4, "layer_lams": [["features.conv1", 0.2], ["features.conv2", 0.3],
                                                             ["classifier.fc1", 0.3]]}
    model, method, trainer = run_ssr(dense_lenet, data, "ssr_l21", params)
    result = trainer.fit(ssr_phases(sparse=6, finetune=2))
    assert method.pruned_layers == ["features.conv1", "features.conv2", "classifier.fc1"]
    zero = {name: int((mask.weight == 0).sum()) for name, mask in iter_masks(model)}
    assert sum(zero.values()) > 0, zero
    assert result.test_metric > 0.6, f"accuracy {result.test_metric}"
    example = torch.from_numpy(data[1].images[:2])
    export(model, example, tmp_path / "masked.onnx")
    slimmed, report = slim(tmp_path / "masked.onnx", input_shapes={"input": [1, 1, 28, 28]})
    assert report.deleted_masked_channels == sum(zero.values())
    x = data[1].images[:32]
    a = ort.InferenceSession(str(tmp_path / "masked.onnx")).run(None, {"input": x})[0]
    b = ort.InferenceSession(slimmed.SerializeToString()).run(None, {"input": x})[0]
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())


def test_layerwise_needs_an_epoch_per_layer(dense_lenet, data):
    model, method, trainer = run_ssr(dense_lenet, data, "ssr_l21", LAYERWISE)
    with pytest.raises(OnnxSlimError, match="at least 3 epochs"):
        trainer.fit(ssr_phases(sparse=2, finetune=1))
    with pytest.raises(OnnxSlimError, match="schedule"):
        SSRParams(schedule="stagewise")
