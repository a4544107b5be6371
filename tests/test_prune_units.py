"""``prune`` on multi-output nodes and coupled units (issue #11 kinds 2, 12).

Third-party-style graphs: a Split whose second output is pruned, torch YOLOv8-style C2f blocks and
ShuffleNetV2 units (both exporters), grouped and depthwise-multiplier convs, ``x1 * x2`` gates, a barrier
(LRN) holding a layer, branches of different cost. The masked reference and the slimmed model are compared
with onnxruntime; budgets are checked per layer.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import GraphBuilder, assert_equivalent

from onnxslim.cli import main
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.prune import prune


def removed_per_layer(report) -> dict[str, tuple[int, int]]:
    return {layer.node: (layer.channels_before, layer.channels_before - layer.channels_after) for layer in report.layers}


def assert_within_budget(report, ratio: float, unit: int = 1) -> None:
    """No layer loses more than the ratio (rounded to the nearest unit) of its channels (issue #11 kind 12
    asks for at most the ratio plus one unit)."""
    for node, (before, removed) in removed_per_layer(report).items():
        assert removed <= int(ratio * before) + unit // 2, (node, before, removed, report.format_table())


def prune_exact(model, **options):
    slimmed, report, masked = prune(model, **options)
    onnx.checker.check_model(masked, full_check=True)
    assert_equivalent(masked, slimmed)
    # every chosen channel goes, but one that would leave a tensor empty (kept, and said so)
    assert all(k.kind == "structural" for k in report.kept), report.format_table()
    return slimmed, report


# -- multi-output nodes ---------------------------------------------------------------------------

@pytest.mark.parametrize("placement", ["consumers", "after_bn"])
def test_mask_for_the_second_output_of_a_split_goes_after_the_split(placement):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    a, b = g.op("Split", [g.op("Relu", [g.conv(x, 3, 8)]), g.const(np.array([4, 4], np.int64))], outputs=2, axis=1)
    g.output(g.conv(g.op("Concat", [a, g.op("Relu", [g.conv(b, 4, 6)])], axis=1), 10, 4))
    _, report = prune_exact(g.model(), ratio=0.5, placement=placement)
    assert report.deleted_masked_channels > 0
    assert_within_budget(report, 0.5)


def _torch_blocks():
    import torch
    from torch import nn

    def cbs(cin, cout, k=1, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.SiLU())

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1, self.cv2 = cbs(c, c, 3), cbs(c, c, 3)

        def forward(self, x):
            return x + self.cv2(self.cv1(x))

    class C2f(nn.Module):
        """ultralytics' C2f: chunk in two, bottlenecks on the second half, concat every stage."""

        def __init__(self, c=8, n=2):
            super().__init__()
            self.cv1 = cbs(3, 2 * c, 3)
            self.m = nn.ModuleList(Bottleneck(c) for _ in range(n))
            self.cv2 = cbs((2 + n) * c, 8)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            y.extend(m(y[-1]) for m in self.m)
            return self.head(self.cv2(torch.cat(y, 1)))

    class ShuffleUnit(nn.Module):
        """ShuffleNetV2's stride-1 unit: split, branch on one half, concat, channel shuffle."""

        def __init__(self, c=16):
            super().__init__()
            b = c // 2
            self.stem = cbs(3, c, 3)
            self.branch = nn.Sequential(cbs(b, b), nn.Conv2d(b, b, 3, padding=1, groups=b, bias=False),
                                        nn.BatchNorm2d(b), cbs(b, b))
            self.head = nn.Conv2d(c, 4, 1)

        def forward(self, x):
            x1, x2 = self.stem(x).chunk(2, dim=1)
            out = torch.cat((x1, self.branch(x2)), 1)
            n, c, h, w = out.shape
            return self.head(out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w))

    return {"c2f": C2f, "shufflenetv2": ShuffleUnit}


def export(module, dynamo: bool) -> onnx.ModelProto:
    import torch

    module.eval()
    example = (torch.randn(1, 3, 8, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(module, example, dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(module, example, buffer, dynamo=False, opset_version=17)
        return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
# (dynamo, legacy): the legacy export computes its shuffle's Reshape targets from Shape; normalisation folds
# them (fold_static_dims), so both exports lose the same channels; the shuffle is one Gather (a channel
# permutation), so each channel is its own unit
@pytest.mark.parametrize("name, deleted", [("c2f", (24, 24)), ("shufflenetv2", (20, 20))])
def test_prune_torch_blocks_with_split_outputs(name, deleted, dynamo, tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    onnx.save(export(_torch_blocks()[name](), dynamo), path)
    out, masked = tmp_path / "pruned.onnx", tmp_path / "masked.onnx"
    result = CliRunner().invoke(main, ["prune", str(path), "-o", str(out), "--save-masked", str(masked)])
    assert result.exit_code == 0, result.output
    reference = onnx.load(masked)
    onnx.checker.check_model(reference, full_check=True)
    assert_equivalent(reference, onnx.load(out))
    _, report = prune_exact(onnx.load(path), ratio=0.5)
    assert report.deleted_masked_channels == deleted[0 if dynamo else 1], report.format_table()
    assert_within_budget(report, 0.5)


def test_a_failed_prune_leaves_no_output_files(tmp_path, monkeypatch):
    from onnxslim.graph import prune as prune_module

    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 4))
    path = tmp_path / "model.onnx"
    onnx.save(g.model(), path)

    def broken(*args, **kwargs):
        raise OnnxSlimError("internal error: simulated")

    monkeypatch.setattr(prune_module, "slim", broken)
    result = CliRunner().invoke(main, ["prune", str(path), "-o", str(tmp_path / "p.onnx"),
                                       "--save-masked", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# -- budgets over coupled units ---------------------------------------------------------------------

@pytest.mark.parametrize("groups, cout, ratio, kept", [
    (2, 8, 0.25, [6, 6]), (2, 8, 0.5, [4, 4]), (2, 8, 0.75, [2, 2]),  # groups of 4: one channel per group
    (4, 8, 0.25, [8, 8]), (4, 8, 0.5, [4, 4]), (4, 8, 0.75, [4, 4]),  # groups of 2: at most 1 each
    (4, 4, 0.25, [3, 6]), (4, 4, 0.5, [2, 4]), (4, 4, 0.75, [1, 2]),  # depthwise, multiplier 2: whole groups
], ids=lambda v: str(v).replace(" ", ""))
def test_grouped_and_depthwise_units_stay_within_budget(groups, cout, ratio, kept):
    """A grouped conv's groups stay equal: a channel goes with one channel of every other group (or, one
    input per group, with its whole group), and such a bundle counts against every layer it touches."""
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, cout)])
    y = g.op("Relu", [g.conv(y, cout, 8, groups=groups)])
    g.output(g.conv(y, 8, 4))
    _, report = prune_exact(g.model(), ratio=ratio)
    assert [layer.channels_after for layer in report.layers] == kept + [4]
    assert_within_budget(report, ratio, unit=max(groups, 8 // groups))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gates_and_residuals_share_one_budget(scope):
    """``x1 * x2`` couples two convs and a residual couples three: a class chosen for one layer counts
    against the others, so no layer goes past the ratio."""
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    a, b = g.op("Relu", [g.conv(x, 3, 8)]), g.op("Sigmoid", [g.conv(x, 3, 8)])
    gated = g.op("Mul", [a, b])
    y = g.op("Add", [gated, g.conv(g.op("Relu", [g.conv(gated, 8, 8)]), 8, 8)])
    g.output(g.conv(g.op("Relu", [y]), 8, 4))
    _, report = prune_exact(g.model(), ratio=0.5, scope=scope)
    if scope == "layer":
        assert_within_budget(report, 0.5)
    assert report.deleted_masked_channels > 0


def _two_branches(g: GraphBuilder):
    """Branch A: 1x1 convs at 16x16 (cheap in params, dear in MACs); branch B: a 5x5 conv at 2x2 (dear in
    params, cheap in MACs). Every filter of a layer has the same L1 norm, so only the cost tells the
    channels apart."""
    x = g.input([1, 3, 16, 16])
    small = g.op("MaxPool", [x], kernel_shape=[8, 8], strides=[8, 8])
    outputs = []
    for source, k in ((x, 1), (small, 5)):
        y = g.op("Relu", [g.conv(source, 3, 8, k=k)])
        weight = next(t for t in g.initializers if t.name == g.nodes[-2].input[1])
        values = onnx.numpy_helper.to_array(weight)
        values = values / np.abs(values).sum(axis=(1, 2, 3), keepdims=True)
        weight.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), weight.name))
        outputs.append(g.op("GlobalAveragePool", [g.conv(y, 8, 4, k=1)]))
    g.output(*outputs)


@pytest.mark.parametrize("cost, pruned_branch", [("macs", 0), ("params", 1)])
def test_global_scope_ranks_by_importance_per_unit_of_cost(cost, pruned_branch):
    g = GraphBuilder()
    _two_branches(g)
    _, report = prune_exact(g.model(), ratio=0.2, scope="global", cost=cost)
    first_a, _, first_b, _ = removed_per_layer(report).values()
    removed = (first_a[1], first_b[1])
    assert removed[pruned_branch] > 0 and removed[1 - pruned_branch] == 0, report.format_table()
    if cost == "macs":
        assert 0.15 <= 1 - report.macs_after / report.macs_before <= 0.35


def test_a_barrier_that_keeps_a_layer_out_of_reach_is_noted(tmp_path):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("LRN", [g.op("Relu", [g.conv(x, 3, 8)])], size=3)
    g.output(g.conv(g.op("Relu", [g.conv(y, 8, 8)]), 8, 4))
    _, report = prune_exact(g.model(), ratio=0.5)
    assert len(report.notes) == 1 and "LRN" in report.notes[0] and "8 of 8 channels" in report.notes[0]
    path = tmp_path / "lrn.onnx"
    onnx.save(g.model(), path)
    result = CliRunner().invoke(main, ["prune", str(path), "-o", str(tmp_path / "p.onnx")])
    assert result.exit_code == 0 and "note: " in result.output and "LRN" in result.output


def test_a_barrier_that_writes_only_graph_outputs_is_not_noted():
    """keras2onnx's MNIST MLP ends ``fc3 -> Softmax(classes) -> output``: the classes are out of reach by
    definition, like a layer writing a graph output (before: "'fc3': 10 of 10 channels are out of reach
    (barrier Softmax ...)"). The same Softmax in the middle of the net, before a conv, is still noted."""
    for softmax_last in (True, False):
        g = GraphBuilder()
        y = g.op("Relu", [g.conv(g.input([1, 3, 8, 8]), 3, 8)])
        y = g.op("Softmax", [g.conv(y, 8, 8)], axis=1)
        g.output(y if softmax_last else g.conv(y, 8, 4))
        _, report = prune_exact(g.model(), ratio=0.5)
        noted = [note for note in report.notes if "Softmax" in note]
        assert len(noted) == (0 if softmax_last else 1), report.notes


def test_bn_criterion_without_batchnorm_says_so(tmp_path):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 4))
    with pytest.raises(OnnxSlimError, match="--criterion bn needs BatchNormalization"):
        prune(g.model(), criterion="bn")
    path = tmp_path / "nobn.onnx"
    onnx.save(g.model(), path)
    result = CliRunner().invoke(main, ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--criterion", "bn"])
    assert result.exit_code == 2 and "error: --criterion bn needs BatchNormalization" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nobn.onnx"]

    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.bn(g.conv(x, 3, 8), 8)])
    g.output(g.conv(g.op("Relu", [g.conv(y, 8, 8)]), 8, 4))
    _, report = prune_exact(g.model(), criterion="bn")
    assert any("1 of 3 layers have no BatchNormalization" in n or "2 of 3 layers" in n for n in report.notes)


@pytest.mark.parametrize("target", [{"ratio": 0.5}, {"target_macs": 0.5}])
def test_file_size_before_is_the_inputs(tmp_path, target):
    """The report's size_before is the input file's bytes, not the masked reference's (which adds masks)."""
    from onnxslim.graph.allocate import prune_to_target

    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(g.op("Relu", [g.conv(x, 3, 16)]), 16, 16)]), 16, 4))
    path = tmp_path / "model.onnx"
    onnx.save(g.model(), path)
    if "ratio" in target:
        _, report, masked = prune(path, **target)
    else:
        _, report, masked, _ = prune_to_target(path, "macs", target["target_macs"])
    assert report.deleted_masked_channels > 0
    assert report.size_before == path.stat().st_size < masked.ByteSize()


@pytest.mark.parametrize("round_to", [1, 8])
def test_global_scope_keeps_the_groups_of_a_grouped_conv_equal(round_to):
    """conv 3 -> 24 -> conv 1x1 24 -> 24 -> grouped conv 24 -> 40 (8 groups of 3 inputs) -> pool -> Gemm.
    --scope global chose the 1x1 conv's channels one by one, unevenly over the grouped conv's groups, so
    slim gave most of them back (groups stay equal): at round-to 8 nothing was removed (0 % of the MACs)
    while the notes said 47.9 %. Now a class there goes in a bundle with one class of every other group (as
    --scope layer does): the MACs removed are what the estimate says, within a few points."""
    g = GraphBuilder(seed=0)
    a = g.op("Relu", [g.bn(g.conv(g.input([1, 3, 12, 12]), 3, 24), 24)])
    c = g.op("Relu", [g.bn(g.conv(a, 24, 24, k=1), 24)])
    d = g.op("Relu", [g.bn(g.conv(c, 24, 40, groups=8), 40)])
    g.output(g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [d])]), 40, 10))
    model = g.model()
    pruned, report, masked = prune(model, ratio=0.5, scope="global", round_to=round_to)
    assert_equivalent(masked, pruned)
    removed = 1 - report.macs_after / report.macs_before
    assert 0.42 <= removed <= 0.58, (removed, report.notes)
    if round_to > 1:  # the note states what the rounded choice removes
        (note,) = [n for n in report.notes if n.startswith("--scope global with rounding")]
        assert abs(float(note.split(" remove ")[1].split("%")[0]) / 100 - removed) < 0.02, (note, removed)
