"""Mask training methods really produce exact zeros and the pruned LeNet still predicts (small MNIST)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from onnxslim.data import mnist_split
from onnxslim.errors import OnnxSlimError
from onnxslim.training.masks import attach_masks, channel_masks, masked_summary
from onnxslim.training.methods import (
    SparsityMethod,
    available_methods,
    get_method,
    params_from_mapping,
    soft_threshold_,
)
from onnxslim.training.methods.l1_mask import L1MaskParams
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.zoo import get_model


@pytest.fixture(scope="module")
def data():
    train, test = mnist_split()
    return train.subset(2000), test.subset(500)


@pytest.fixture(scope="module")
def dense_lenet(data):
    train, test = data
    torch.manual_seed(0)
    model = get_model("lenet5", {"width": 0.5, "batch_norm": True})
    Trainer(model, train, options=TrainOptions(progress=False)).fit([PhaseConfig("dense", 2, lr=0.02)])
    return model


def mask_train(dense, data, method, sparse_epochs=3, finetune_epochs=1):
    train, test = data
    model = copy.deepcopy(dense)
    attach_masks(model, torch.from_numpy(train.images[:2]))
    trainer = Trainer(model, train, test_data=test, method=method, options=TrainOptions(progress=False))
    result = trainer.fit([PhaseConfig("sparse", sparse_epochs, lr=0.02, schedule="constant"),
                          PhaseConfig("finetune", finetune_epochs, lr=0.02)])
    return model, result


def zero_entries(model) -> int:
    return sum(int((mask.weight == 0).sum()) for mask in channel_masks(model))


@pytest.mark.parametrize("method_name,params", [
    ("l1_mask", {"lam": 0.05, "proximal": True, "mask_lr_scale": 20.0, "epsilon": 0.0}),
    ("l1_mask", {"lam": 0.03, "epsilon": 0.01, "criterion": "mean_abs", "mask_lr_scale": 10.0}),
    ("bn_slimming", {"lam": 1e-3, "percent": 0.5}),
    ("bn_slimming", {"lam": 1e-3, "percent": 0.5, "target": "mask"}),
    ("l1_norm", {"ratio": 0.5}),
    ("l1_norm", {"ratio": 0.6, "scope": "global"}),
])
def test_method_produces_exact_zeros_and_the_pruned_model_predicts(dense_lenet, data, method_name, params):
    model, result = mask_train(dense_lenet, data, get_method(method_name, params))
    zeros = zero_entries(model)
    assert zeros > 0 and zeros == result.finalize.zero_total
    assert result.test_metric > 0.6, f"{method_name}: accuracy {result.test_metric} after pruning"
    # fine-tuning kept the zeros
    for mask in channel_masks(model):
        assert mask.frozen and mask.live_count() >= 1
    summary = masked_summary(model, torch.from_numpy(data[0].images[:2]))
    assert summary.params_live < summary.params


def test_proximal_l1_zeroes_masks_during_training(dense_lenet, data):
    method = get_method("l1_mask", {"lam": 0.05, "proximal": True, "mask_lr_scale": 20.0, "epsilon": 0.0})
    model, result = mask_train(dense_lenet, data, method, sparse_epochs=3, finetune_epochs=0)
    sparse_live = [record.live_channels for record in result.history if record.kind == "sparse"]
    total = sum(mask.channels for mask in channel_masks(model))
    assert sparse_live[-1] < total  # zeros appeared before the finalize step
    assert result.finalize.zeroed == 0  # epsilon = 0: finalize added none


def test_bn_slimming_prunes_the_global_percentile(dense_lenet, data):
    method = get_method("bn_slimming", {"lam": 0.0, "percent": 0.4})
    model = copy.deepcopy(dense_lenet)
    attach_masks(model, torch.from_numpy(data[0].images[:2]))
    report = method.finalize_masks(model)
    scored = sum(mask.channels for mask in channel_masks(model) if any(s.norm is not None for s in mask.sites))
    assert report.zero_total == int(0.4 * scored)


def test_l1_norm_per_layer_ratio(dense_lenet, data):
    model = copy.deepcopy(dense_lenet)
    attach_masks(model, torch.from_numpy(data[0].images[:2]))
    get_method("l1_norm", {"ratio": 0.5}).finalize_masks(model)
    for mask in channel_masks(model):
        assert mask.channels - mask.live_count() == int(0.5 * mask.channels)
        # the pruned filters are those with the smallest L1 norms
        norms = mask.sites[0].producer.weight.detach().reshape(mask.channels, -1).abs().sum(1)
        assert norms[mask.weight == 0].max() <= norms[mask.weight != 0].min()


def test_min_channels_is_respected(dense_lenet, data):
    model = copy.deepcopy(dense_lenet)
    attach_masks(model, torch.from_numpy(data[0].images[:2]))
    method = get_method("l1_mask", {"epsilon": 1e9, "min_channels": 2})
    method.finalize_masks(model)
    assert all(mask.live_count() == 2 for mask in channel_masks(model))


def test_registry_and_params():
    assert {"l1_mask", "bn_slimming", "l1_norm"} <= set(available_methods())
    method = get_method("l1_mask")
    assert method.params == L1MaskParams() and method.params.lam == 0.03 and method.params.epsilon == 0.01
    assert dataclasses.is_dataclass(method.params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.params.lam = 1.0
    with pytest.raises(OnnxSlimError, match="unknown parameter"):
        get_method("l1_mask", {"lambda": 0.1})
    with pytest.raises(OnnxSlimError, match="must be a float"):
        params_from_mapping(L1MaskParams, {"lam": "big"}, "test")
    with pytest.raises(OnnxSlimError, match="unknown method"):
        get_method("magic")
    assert isinstance(method, SparsityMethod)


def test_soft_threshold():
    t = torch.tensor([-1.0, -0.05, 0.0, 0.02, 0.5])
    soft_threshold_(t, 0.1)
    assert torch.allclose(t, torch.tensor([-0.9, 0.0, 0.0, 0.0, 0.4]))
    assert int((t == 0).sum()) == 3


def test_l1_mask_regularization_counts_shared_masks_once():
    model = get_model("resnet20", {"width": 0.25})
    masks = attach_masks(model, torch.randn(2, 3, 32, 32))
    method = get_method("l1_mask", {"lam": 0.5})
    penalty = method.regularization(model, None)
    assert float(penalty) == pytest.approx(0.5 * sum(m.channels for m in masks))
    assert np.isfinite(float(penalty))
