"""Dynamic batch and unknown dims (issue #11, kind 9).

torch's default exporter writes ``flatten`` / ``view(N, -1)`` as ``Reshape(x, [-1, C*H*W])``, the legacy one
as ``Flatten`` or ``Shape -> Gather -> Concat``; with a dynamic batch every form must pass channels, and a
residual branch scaled by a zero (GAL) must go without ``--input-shape``. Inputs declared with ``-1``
(Paddle2ONNX) or symbolic dims are accepted by ``--input-shape``; when channels stay only because a dim is
unknown, the kept reason names ``--input-shape``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from graphs import GraphBuilder, assert_equivalent
from torch import nn

from onnxslim.cli import main as cli
from onnxslim.graph.slim import slim
from onnxslim.training.export import export
from onnxslim.training.masks import attach_masks
from onnxslim.zoo import get_model

EXPORTERS = pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])


def _batch_feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    shape = [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {model.graph.input[0].name: np.random.default_rng(batch).standard_normal(shape).astype(np.float32)}


@EXPORTERS
def test_masked_lenet_with_dynamic_batch_loses_every_masked_channel(dynamo, tmp_path):
    """The demo's model: the zoo LeNet-5 with masks, a third of each mask zero, dynamic batch."""
    torch.manual_seed(0)
    model = get_model("lenet5")
    masks = attach_masks(model, torch.randn(2, 1, 28, 28))
    with torch.no_grad():
        for mask in masks:
            mask.weight[::3] = 0
    zeroed = sum(int((mask.weight == 0).sum()) for mask in masks)
    path = tmp_path / "masked.onnx"
    export(model, torch.randn(2, 1, 28, 28), path, dynamo=dynamo, dynamic_batch=True)
    masked = onnx.load(str(path))
    assert masked.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch is symbolic
    slimmed, report = slim(masked)
    assert (report.masked_channels, report.deleted_masked_channels) == (zeroed, zeroed), report.format_table()
    for batch in (1, 3):
        assert_equivalent(masked, slimmed, feeds=_batch_feeds(masked, batch))


class ViewNet(nn.Module):
    """``x.view(x.size(0), -1)`` (Shape -> Gather -> Concat in the legacy export) after two residual
    blocks with a mask inside each branch (channels 1 and 5 zero); the second block's branch is scaled by
    0 (a GAL block mask) and must vanish. A mask on the stem zeroes channel 2 of the trunk."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.inner = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.outer = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.register_buffer("scale", torch.tensor([1.0, 0.0]))
        self.register_buffer("mask", (torch.arange(8) % 4 != 1).float().view(1, 8, 1, 1))
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        for scale, inner, outer in zip(self.scale, self.inner, self.outer):
            y = torch.relu(y + scale * outer(torch.relu(inner(y)) * self.mask))
        y = nn.functional.max_pool2d(y, 2)
        return self.fc(y.view(y.size(0), -1))


@EXPORTERS
def test_view_flatten_and_zero_residual_branch_with_dynamic_batch(dynamo, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "view.onnx"
    export(ViewNet(), torch.randn(2, 1, 12, 12), path, dynamo=dynamo, dynamic_batch=True)
    masked = onnx.load(str(path))
    slimmed, report = slim(masked)
    assert report.deleted_masked_channels == report.masked_channels == 4, report.format_table()
    convs = [n for n in slimmed.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3  # the stem and the live branch; the zero branch went
    for batch in (1, 3):
        assert_equivalent(masked, slimmed, feeds=_batch_feeds(masked, batch))


def _flatten_graph(dims, reshape: bool) -> onnx.ModelProto:
    """Conv -> mask (channels 1, 4 zero) -> Relu -> Flatten or Reshape([-1, C*H*W]) -> Gemm."""
    g = GraphBuilder(opset=13, seed=5)
    x = g.input(dims)
    y = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=(1, 4))])
    if reshape:
        y = g.op("Reshape", [y, g.const(np.array([-1, 6 * 8 * 8], np.int64))])
    else:
        y = g.op("Flatten", [y], axis=1)
    g.output(g.gemm(y, 6 * 8 * 8, 4), shape=[dims[0] if isinstance(dims[0], str) else None, 4])
    return g.model()


@pytest.mark.parametrize("reshape", [True, False], ids=["reshape", "flatten"])
def test_paddle_style_minus_one_batch(reshape):
    """Paddle2ONNX declares a dynamic dim as -1; it is read as unknown, and --input-shape accepts it."""
    model = _flatten_graph([1, 3, 8, 8], reshape)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    onnx.checker.check_model(model, full_check=True)
    for shapes in (None, {"x": [2, 3, 8, 8]}):
        slimmed, report = slim(model, input_shapes=shapes)
        assert report.deleted_masked_channels == report.masked_channels == 2, report.format_table()
        assert_equivalent(model, slimmed, feeds=_batch_feeds(_flatten_graph([1, 3, 8, 8], reshape), 3))


def test_unknown_spatial_dims_name_input_shape(tmp_path):
    """With symbolic H and W the Flatten cannot map channels: the reason says to give --input-shape, and
    with it every masked channel goes (through the CLI as a user runs it)."""
    model = _flatten_graph(["N", 3, "H", "W"], reshape=False)
    _, report = slim(model)
    assert report.deleted_masked_channels == 0 and report.masked_channels == 2
    assert all("--input-shape" in kept.reason for kept in report.kept), report.format_table()
    path, out = tmp_path / "m.onnx", tmp_path / "s.onnx"
    onnx.save(model, str(path))
    result = CliRunner().invoke(cli, ["slim", str(path), "-o", str(out)])
    assert result.exit_code == 0 and "give --input-shape" in result.output, result.output
    result = CliRunner().invoke(cli, ["slim", str(path), "-o", str(out), "--input-shape", "x:2,3,8,8", "--round-to", "1"])
    assert result.exit_code == 0 and "masked channels deleted: 2 / 2" in result.output, result.output
    assert_equivalent(model, onnx.load(str(out)), feeds=_batch_feeds(_flatten_graph([1, 3, 8, 8], False), 2))
