"""Reusable graph pieces for grouped convs, channel moves, layout transposes, group norms and shared
weights (issue #11 kinds 4-8), for hand-built tests and random-graph generators alike.

Each builder appends nodes to a :class:`graphs.GraphBuilder` and returns the name of the tensor it
produces; feature maps are NCHW unless the builder says otherwise. ``export_both`` exports a torch
module with the dynamo and the legacy exporter.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
from graphs import GraphBuilder


def grouped_conv(g: GraphBuilder, x: str, cin: int, cout: int, groups: int, k: int = 3) -> str:
    """A grouped conv (1 < groups < C: ResNeXt, AlexNet) or depthwise with multiplier (groups == cin)."""
    return g.conv(x, cin, cout, k=k, groups=groups)


def channel_shuffle(g: GraphBuilder, x: str, channels: int, groups: int, size: int) -> str:
    """ShuffleNet's ``Reshape[N, g, C/g, H, W] -> Transpose(0, 2, 1, 3, 4) -> Reshape[N, C, H, W]``."""
    y = g.op("Reshape", [x, g.const(np.array([0, groups, channels // groups, size, size], np.int64))])
    y = g.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    return g.op("Reshape", [y, g.const(np.array([0, channels, size, size], np.int64))])


def depth_to_space(g: GraphBuilder, x: str, blocksize: int, mode: str = "DCR") -> str:
    return g.op("DepthToSpace", [x], blocksize=blocksize, mode=mode)


def space_to_depth(g: GraphBuilder, x: str, blocksize: int) -> str:
    return g.op("SpaceToDepth", [x], blocksize=blocksize)


def group_norm(g: GraphBuilder, x: str, channels: int, groups: int) -> str:
    """GroupNormalization; its scale and bias are per group at opset 18, per channel from opset 21."""
    per = groups if g.opset < 21 else channels
    scale = g.rng.uniform(0.5, 1.5, per).astype(np.float32)
    bias = g.rng.uniform(-0.5, 0.5, per).astype(np.float32)
    return g.op("GroupNormalization", [x, g.const(scale), g.const(bias)], num_groups=groups, epsilon=1e-5)


def group_norm_decomposed(g: GraphBuilder, x: str, channels: int, groups: int) -> str:
    """The exporters' spelling: Reshape[N, G, -1] -> InstanceNormalization -> Reshape back -> Mul -> Add."""
    y = g.op("Reshape", [x, g.const(np.array([0, groups, -1], np.int64))])
    y = g.op("InstanceNormalization", [y, g.const(np.ones(groups, np.float32)), g.const(np.zeros(groups, np.float32))],
             epsilon=1e-5)
    y = g.op("Reshape", [y, g.op("Shape", [x])])
    gamma = g.rng.uniform(0.5, 1.5, (channels, 1, 1)).astype(np.float32)
    beta = g.rng.uniform(-0.5, 0.5, (channels, 1, 1)).astype(np.float32)
    return g.op("Add", [g.op("Mul", [y, g.const(gamma)]), g.const(beta)])


def export_both(module, example) -> dict[str, onnx.ModelProto]:
    """``module`` exported by torch's dynamo and legacy (opset 17) exporters."""
    import torch

    module.eval()
    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models["dynamo"] = torch.onnx.export(module, example, dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(module, example, buffer, dynamo=False, opset_version=17)
        models["legacy"] = onnx.load_from_string(buffer.getvalue())
    return models


def slim_exact(model: onnx.ModelProto, **options):
    """``slim`` whose result matches ``model`` under onnxruntime and is not larger."""
    from graphs import assert_equivalent

    from onnxslim.graph.slim import slim

    slimmed, report = slim(model, **options)
    assert_equivalent(model, slimmed)
    assert report.params_after <= report.params_before and report.size_after <= report.size_before
    return slimmed, report


def conv_outputs(model: onnx.ModelProto) -> list[int]:
    """Output channels of every Conv, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    return [int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv"]


def nhwc_conv_net(g: GraphBuilder, size: int, zeros1, zeros2, zeros3, flatten: str = "Flatten") -> str:
    """tf2onnx style: an NHWC input [1, size, size, 3] -> Transpose -> conv(8) -> mask ``zeros1`` (NCHW)
    -> Transpose to NHWC -> Relu -> mask ``zeros2`` ([C] on the last axis) -> Transpose -> conv(6) ->
    Transpose to NHWC -> mask ``zeros3`` -> Flatten (or Reshape) -> MatMul(5) -> Add. Returns the output."""
    x = g.input([1, size, size, 3])
    y = g.mask(g.conv(g.op("Transpose", [x], perm=[0, 3, 1, 2]), 3, 8), 8, zeros=zeros1)
    y = g.op("Relu", [g.op("Transpose", [y], perm=[0, 2, 3, 1])])
    y = g.op("Mul", [y, g.const(g.mask_values(8, zeros2))])
    y = g.conv(g.op("Transpose", [y], perm=[0, 3, 1, 2]), 8, 6)
    y = g.op("Transpose", [y], perm=[0, 2, 3, 1])
    y = g.op("Relu", [g.op("Mul", [y, g.const(g.mask_values(6, zeros3))])])
    if flatten == "Flatten":
        y = g.op("Flatten", [y], axis=1)
    else:
        y = g.op("Reshape", [y, g.const(np.array([-1, size * size * 6], np.int64))])
    y = g.op("MatMul", [y, g.const(g.weights(size * size * 6, 5))])
    return g.op("Add", [y, g.const(g.weights(5, scale=0.1))])


def shared_head_levels(g: GraphBuilder, levels: int = 3, zeros=(), channels: int = 8) -> list[str]:
    """FPN levels (8x8, 4x4, 2x2 ...) from a stem, each run through one shared head: conv 3x3 -> BN ->
    mask ``zeros`` -> Relu -> conv 1x1 (4), every initializer of the head read by every level."""
    x = g.input([1, 3, 4 * 2 ** levels, 4 * 2 ** levels])
    head_w = [g.const(g.weights(channels, channels, 3, 3)), g.const(g.weights(channels, scale=0.1))]
    bn = [g.const(v) for v in (g.rng.uniform(0.5, 1.5, channels).astype(np.float32),
                               g.rng.uniform(-0.5, 0.5, channels).astype(np.float32),
                               g.rng.uniform(-0.2, 0.2, channels).astype(np.float32),
                               g.rng.uniform(0.5, 1.5, channels).astype(np.float32))]
    mask = g.const(g.mask_values(channels, zeros).reshape(1, channels, 1, 1))
    out_w = [g.const(g.weights(4, channels, 1, 1)), g.const(g.weights(4, scale=0.1))]
    level, outputs = g.op("Relu", [g.conv(x, 3, channels, stride=2)]), []
    for index in range(levels):
        if index:
            level = g.op("Relu", [g.conv(level, channels, channels, stride=2)])
        y = g.op("Conv", [level, *head_w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        y = g.op("Relu", [g.op("Mul", [g.op("BatchNormalization", [y, *bn]), mask])])
        outputs.append(g.op("Conv", [y, *out_w], kernel_shape=[1, 1]))
    return outputs
