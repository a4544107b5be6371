"""A user's own network, named as ``package.module:factory`` in a recipe and on the CLI (issue #14 item 1)."""

from __future__ import annotations

import json
import textwrap

import onnx
import pytest
import torch
from click.testing import CliRunner

from onnxslim.cli import main
from onnxslim.errors import OnnxSlimError
from onnxslim.zoo import ModelSpec, get_model, load_factory

USER_NETS = '''
"""A small CNN as a user would write it: a residual block with a strided shortcut conv, a depthwise conv
followed by a squeeze-excitation gate, and two branches joined by a Concat."""

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(scale))))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = Block(w, 2 * w)
        self.dw = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False)
        self.dw_bn = nn.BatchNorm2d(2 * w)
        self.se = SqueezeExcite(2 * w)
        self.branch_a = nn.Sequential(nn.Conv2d(2 * w, w, 1), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * w * 16, num_classes)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        x = self.se(torch.relu(self.dw_bn(self.dw(x))))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 4), 1))


def build(num_classes: int = 10, width: int = 8) -> nn.Module:
    return TinyNet(num_classes, width)


def unannotated(num_classes=10):
    return TinyNet(num_classes)


def not_a_model() -> nn.Module:
    return 42
'''

RECIPE = '''
name = "user-net"
[model]
name = "{package}.nets:build"
params = {{ num_classes = 10, width = 8 }}
input_shape = [1, 28, 28]
[data]
dataset = "mnist"
train_samples = 1000
test_samples = 200
[method]
name = "l1_mask"
params = {{ lam = 0.05, proximal = true, mask_lr_scale = 20.0, epsilon = 0.0 }}
[training]
batch_size = 50
[training.dense]
epochs = 2
lr = 0.01
optimizer = "adam"
[training.sparse]
epochs = 2
lr = 0.01
optimizer = "adam"
schedule = "constant"
[training.finetune]
epochs = 1
lr = 0.01
optimizer = "adam"
[slim]
round_to = 1
[validate]
warmup = 2
repeat = 5
[targets]
max_abs_diff = 1e-4
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch, request):
    """A package on sys.path (as PYTHONPATH would put it), with a name unique to the test."""
    package = f"userpkg_{request.node.name.replace('[', '_').replace(']', '_').replace('-', '_')}"
    folder = tmp_path / "src" / package
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "nets.py").write_text(textwrap.dedent(USER_NETS))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return package


def test_factory_names_are_checked(user_package):
    assert isinstance(get_model(f"{user_package}.nets:build", {"width": 4}), torch.nn.Module)
    assert isinstance(get_model(f"{user_package}.nets:TinyNet", {"width": 4}), torch.nn.Module)
    for name, message in [
        (f"{user_package}.nets:unannotated", "annotated '-> torch.nn.Module'"),
        ("subprocess:run", "annotated '-> torch.nn.Module'"),  # a checkpoint may not name an arbitrary function
        (f"{user_package}.nets:missing", "has no attribute"),
        ("no_such_package_xyz.nets:build", "cannot import 'no_such_package_xyz'"),
        (f"{user_package}.nets:", "package.module:function"),
    ]:
        with pytest.raises(OnnxSlimError, match=message):
            load_factory(name)
    with pytest.raises(OnnxSlimError, match="returned int"):
        get_model(f"{user_package}.nets:not_a_model")
    with pytest.raises(OnnxSlimError, match="no parameter 'depth'"):
        get_model(f"{user_package}.nets:build", {"depth": 3})
    # a parameter of the wrong type makes the user's constructor raise: one line naming the model and params
    with pytest.raises(OnnxSlimError, match=r"could not be built with parameters \{'width': 'x'\}: TypeError"):
        get_model(f"{user_package}.nets:build", {"width": "x"})
    with pytest.raises(OnnxSlimError, match=r"'lenet5' could not be built .*'input_size': 'x'\}: TypeError"):
        get_model("lenet5", {"input_size": "x"})
    with pytest.raises(OnnxSlimError, match="input_shape"):
        ModelSpec(f"{user_package}.nets:build").input_shape()
    assert ModelSpec.from_dict(ModelSpec("x.y:z", {"a": 1}, (1, 28, 28)).to_dict()).sample_shape == (1, 28, 28)


def test_run_trains_exports_slims_and_reports_a_user_model(user_package, tmp_path):
    recipe = tmp_path / "user.toml"
    recipe.write_text(RECIPE.format(package=user_package))
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(recipe), "--out", str(out), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "REPORT.json").read_text())
    assert report["recipe"]["model"]["name"] == f"{user_package}.nets:build"
    assert report["max_abs_diff"] <= 1e-4
    assert report["accuracy_after"] == report["accuracy_masked"]  # slimming is exact
    assert 0 < report["deleted_masked_channels"] == report["masked_channels"]
    assert report["params_after"] < report["params_before"]
    # the layers are named by their PyTorch module paths
    assert {"stem.0", "layer1.conv1", "layer1.shortcut.0", "branch_a.0", "branch_b.0"} <= set(report["live_channels"])

    # ... and so are the slim report, REPORT.md (ONNX node beside) and inspect (issue #14 item 2)
    rows = (out / "slim_report.txt").read_text().split("\n\n")[0].splitlines()[2:]
    assert rows and all(row.split(" (")[0] in report["live_channels"] and " (node_" in row for row in rows)
    markdown = (out / "REPORT.md").read_text()
    assert "| layer1.shortcut.0 | node_" in markdown and "| branch_b.0 |" in markdown
    inspected = runner.invoke(main, ["inspect", str(out / "masked.onnx")])
    assert inspected.exit_code == 0 and "layer1.conv1 (" in inspected.output and "se.expand (" in inspected.output

    # export rebuilds the checkpoint through the recorded factory
    exported = runner.invoke(main, ["export", str(out / "masked.pt"), "-o", str(tmp_path / "again.onnx")])
    assert exported.exit_code == 0, exported.output
    first, again = onnx.load(str(out / "masked.onnx")), onnx.load(str(tmp_path / "again.onnx"))
    assert [n.op_type for n in first.graph.node] == [n.op_type for n in again.graph.node]
