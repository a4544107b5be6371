"""The joint sparsity method: redundancy detection, gradient counting, exact zeros, export -> slim on
segmentation networks (UNet: ConvTranspose + skip Concat; MobileNetV3-Small seg: Resize + Concat)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxslim.data import ArrayDataset, mnist_segmentation
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.slim import slim
from onnxslim.training.export import export
from onnxslim.training.masks import attach_masks, iter_masks
from onnxslim.training.methods import get_method
from onnxslim.training.methods.joint import (
    JointParams,
    JointSparsity,
    cosine_matrix,
    redundant_channels,
    response_similarity,
    weight_similarity,
)
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.zoo import get_model
from onnxslim.zoo.segmentation import mobilenet_v3_small_seg

QUIET = TrainOptions(batch_size=16, progress=False, evaluate_every_epoch=False)


def test_registered_with_validated_params():
    method = get_method("joint", {"window": 10, "similarity": 0.95})
    assert isinstance(method, JointSparsity) and method.params.window == 10
    with pytest.raises(OnnxSlimError):
        get_method("joint", {"redundancy_source": "gradients"})
    with pytest.raises(OnnxSlimError):
        JointParams(window=0)
    with pytest.raises(OnnxSlimError):
        JointParams(decay=1.0)


# ----------------------------------------------------------------------------------------------------
# (a) redundancy


def test_duplicated_filter_is_the_redundant_one():
    generator = torch.Generator().manual_seed(0)
    filters = torch.randn(5, 12, generator=generator)
    filters[3] = 0.5 * filters[1]  # a weaker copy of filter 1
    filters[4] = filters[0]  # an exact duplicate of filter 0: the later index goes
    similarity = cosine_matrix(filters)
    strength = filters.norm(dim=1)
    redundant = redundant_channels(similarity, strength, 0.9)
    assert redundant.tolist() == [False, False, False, True, True]
    # an opposite filter is not redundant (relu(-z) is not a multiple of relu(z))
    assert not redundant_channels(cosine_matrix(torch.stack([filters[0], -filters[0]])), torch.ones(2), 0.9).any()
    # a candidate set restricts the search (dead channels are not compared)
    only = torch.tensor([True, True, True, True, False])
    assert redundant_channels(similarity, strength, 0.9, only).tolist() == [False, False, False, True, False]


class TinyNet(nn.Module):
    """conv(1->4) -> mask site -> ReLU -> fixed channel gate -> pool -> linear; BN-free so that the
    redundancy of filters is also redundancy of responses."""

    def __init__(self, gate=(1.0, 1.0, 1.0, 1.0)):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.register_buffer("gate", torch.tensor(gate).view(1, 4, 1, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x)) * self.gate), 1))


def _tiny_data(count=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((count, 1, 8, 8)).astype(np.float32)
    labels = (images[:, 0, :4].mean((1, 2)) > 0).astype(np.int64) + (images[:, 0, 4:].mean((1, 2)) > 0)
    return ArrayDataset(images, labels.astype(np.int64), 3, "tiny")


@pytest.mark.parametrize("source", ["weights", "responses"])
def test_redundant_channel_of_a_layer_is_pushed_to_exact_zero(source):
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.conv.weight[3] = 0.5 * model.conv.weight[1]
    data = _tiny_data()
    attach_masks(model, torch.from_numpy(data.images[:2]))
    (name, mask), = list(iter_masks(model))
    method = JointSparsity(JointParams(window=2, significance=0.0, min_rate=0.0, similarity=0.99, decay=0.5,
                                       redundancy_source=source, probe_samples=16))
    if source == "weights":
        similarity, strength = weight_similarity(mask)
    else:
        method.setup(model, _setup(data, model))
        similarity, strength = response_similarity(model, method._probe, 4096)[name]
    assert similarity[1, 3] > 0.999 and strength[3] < strength[1]
    Trainer(model, data, method=method, options=QUIET).fit(
        [PhaseConfig("sparse", 4, lr=0.01), PhaseConfig("finetune", 1, lr=0.01)])
    values = mask.weight.detach()
    assert values[3].item() == 0.0  # the weaker copy, exactly
    assert bool((values[[0, 1, 2]] != 0).all())  # the original and the others stay
    assert any(window["redundant"] for window in method.history)


def _setup(data, model):
    from onnxslim.training.methods import SetupContext
    from onnxslim.training.tasks import get_task

    return SetupContext(data, get_task("classification"), torch.device("cpu"), torch.from_numpy(data.images[:2]))


# ----------------------------------------------------------------------------------------------------
# (b) gradient counting


def test_channel_without_gradient_decays_to_exact_zero():
    torch.manual_seed(1)
    model = TinyNet(gate=(1.0, 1.0, 0.0, 1.0))  # channel 2 never reaches the loss: dL/dm_2 = 0
    data = _tiny_data()
    attach_masks(model, torch.from_numpy(data.images[:2]))
    (name, mask), = list(iter_masks(model))
    method = JointSparsity(JointParams(window=4, significance=0.05, min_rate=0.5, decay=0.5, redundancy_every=0))
    trainer = Trainer(model, data, method=method, options=QUIET)
    trainer.fit([PhaseConfig("sparse", 4, lr=0.01, schedule="constant")])
    values = mask.weight.detach()
    assert values[2].item() == 0.0
    assert bool((values[[0, 1, 3]] != 0).all())
    assert method.channel_states()[name]["dead"] == [2]
    # the zero survives further sparse steps (re-zeroed after the optimizer's update) and the finetune
    trainer.fit([PhaseConfig("sparse", 1, lr=0.01), PhaseConfig("finetune", 1, lr=0.01)])
    assert mask.weight[2].item() == 0.0 and trainer.finalize_report.zero_total >= 1


def test_state_round_trip_and_caps():
    torch.manual_seed(1)
    model = TinyNet(gate=(0.0, 0.0, 0.0, 0.0))  # no channel has a gradient: all are rarely significant
    data = _tiny_data()
    attach_masks(model, torch.from_numpy(data.images[:2]))
    (name, mask), = list(iter_masks(model))
    method = JointSparsity(JointParams(window=2, decay=0.5, redundancy_every=0, max_pruned_fraction=0.5))
    Trainer(model, data, method=method, options=QUIET).fit([PhaseConfig("sparse", 3, lr=0.01)])
    states = method.channel_states()[name]
    assert len(states["dead"]) + len(states["pressured"]) == 2  # capped at half of the 4 channels
    assert int((mask.weight.detach() == 0).sum()) == len(states["dead"]) >= 1
    copy = JointSparsity(method.params)
    copy.load_state_dict(method.state_dict())
    assert copy.channel_states()[name] == states and copy.history == method.history


# ----------------------------------------------------------------------------------------------------
# segmentation networks: exact zeros, export -> slim exact, fewer parameters


def _aggressive():
    # prune fast so that a few steps produce zeros; fine-tuning then trains the survivors
    return JointParams(window=2, significance=1.0, reference="live_mean", min_rate=0.6, decay=0.5,
                       similarity=0.8, probe_samples=8, max_pruned_fraction=0.75)


def _train_export_slim(model, data, tmp_path):
    example = torch.from_numpy(data.images[:2])
    attach_masks(model, example)
    method = JointSparsity(_aggressive())
    Trainer(model, data, method=method, options=QUIET).fit(
        [PhaseConfig("sparse", 3, lr=0.05, schedule="constant"), PhaseConfig("finetune", 1, lr=0.05)])
    zeros = sum(int((mask.weight == 0).sum()) for _, mask in iter_masks(model))
    assert zeros > 0
    result = export(model, example, tmp_path / "masked.onnx", dynamo=False)
    shapes = {"input": [1, *data.images.shape[1:]]}
    slimmed, report = slim(tmp_path / "masked.onnx", tmp_path / "slim.onnx", input_shapes=shapes)
    assert report.params_after < report.params_before
    # every zero mask entry is deleted (an entry shared by k sites counts k times in the report)
    assert report.deleted_masked_channels == report.masked_channels >= zeros
    inputs = np.ascontiguousarray(data.images[:6])
    masked_out = ort.InferenceSession(str(tmp_path / "masked.onnx")).run(None, {"input": inputs})[0]
    slim_out = ort.InferenceSession(str(tmp_path / "slim.onnx")).run(None, {"input": inputs})[0]
    model.eval()
    with torch.no_grad():
        torch_out = model(torch.from_numpy(inputs)).numpy()
    scale = max(1.0, float(np.abs(masked_out).max()))
    assert np.abs(masked_out - slim_out).max() <= 1e-4 * scale
    assert np.abs(torch_out - slim_out).max() <= 1e-4 * scale
    assert result.mask_nodes > 0
    return onnx.load(str(tmp_path / "masked.onnx")), slimmed


def test_unet_joint_run_slims_exactly(tmp_path):
    data, _ = mnist_segmentation(size=32, train_images=48, test_images=1)
    torch.manual_seed(0)
    model = get_model("unet", {"num_classes": 11, "input_size": 32, "width": 0.125, "depth": 2})
    masked, slimmed = _train_export_slim(model, data, tmp_path)
    ops = {node.op_type for node in masked.graph.node}
    assert {"ConvTranspose", "Concat"} <= ops
    assert {"ConvTranspose", "Concat"} <= {node.op_type for node in slimmed.graph.node}


def test_mobilenet_v3_small_seg_joint_run_slims_exactly(tmp_path):
    data, _ = mnist_segmentation(size=32, train_images=48, test_images=1)
    torch.manual_seed(0)
    model = mobilenet_v3_small_seg(num_classes=11, input_size=32, width=0.25)
    masked, _ = _train_export_slim(model, data, tmp_path)
    assert {"Resize", "Concat", "Add"} <= {node.op_type for node in masked.graph.node}
