"""MaskController (the own-loop API) and the trainer's data sources: torch Datasets and arrays."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from onnxslim.data import mnist_split
from onnxslim.errors import OnnxSlimError
from onnxslim.training import MaskController
from onnxslim.training.batches import epoch_indices, steps_per_epoch
from onnxslim.training.masks import channel_masks
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.zoo import get_model


@pytest.fixture(scope="module")
def data():
    train, _ = mnist_split()
    return train.subset(128)


def lenet():
    torch.manual_seed(0)
    return get_model("lenet5", {"width": 0.25})


def trained_weights(train_data) -> dict[str, torch.Tensor]:
    model = lenet()
    Trainer(model, train_data, options=TrainOptions(batch_size=32, progress=False)).fit([PhaseConfig("dense", 1)])
    return model.state_dict()


def test_torch_dataset_and_arrays_train_like_an_array_dataset(data):
    reference = trained_weights(data)
    as_torch = trained_weights(TensorDataset(torch.from_numpy(data.images), torch.from_numpy(data.labels)))
    as_arrays = trained_weights((data.images, data.labels))
    for name, value in reference.items():
        assert torch.equal(value, as_arrays[name]), name
        # the same batches in the same order; collated tensors sit elsewhere in memory, which may change
        # the CPU kernels' vector alignment by one rounding (measured: at most 7.5e-9 after 4 steps)
        torch.testing.assert_close(as_torch[name], value, rtol=0, atol=1e-6)


def test_epoch_order_is_sharded_like_distributed_sampler():
    one = epoch_indices(10, seed=3, phase=0, epoch=1)
    ranks = [epoch_indices(10, seed=3, phase=0, epoch=1, rank=r, world_size=4) for r in range(4)]
    padded = list(one) + list(one[:2])  # 12 = 10 padded to a multiple of 4 with the first indices
    assert [list(r) for r in ranks] == [padded[r::4] for r in range(4)]
    assert steps_per_epoch(10, 4, world_size=2) == 3 == steps_per_epoch(10, 4)
    with pytest.raises(OnnxSlimError, match="does not split"):
        steps_per_epoch(10, 5, world_size=2)


def test_controller_runs_a_method_with_its_own_step(data):
    model = lenet()
    x, y = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    ctl = MaskController(model, "gal", {"lam_channel": 0.5, "mask_step": 1, "mask_lr_scale": 20.0,
                                        "structure_masks": False, "d_hidden": [8]}, example_input=x[:2])
    optimizer = torch.optim.SGD(ctl.begin_phase("sparse", lr=0.05), lr=0.05, momentum=0.9)
    with pytest.raises(OnnxSlimError, match="replaces the training step"):
        ctl.regularization()
    for start in range(0, 128, 32):
        ctl.step(x[start:start + 32], y[start:start + 32], optimizer)
    ctl.end_epoch()
    assert ctl.global_step == 4 and ctl.epoch == 1
    ctl.begin_phase("finetune", lr=0.05)
    assert ctl.finalized and ctl.finalize_report.zero_total > 0
    assert all(mask.frozen for mask in channel_masks(model))
    assert float(ctl.regularization()) == 0.0


def test_controller_refuses_what_it_cannot_do(data):
    x = torch.from_numpy(data.images[:2])
    with pytest.raises(OnnxSlimError, match="needs a sparsity method"):
        MaskController(lenet(), None).begin_phase("sparse")
    with pytest.raises(OnnxSlimError, match="example_input"):
        MaskController(lenet(), "l1_mask")
    with pytest.raises(OnnxSlimError, match="probes the training data"):
        MaskController(lenet(), "joint", example_input=x)
    with pytest.raises(OnnxSlimError, match="call begin_phase"):
        MaskController(lenet(), "l1_mask", example_input=x).after_step()


class _SENet(torch.nn.Module):
    """conv -> BN -> ReLU -> squeeze-excitation (fc1 -> ReLU -> fc2 -> sigmoid) -> linear head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.fc1, self.fc2 = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 8, 1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(torch.nn.functional.adaptive_avg_pool2d(x, 1)))))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x * gate, 1).flatten(1))


def test_controller_warns_when_a_whole_mask_died_and_exports_with_its_example(data, tmp_path):
    """A method that zeroes every channel of a mask (here the SE's hidden layer) silently turned the layer
    into a constant: finalize now warns naming the mask, and the table shows it. ``ctl.export(path)`` needs
    no example (the controller's, as its docstring shows); slim deletes the dead layer's channels and
    onnxruntime computes the same outputs before and after."""
    import onnxruntime as ort

    import onnxslim

    torch.manual_seed(0)
    x, y = torch.from_numpy(data.images[:32]), torch.from_numpy(data.labels[:32])
    ctl = MaskController(_SENet(), "l1_mask", {"lam": 1e-3, "proximal": True}, example_input=x[:2])
    optimizer = torch.optim.SGD(ctl.begin_phase("sparse", lr=0.01), lr=0.01)
    ctl.step(x, y, optimizer)
    masks = dict(ctl.model.named_modules())
    with torch.no_grad():
        masks["fc1.mask"].weight.zero_()  # what a too strong lam does to a small layer
    with pytest.warns(UserWarning, match=r"zeroed every channel of 1 mask\(s\): fc1\.mask"):
        ctl.begin_phase("finetune", lr=0.01)
    assert ctl.finalize_report.dead_masks == ["fc1.mask"]
    assert "fc1.mask     0 / 4 live" in ctl.finalize_report.format_table().splitlines()
    ctl.model.eval()
    ctl.export(tmp_path / "masked.onnx", dynamo=False)
    _, report = onnxslim.slim(str(tmp_path / "masked.onnx"), str(tmp_path / "slim.onnx"))
    fc1 = next(layer for layer in report.layers if layer.module == "fc1")
    assert (fc1.channels_before, fc1.channels_after) == (4, 1)  # one zero channel kept: the tensor stays non-empty
    feed = {"input": data.images[:8]}
    outputs = [ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, feed)[0]
               for name in ("masked.onnx", "slim.onnx")]
    assert abs(outputs[0] - outputs[1]).max() < 1e-5
