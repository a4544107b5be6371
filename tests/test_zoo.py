"""Every zoo model: masks attached -> random zeros -> export -> slim; slimmed ONNX == masked ONNX.

Models are tiny (width 0.25, 32x32 inputs) so that the whole file runs in well under a minute per
worker. All models go through the dynamo exporter, a few also through the TorchScript one.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxslim.graph.slim import slim
from onnxslim.training.export import export
from onnxslim.training.masks import attach_masks, channel_masks, masked_summary
from onnxslim.zoo import available_models, get_model, input_shape

TINY = {
    "lenet5": {"width": 0.25},
    "vgg16": {"width": 0.125},
    "resnet20": {"width": 0.5},
    "resnet32": {"width": 0.25},
    "resnet56": {"width": 0.25},
    "resnet18": {"width": 0.125, "input_size": 32},
    "resnet50": {"width": 0.125, "input_size": 32},
    "mobilenet_v2": {"width": 0.25, "input_size": 32},
    "mobilenet_v3_small": {"width": 0.25, "input_size": 32},
    "densenet": {"width": 0.5, "blocks": [2, 2, 2]},
    "googlenet": {"width": 0.125, "input_size": 16},
    "unet": {"width": 0.25, "input_size": 32, "depth": 3, "base": 32},
    "mobilenet_v3_small_seg": {"width": 0.25, "input_size": 32},
}
LEGACY_TOO = {"resnet20", "mobilenet_v3_small", "unet", "densenet"}
# models whose masked_summary equals the ONNX parameter count of the slimmed file exactly
# (the others have gates or Clip constants that the estimate does not model)
EXACT_SUMMARY = {"lenet5", "vgg16", "resnet20", "resnet50", "densenet", "googlenet", "unet"}


def test_every_zoo_model_is_covered():
    assert set(TINY) == set(available_models())


def build_masked(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = get_model(name, TINY[name])
    c, h, w = input_shape(name, TINY[name])
    example = torch.randn(2, c, h, w)
    masks = attach_masks(model, example)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # non-trivial BN statistics, so that a missing mask would show up as a difference
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
        for mask in masks:  # zero ~40 % of every (shared) mask, keep at least one channel
            keep = torch.rand(mask.channels, generator=generator) > 0.4
            keep[int(torch.randint(mask.channels, (1,), generator=generator))] = True
            mask.weight.copy_(torch.where(keep, torch.rand(mask.channels, generator=generator) + 0.5, 0.0))
    return model.eval(), example, masks


def run(path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


# every model with the dynamo exporter, a few with the legacy one as well
_CASES = [(name, True) for name in sorted(TINY)] + [(name, False) for name in sorted(TINY) if name in LEGACY_TOO]


@pytest.mark.parametrize("name,dynamo", _CASES, ids=[f"{n}-{'dynamo' if d else 'legacy'}" for n, d in _CASES])
def test_masked_export_slims_exactly(name, dynamo, tmp_path):
    model, example, masks = build_masked(name)
    assert masks, f"{name}: no maskable channels found"
    zeros = sum(mask.channels - mask.live_count() for mask in masks)
    assert zeros > 0
    masked_path = tmp_path / "masked.onnx"
    result = export(model, example, masked_path, dynamo=dynamo)
    # export itself: PyTorch and onnxruntime agree, and every mask site became one Mul
    scale = float(model(example).abs().max())
    assert result.max_abs_diff <= 1e-5 * max(1.0, scale)
    assert result.mask_nodes == sum(len(mask.sites) for mask in masks)

    slim_path = tmp_path / "slim.onnx"
    _, report = slim(masked_path, slim_path, input_shapes={"input": list(example.shape)})
    assert report.params_after < report.params_before
    assert report.deleted_masked_channels == report.masked_channels > 0

    x = np.random.default_rng(1).standard_normal((3, *example.shape[1:])).astype(np.float32)
    expected, actual = run(masked_path, x), run(slim_path, x)
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= 1e-5 * max(1.0, float(np.abs(expected).max()))
    if name in EXACT_SUMMARY and dynamo:
        assert masked_summary(model, example).params_live == report.params_after


def test_zero_mask_gives_exact_zero_channels():
    model, example, masks = build_masked("resnet20")
    outputs = {}
    site = masks[0].sites[0]
    module = site.norm if site.norm is not None else site.producer
    module.register_forward_hook(lambda m, i, o: outputs.setdefault("site", o))
    masked_output = {}
    masks[0].register_forward_hook(lambda m, i, o: masked_output.setdefault("out", o))
    with torch.no_grad():
        model(example)
    zero = (masks[0].weight == 0).nonzero().flatten()
    assert len(zero) > 0
    assert torch.count_nonzero(outputs["site"][:, zero]) > 0  # BN shift makes them non-zero before the mask
    assert torch.count_nonzero(masked_output["out"][:, zero]) == 0  # and exactly zero after it


def test_get_model_rejects_unknown_parameters():
    from onnxslim.errors import OnnxSlimError

    with pytest.raises(OnnxSlimError, match="no parameter 'depth'"):
        get_model("lenet5", {"depth": 3})
    with pytest.raises(OnnxSlimError, match="unknown model"):
        get_model("alexnet")


def test_reference_parameter_counts():
    # the published sizes at width 1: LeNet 20-50-500 431k, ResNet-20 0.27M, ResNet-50 25.6M
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(get_model("lenet5")) == 431_080
    assert count(get_model("resnet20")) == 272_474
    assert count(get_model("resnet50")) == 25_557_032
    assert count(get_model("mobilenet_v2")) == 3_504_872


def test_structure_hook_points_exist():
    resnet = get_model("resnet20", {"width": 0.25})
    blocks = [m for m in resnet.modules() if hasattr(m, "residual") and hasattr(m, "shortcut")]
    assert len(blocks) == 9
    googlenet = get_model("googlenet", {"width": 0.125})
    inceptions = [m for m in googlenet.modules() if hasattr(m, "branch4")]
    assert len(inceptions) == 4


def test_unet_segmentation_output_shape():
    model = get_model("unet", TINY["unet"]).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, 32, 32))
    assert y.shape == (2, 2, 32, 32)
    classifier = get_model("unet", {**TINY["unet"], "head": "classification", "num_classes": 10}).eval()
    with torch.no_grad():
        assert classifier(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_every_mask_in_channel_masks_is_used():
    model, example, masks = build_masked("mobilenet_v2")
    assert {id(m) for m in channel_masks(model)} == {id(m) for m in masks}
