"""Mask placement and coupling, found from the traced graph (no per-model tables)."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from onnxslim.errors import OnnxSlimError
from onnxslim.training.coupling import analyze_coupling, trace
from onnxslim.training.masks import (
    ChannelMask,
    MaskedSite,
    attach_masks,
    channel_masks,
    freeze_masks,
    masked_summary,
)
from onnxslim.zoo import get_model


def masked(name: str, params: dict, shape=(2, 3, 32, 32)):
    torch.manual_seed(0)
    model = get_model(name, params)
    example = torch.randn(*shape)
    return model, example, attach_masks(model, example)


def upstream_mask(node: fx.Node, modules: dict) -> ChannelMask:
    """The mask that last scaled ``node``'s channels, walking back through ReLU and additions."""
    while True:
        if node.op == "call_module" and isinstance(modules[node.target], ChannelMask):
            return modules[node.target]
        if node.op == "call_module" and isinstance(modules[node.target], (nn.ReLU, nn.ReLU6, nn.Identity, nn.MaxPool2d)):
            node = node.args[0]
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            node = node.args[0]
        else:
            raise AssertionError(f"no mask upstream of {node}")


def residual_adds(model: nn.Module, example: torch.Tensor):
    graph = trace(model, example).graph
    modules = dict(model.named_modules(remove_duplicate=False))
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    return adds, modules


@pytest.mark.parametrize("name,params", [
    ("resnet20", {"width": 0.25}),
    ("resnet18", {"width": 0.125, "input_size": 32}),
    ("resnet50", {"width": 0.125, "input_size": 32}),
    ("mobilenet_v2", {"width": 0.25, "input_size": 32}),
])
def test_both_inputs_of_every_residual_add_share_one_mask(name, params):
    model, example, masks = masked(name, params)
    adds, modules = residual_adds(model, example)
    assert adds
    for add in adds:
        left, right = (upstream_mask(arg, modules) for arg in add.args[:2])
        assert left is right, f"{add}: inputs masked by different masks"
    shared = [mask for mask in masks if len(mask.sites) > 1]
    assert shared, "residual stages should produce shared masks"


def test_resnet20_has_one_shared_mask_per_stage():
    _, _, masks = masked("resnet20", {"width": 0.25})
    # stem + three blocks' second conv in stage 1; projection + three second convs in stages 2 and 3
    assert sorted(len(m.sites) for m in masks if len(m.sites) > 1) == [4, 4, 4]


def test_depthwise_conv_shares_the_mask_of_its_input():
    model, _, _ = masked("mobilenet_v2", {"width": 0.25, "input_size": 32})
    block = model.features.block2.residual
    expand_mask = block.expand.bn.mask
    depthwise_mask = block.depthwise.bn.mask
    assert expand_mask is depthwise_mask
    kinds = {site.kind for site in expand_mask.sites}
    assert kinds == {"conv", "depthwise"}


def test_concatenation_does_not_couple():
    _, _, masks = masked("densenet", {"width": 0.5, "blocks": [2, 2]})
    assert all(len(mask.sites) == 1 for mask in masks)


def test_output_layer_and_gates_are_never_masked():
    model, _, masks = masked("mobilenet_v3_small", {"width": 0.25, "input_size": 32})
    masked_producers = {id(site.producer) for mask in masks for site in mask.sites}
    assert id(model.classifier.fc2) not in masked_producers  # output layer
    assert isinstance(model.classifier.fc1, MaskedSite)  # hidden Linear neurons are masked
    assert id(model.classifier.fc1.module) in masked_producers
    se = model.features.block4.residual.se
    assert id(se.fc2) not in masked_producers  # feeds the hard-sigmoid gate
    assert id(se.fc1.module) in masked_producers  # the squeeze layer is an ordinary hidden layer


def test_mask_goes_after_bn_before_activation():
    model, _, _ = masked("vgg16", {"width": 0.125})
    unit = model.features.block1
    assert list(unit._modules) == ["conv", "bn", "act"]
    assert isinstance(unit.bn, MaskedSite)
    assert isinstance(unit.bn.module, nn.BatchNorm2d)
    assert isinstance(unit.act, nn.ReLU)


def test_lenet_masks_follow_convs_without_bn():
    model, _, masks = masked("lenet5", {}, shape=(2, 1, 28, 28))
    assert [m.channels for m in masks] == [20, 50, 500]
    assert isinstance(model.features.conv1, MaskedSite)


def test_attach_twice_is_an_error():
    model, example, _ = masked("resnet20", {"width": 0.25})
    with pytest.raises(OnnxSlimError, match="already has channel masks"):
        attach_masks(model, example)


def test_residual_with_the_network_input_is_not_masked():
    class InputResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.head = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x)) + x))

    analysis = analyze_coupling(InputResidual(), torch.randn(1, 3, 8, 8))
    group = analysis.groups[analysis.group_of["conv"]]
    assert not group.maskable and "input" in group.reason


def test_frozen_masks_keep_their_values_while_training():
    model, example, masks = masked("resnet20", {"width": 0.25})
    with torch.no_grad():
        masks[0].weight[0] = 0.0
    freeze_masks(model)
    before = [m.weight.detach().clone() for m in masks]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=1e-3)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(example).square().mean().backward()
        optimizer.step()
    assert all(torch.equal(a, m.weight) for a, m in zip(before, masks))
    assert all(m.frozen for m in channel_masks(model))


def test_masked_summary_counts_lenet_by_hand():
    model, example, masks = masked("lenet5", {}, shape=(2, 1, 28, 28))
    with torch.no_grad():
        masks[0].weight[:15] = 0  # conv1 keeps 5
        masks[1].weight[:40] = 0  # conv2 keeps 10
        masks[2].weight[:450] = 0  # fc1 keeps 50
    summary = masked_summary(model, example)
    expected = (5 * 25 + 5) + (10 * 5 * 25 + 10) + (10 * 16 * 50 + 50) + (50 * 10 + 10)
    assert summary.params == 431_080
    assert summary.params_live == expected
    assert summary.zero_channels == 15 + 40 + 450
    conv2 = next(layer for layer in summary.layers if layer.name == "features.conv2")
    assert (conv2.in_live, conv2.out_live) == (5, 10)
    assert conv2.macs_live == 8 * 8 * 10 * 5 * 25
    assert "params: 431,080 -> " in summary.format_table()


def test_custom_module_handler_extends_the_tracer():
    """A module fx cannot trace (data-dependent branch) becomes one call once the table has a handler."""
    from onnxslim.training.coupling import default_handlers

    class ScaledRelu(nn.Module):  # maps 0 to 0 channel by channel, but branches on data
        def forward(self, x):
            return torch.relu(x) * 2 if x.sum() > 0 else torch.relu(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.act = ScaledRelu()
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.act(self.conv(x)))

    example = torch.randn(2, 3, 8, 8)
    with pytest.raises(OnnxSlimError, match="cannot trace"):
        analyze_coupling(Net(), example)
    handlers = default_handlers().with_modules({ScaledRelu: lambda state, node, module: state.first_layout(node)})
    analysis = analyze_coupling(Net(), example, handlers)
    assert analysis.groups[analysis.group_of["conv"]].maskable
    blocking = default_handlers().with_modules({ScaledRelu: lambda state, node, module: state.unknown(node, "gate")})
    blocked = analyze_coupling(Net(), example, blocking)
    group = blocked.groups[blocked.group_of["conv"]]
    assert not group.maskable and group.reason == "used by gate"


def test_an_example_the_model_rejects_is_one_line_then_the_right_one_slims(tmp_path, capfd):
    """attach_masks with an example of the wrong shape used to print ShapeProp's traceback and raise a
    RuntimeError with a page of fx node metadata: now one OnnxSlimError line with the model's own message and
    nothing on stderr. With the right example the masks slim away exactly (onnxruntime)."""
    import onnxruntime as ort

    import onnxslim
    from onnxslim.training.export import export

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    capfd.readouterr()
    with pytest.raises(OnnxSlimError) as info:
        attach_masks(model, torch.randn(2, 3, 28, 28))
    message = str(info.value)
    assert message.startswith("example_input (2, 3, 28, 28) does not run through Sequential: ") and "\n" not in message
    assert "expected input[2, 3, 28, 28] to have 1 channels" in message
    assert capfd.readouterr().err == ""
    assert channel_masks(model) == []  # nothing attached
    example = torch.randn(2, 1, 28, 28)
    (mask,) = attach_masks(model, example)
    with torch.no_grad():
        mask.weight[[1, 4, 6]] = 0.0
    model.eval()
    export(model, example, tmp_path / "masked.onnx", dynamo=False)
    _, report = onnxslim.slim(str(tmp_path / "masked.onnx"), str(tmp_path / "slim.onnx"))
    assert report.deleted_masked_channels == 3 and [(layer.channels_before, layer.channels_after)
                                                    for layer in report.layers][0] == (8, 5)
    feed = {"input": example.numpy()}
    before, after = (ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                     for name in ("masked.onnx", "slim.onnx"))
    assert abs(before - after).max() < 1e-5
