"""Export: masks become per-channel Mul nodes after BN folding; onnxruntime agrees with PyTorch."""

from __future__ import annotations

import onnx
import pytest
import torch
from click.testing import CliRunner

from onnxslim.cli import main
from onnxslim.data import mnist_split
from onnxslim.errors import OnnxSlimError
from onnxslim.training.export import count_mask_nodes, export
from onnxslim.training.masks import attach_masks
from onnxslim.training.methods import get_method
from onnxslim.training.trainer import PhaseConfig, Trainer, TrainOptions
from onnxslim.zoo import get_model


def masked_resnet():
    torch.manual_seed(0)
    model = get_model("resnet20", {"width": 0.25})
    example = torch.randn(2, 3, 32, 32)
    masks = attach_masks(model, example)
    with torch.no_grad():
        for mask in masks:
            mask.weight.uniform_(0.5, 1.5)
            mask.weight[0] = 0.0
    return model, example, masks


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_masks_export_as_mul_between_folded_conv_and_activation(tmp_path, dynamo):
    model, example, masks = masked_resnet()
    model.train()
    result = export(model, example, tmp_path / "m.onnx", dynamo=dynamo, opset=18)
    assert model.training  # mode restored
    assert result.exporter == ("dynamo" if dynamo else "torchscript")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    proto = onnx.load(str(tmp_path / "m.onnx"))
    ops = [node.op_type for node in proto.graph.node]
    assert "BatchNormalization" not in ops  # folded into the convolutions
    assert result.mask_nodes == count_mask_nodes(proto) == sum(len(m.sites) for m in masks)
    assert proto.opset_import[0].version >= 17
    # Conv -> Mul(mask) -> Relu on the first block
    producers = {out: node for node in proto.graph.node for out in node.output}
    relus = [node for node in proto.graph.node if node.op_type == "Relu"]
    mul = producers[relus[0].input[0]]
    assert mul.op_type == "Mul" and producers[mul.input[0]].op_type == "Conv"
    initializers = {init.name: list(init.dims) for init in proto.graph.initializer}
    assert initializers[mul.input[1]] == [1, masks[0].channels, 1, 1]
    # the batch stays dynamic
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_linear_masks_export_as_two_dimensional_constants(tmp_path):
    torch.manual_seed(0)
    model = get_model("lenet5", {"width": 0.25})
    attach_masks(model, torch.randn(2, 1, 28, 28))
    export(model, torch.randn(2, 1, 28, 28), tmp_path / "lenet.onnx")
    proto = onnx.load(str(tmp_path / "lenet.onnx"))
    shapes = {init.name: list(init.dims) for init in proto.graph.initializer}
    mask_shapes = sorted(shapes[n.input[1]] for n in proto.graph.node if n.op_type == "Mul")
    assert mask_shapes == [[1, 5, 1, 1], [1, 13, 1, 1], [1, 125]]


def test_export_errors_and_atomicity(tmp_path):
    model, example, _ = masked_resnet()
    with pytest.raises(OnnxSlimError, match="opset"):
        export(model, example, tmp_path / "old.onnx", opset=13)
    with pytest.raises(OnnxSlimError, match="opset 99 is newer than the installed onnx"):
        export(model, example, tmp_path / "new.onnx", opset=99)  # the dynamo exporter would write 18
    with pytest.raises(OnnxSlimError, match="export"):
        export(model, torch.randn(2, 5, 32, 32), tmp_path / "bad.onnx")  # wrong channel count
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_cli_from_a_trainer_checkpoint(tmp_path):
    train, _ = mnist_split()
    train = train.subset(500)
    torch.manual_seed(0)
    model = get_model("lenet5", {"width": 0.25})
    attach_masks(model, torch.from_numpy(train.images[:2]))
    spec = {"name": "lenet5", "params": {"width": 0.25}}
    Trainer(model, train, method=get_method("l1_norm", {"ratio": 0.5}), options=TrainOptions(progress=False),
            checkpoint=tmp_path / "masked.pt", extra={"model_spec": spec}).fit(
        [PhaseConfig("sparse", 1), PhaseConfig("finetune", 1)])
    runner = CliRunner()
    for args in (["--legacy"], []):
        result = runner.invoke(main, ["export", str(tmp_path / "masked.pt"), "-o", str(tmp_path / "out.onnx"), *args])
        assert result.exit_code == 0, result.output
        assert "mask Mul nodes" in result.output
        assert count_mask_nodes(onnx.load(str(tmp_path / "out.onnx"))) == 3
    # wrong model for the checkpoint: one line, exit code 2
    result = runner.invoke(main, ["export", str(tmp_path / "masked.pt"), "-o", str(tmp_path / "x.onnx"),
                                  "--model", "lenet5", "--param", "width=0.5"])
    assert result.exit_code == 2 and "do not fit" in result.output


class _Named(torch.nn.Module):
    """A user-style net: Sequential stem, a residual block with a strided 1x1 shortcut, a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.layer2 = torch.nn.ModuleList([torch.nn.ModuleDict({
            "conv1": torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), "bn1": torch.nn.BatchNorm2d(8),
            "shortcut": torch.nn.Conv2d(8, 8, 1, stride=2, bias=False)})])
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        block = self.layer2[0]
        x = torch.relu(block["bn1"](block["conv1"](x)) + block["shortcut"](x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("dynamo", [True, False])
def test_module_paths_travel_into_onnx_and_the_slim_reports(tmp_path, dynamo):
    """Both exporters: every producer carries its PyTorch path; slim, inspect and the plot show it."""
    import onnxruntime as ort

    import onnxslim
    from onnxslim.graph.names import module_path
    from onnxslim.plots import _layer_tuple

    torch.manual_seed(0)
    model, example = _Named().eval(), torch.randn(2, 3, 8, 8)
    masks = attach_masks(model, example)
    with torch.no_grad():
        for mask in masks:
            mask.weight[:3] = 0.0
    path = tmp_path / "named.onnx"
    export(model, example, path, dynamo=dynamo)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    paths = [module_path(n) for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert paths == ["stem.0", "layer2.0.conv1", "layer2.0.shortcut", "fc"]
    slimmed, report = onnxslim.slim(str(path), str(tmp_path / "slim.onnx"))
    assert report.deleted_masked_channels == report.masked_channels > 0
    assert [layer.module for layer in report.layers] == paths
    table = report.format_table()
    assert "layer2.0.shortcut (" in table and "stem.0 (" in table  # the ONNX node name beside it
    assert [_layer_tuple(layer)[0] for layer in report.layers] == paths
    assert [module_path(n) for n in slimmed.graph.node if n.op_type in ("Conv", "Gemm")] == paths
    text = onnxslim.inspect_model(str(path)).format_text()
    assert "layer2.0.conv1 (" in text
    # the coupled groups name their layers as the table does (the residual Add ties the two convs)
    assert any(f"layers: {a}, {b}\n" in text for a, b in [("layer2.0.conv1", "layer2.0.shortcut"),
                                                           ("layer2.0.shortcut", "layer2.0.conv1")]), text
    session = ort.InferenceSession(str(tmp_path / "slim.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.numpy()})[0]
    with torch.no_grad():
        assert abs(got - model(example).numpy()).max() < 1e-4


def test_export_reports_the_opset_it_wrote(tmp_path):
    """Asked for opset 17, the dynamo exporter writes 18 for a model with a pooling gate (seen with torch
    2.13; LeNet-5 stays at 17): the result (and the CLI line) say what was written, not what was asked;
    the legacy exporter writes 17."""

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y * torch.sigmoid(torch.nn.functional.adaptive_avg_pool2d(y, 1))

    for dynamo in (True, False):
        result = export(Gate(), torch.randn(2, 1, 8, 8), tmp_path / f"m{dynamo}.onnx", dynamo=dynamo, opset=17)
        written = onnx.load(str(tmp_path / f"m{dynamo}.onnx")).opset_import
        assert result.opset == next(o.version for o in written if o.domain in ("", "ai.onnx"))
        assert result.requested_opset == 17
        assert result.opset == (18 if dynamo else 17)


class _NestedBlock(torch.nn.Module):
    """A RegNet/ResNet-style block whose convs sit in Sequentials inside the block (``proj.0``, ``deep.0.1.0``)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1, bias=False), torch.nn.BatchNorm2d(8))
        self.deep = torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1))))

    def forward(self, x):
        return torch.relu(self.proj(x) + self.deep(x))


def test_torchscript_names_nested_sequentials_like_dynamo(tmp_path):
    """The TorchScript exporter scopes ``s1.0.proj.0`` as ``/s1/s1.0/proj/proj.0/Conv``: both exporters give the
    conv's own path (the legacy one used to give the Sequential's, ``s1.0.proj``), and the slimmed models,
    named alike, compute what the masked ones compute (onnxruntime)."""
    import onnxruntime as ort

    import onnxslim
    from onnxslim.graph.names import module_path

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("s1", torch.nn.Sequential(_NestedBlock()))
    example = torch.randn(2, 4, 8, 8)
    for mask in attach_masks(model, example):
        with torch.no_grad():
            mask.weight[::2] = 0.0
    model.eval()
    expected = ["s1.0.proj.0", "s1.0.deep.0.0", "s1.0.deep.0.2.0"]
    for dynamo in (True, False):
        path = tmp_path / f"masked_{dynamo}.onnx"
        export(model, example, path, dynamo=dynamo)
        slimmed, report = onnxslim.slim(str(path), str(tmp_path / f"slim_{dynamo}.onnx"))
        assert sorted(layer.module for layer in report.layers) == sorted(expected), dynamo
        assert report.deleted_masked_channels == report.masked_channels > 0
        assert sorted(module_path(n) for n in slimmed.graph.node if n.op_type == "Conv") == sorted(expected)
        outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": example.numpy()})[0]
                   for p in (path, tmp_path / f"slim_{dynamo}.onnx")]
        assert abs(outputs[0] - outputs[1]).max() < 1e-5


class _Stem16(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.stem(x), 1), 1))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_kept_masked_channels_name_the_mask_and_the_layer(tmp_path, dynamo):
    """slim's "kept ... masked channel(s)" lines named the dynamo export's tensors only (``of mul_2: kept to round
    'conv2d'``): now the mask's module and the layer as the table names it. Rounding to 8 keeps 3 of the stem's 11
    zero channels; the rest go, and onnxruntime computes the same before and after."""
    import onnxruntime as ort

    import onnxslim

    torch.manual_seed(0)
    model, example = _Stem16().eval(), torch.randn(2, 3, 8, 8)
    (mask,) = attach_masks(model, example)
    with torch.no_grad():
        mask.weight[5:] = 0.0
    path = tmp_path / "masked.onnx"
    export(model, example, path, dynamo=dynamo)
    _, report = onnxslim.slim(str(path), str(tmp_path / "slim.onnx"), round_to=8)
    changed = [(layer.module, layer.channels_before, layer.channels_after) for layer in report.layers
               if layer.channels_before != layer.channels_after]
    assert changed == [("stem.0", 16, 8)]
    (kept,) = report.kept
    assert kept.module == "stem.1.mask" and len(kept.channels) == 3 and set(kept.channels) <= set(range(5, 16))
    shown = ",".join(map(str, kept.channels))
    line = next(line for line in report.format_table().splitlines() if line.startswith("kept 3"))
    assert line.startswith(f"kept 3 masked channel(s) [{shown}] of stem.1.mask ({kept.tensor}): kept to round stem.0 (")
    feed = {"input": example.numpy()}
    before, after = (ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                     for name in ("masked.onnx", "slim.onnx"))
    assert abs(before - after).max() < 1e-5
