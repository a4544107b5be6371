"""Graphs in the style of third-party exports: old opsets, IR 3, unfused BN, Sum, Constant-node
weights, decomposed HardSwish, SE blocks, depthwise convs, ConvTranspose, Concat-heavy nets, LRN and
channel-shuffle barriers. Built with onnx.helper so that they do not depend on our exporter."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import GraphBuilder
from onnx import helper


def to_ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    """IR 3 convention: every initializer is also listed as a graph input."""
    listed = {i.name for i in model.graph.input}
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer if t.name not in listed)
    model.ir_version = 3
    return model


def weights_as_constant_nodes(model: onnx.ModelProto, every: int = 2) -> onnx.ModelProto:
    """Move every ``every``-th initializer into a ``Constant`` node (old exporters did this)."""
    graph = model.graph
    moved = [t for position, t in enumerate(graph.initializer) if position % every == 0]
    names = {t.name for t in moved}
    constants = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}") for t in moved]
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def _conv_bn_relu(g: GraphBuilder, x, cin, cout, k=3, stride=1, groups=1, act="Relu", bn=True):
    y = g.conv(x, cin, cout, k=k, stride=stride, groups=groups, bias=not bn)
    if bn:
        y = g.bn(y, cout)
    if act == "Relu":
        y = g.op("Relu", [y])
    elif act == "Relu6":  # opset < 11: Clip bounds are attributes
        y = g.op("Clip", [y], min=0.0, max=6.0)
    elif act == "HardSwishDecomposed":
        y = hardswish_decomposed(g, y)
    return y


def hardswish_decomposed(g: GraphBuilder, y):
    """x * clip(x + 3, 0, 6) / 6 as Add / Clip / Div / Mul (opset 11 Clip with bound inputs)."""
    shifted = g.op("Add", [y, g.const(np.float32(3.0))])
    clipped = g.op("Clip", [shifted, g.const(np.float32(0.0)), g.const(np.float32(6.0))])
    return g.op("Div", [g.op("Mul", [y, clipped]), g.const(np.float32(6.0))])


def hardsigmoid_decomposed(g: GraphBuilder, y):
    clipped = g.op("Clip", [g.op("Add", [y, g.const(np.float32(3.0))]), g.const(np.float32(0.0)), g.const(np.float32(6.0))])
    return g.op("Mul", [clipped, g.const(np.float32(1.0 / 6.0))])


def resnet_v1_ir3() -> onnx.ModelProto:
    """ResNet-v1 style, opset 7, IR 3, unfused BN, residual Sum, Flatten -> Gemm."""
    g = GraphBuilder(opset=7, seed=1)
    x = g.input([1, 3, 32, 32])
    y = _conv_bn_relu(g, x, 3, 8)
    cin = 8
    for width, stride in ((8, 1), (8, 1), (16, 2), (16, 1), (32, 2)):
        branch = g.bn(g.conv(_conv_bn_relu(g, y, cin, width, stride=stride), width, width, bias=False), width)
        shortcut = y if (stride == 1 and cin == width) else g.bn(g.conv(y, cin, width, k=1, pad=0, stride=stride, bias=False), width)
        y = g.op("Relu", [g.op("Sum", [branch, shortcut])])
        cin = width
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    g.output(g.gemm(y, cin, 10))
    return g.model()


def mobilenet_v2_opset9() -> onnx.ModelProto:
    """MobileNetV2 style: Clip-attribute ReLU6, depthwise, inverted residual Add, computed Reshape target,
    weights partly as Constant nodes."""
    g = GraphBuilder(opset=9, seed=2)
    x = g.input([1, 3, 32, 32])
    y = _conv_bn_relu(g, x, 3, 8, stride=2, act="Relu6")
    cin = 8
    for cout, expand, stride in ((8, 4, 1), (12, 4, 2), (12, 6, 1), (16, 6, 2)):
        hidden = cin * expand
        h = _conv_bn_relu(g, y, cin, hidden, k=1, act="Relu6")
        h = _conv_bn_relu(g, h, hidden, hidden, stride=stride, groups=hidden, act="Relu6")
        h = g.bn(g.conv(h, hidden, cout, k=1, pad=0, bias=False), cout)
        y = g.op("Add", [y, h]) if (stride == 1 and cin == cout) else h
        cin = cout
    y = g.op("GlobalAveragePool", [_conv_bn_relu(g, y, cin, 32, k=1, act="Relu6")])
    batch = g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", [y]), g.const(np.int64(0))], axis=0)], axes=[0])
    target = g.op("Concat", [batch, g.const(np.array([-1], np.int64))], axis=0)
    g.output(g.gemm(g.op("Reshape", [y, target]), 32, 10), shape=[1, 10])
    return g.model()


def squeezenet_opset9() -> onnx.ModelProto:
    """SqueezeNet style: fire modules (Concat of 1x1 and 3x3 expands), no BN, Dropout, Softmax output."""
    g = GraphBuilder(opset=9, seed=3)
    x = g.input([1, 3, 32, 32])
    y = g.op("MaxPool", [_conv_bn_relu(g, x, 3, 16, bn=False)], kernel_shape=[3, 3], strides=[2, 2])
    cin = 16
    for squeeze, expand in ((4, 8), (4, 8), (8, 16)):
        s = _conv_bn_relu(g, y, cin, squeeze, k=1, bn=False)
        y = g.op("Concat", [_conv_bn_relu(g, s, squeeze, expand, k=1, bn=False),
                            _conv_bn_relu(g, s, squeeze, expand, bn=False)], axis=1)
        cin = 2 * expand
    y = g.op("Dropout", [y], ratio=0.5)
    y = g.op("GlobalAveragePool", [_conv_bn_relu(g, y, cin, 10, k=1, bn=False)])
    g.output(g.op("Softmax", [g.op("Flatten", [y], axis=1)], axis=1))
    return g.model()


def densenet_opset9() -> onnx.ModelProto:
    """DenseNet style: pre-activation BN-ReLU-Conv, Concat-heavy blocks, transition with AveragePool."""
    g = GraphBuilder(opset=9, seed=4)
    x = g.input([1, 3, 16, 16])
    y, c = g.conv(x, 3, 8, bias=False), 8
    for block in range(2):
        features = [y]
        for _ in range(3):
            inner = g.op("Concat", features, axis=1) if len(features) > 1 else features[0]
            h = g.conv(g.op("Relu", [g.bn(inner, c)]), c, 8, k=1, pad=0, bias=False)
            h = g.conv(g.op("Relu", [g.bn(h, 8)]), 8, 4, bias=False)
            features.append(h)
            c += 4
        y = g.op("Concat", features, axis=1)
        if block == 0:
            y = g.op("AveragePool", [g.conv(g.op("Relu", [g.bn(y, c)]), c, c // 2, k=1, pad=0, bias=False)],
                     kernel_shape=[2, 2], strides=[2, 2])
            c //= 2
    y = g.op("Flatten", [g.op("GlobalAveragePool", [g.op("Relu", [g.bn(y, c)])])], axis=1)
    g.output(g.gemm(y, c, 10))
    return g.model()


def googlenet_opset9() -> onnx.ModelProto:
    """GoogLeNet style: LRN after the stem (a barrier), Inception modules with unfused BN and a pool branch."""
    g = GraphBuilder(opset=9, seed=5)
    x = g.input([1, 3, 32, 32])
    y = g.op("MaxPool", [_conv_bn_relu(g, x, 3, 16)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    y = g.op("LRN", [y], size=5, alpha=1e-4, beta=0.75, bias=1.0)
    cin = 16
    for b1, b2r, b2, b3r, b3, b4 in ((8, 6, 8, 2, 4, 4), (12, 8, 12, 4, 6, 6)):
        branch1 = _conv_bn_relu(g, y, cin, b1, k=1)
        branch2 = _conv_bn_relu(g, _conv_bn_relu(g, y, cin, b2r, k=1), b2r, b2)
        branch3 = _conv_bn_relu(g, _conv_bn_relu(g, y, cin, b3r, k=1), b3r, b3, k=5)
        branch4 = _conv_bn_relu(g, g.op("MaxPool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), cin, b4, k=1)
        y = g.op("Concat", [branch1, branch2, branch3, branch4], axis=1)
        cin = b1 + b2 + b3 + b4
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    g.output(g.gemm(y, cin, 10))
    return g.model()


def mobilenet_v3_opset11() -> onnx.ModelProto:
    """MobileNetV3 style: decomposed HardSwish and HardSigmoid, SE gating, depthwise, Constant-node weights."""
    g = GraphBuilder(opset=11, seed=6)
    x = g.input([1, 3, 32, 32])
    y = _conv_bn_relu(g, x, 3, 8, stride=2, act="HardSwishDecomposed")
    cin = 8
    for cout, hidden, stride, se in ((8, 16, 1, True), (12, 24, 2, False), (12, 36, 1, True)):
        h = _conv_bn_relu(g, y, cin, hidden, k=1, act="HardSwishDecomposed")
        h = _conv_bn_relu(g, h, hidden, hidden, stride=stride, groups=hidden, act="HardSwishDecomposed")
        if se:
            s = g.op("Relu", [g.conv(g.op("GlobalAveragePool", [h]), hidden, hidden // 4, k=1, pad=0)])
            h = g.op("Mul", [h, hardsigmoid_decomposed(g, g.conv(s, hidden // 4, hidden, k=1, pad=0))])
        h = g.bn(g.conv(h, hidden, cout, k=1, pad=0, bias=False), cout)
        y = g.op("Add", [y, h]) if (stride == 1 and cin == cout) else h
        cin = cout
    y = g.op("Flatten", [g.op("GlobalAveragePool", [_conv_bn_relu(g, y, cin, 24, k=1, act="HardSwishDecomposed")])], axis=1)
    g.output(g.gemm(y, 24, 10))
    return g.model()


def fcn_opset9() -> onnx.ModelProto:
    """A small FCN/UNet: BN encoder, ConvTranspose and Upsample decoders, skip Concat."""
    g = GraphBuilder(opset=9, seed=7)
    x = g.input([1, 3, 16, 16])
    e1 = _conv_bn_relu(g, x, 3, 8)
    e2 = _conv_bn_relu(g, g.op("MaxPool", [e1], kernel_shape=[2, 2], strides=[2, 2]), 8, 16)
    b = _conv_bn_relu(g, g.op("MaxPool", [e2], kernel_shape=[2, 2], strides=[2, 2]), 16, 32)
    up2 = g.op("ConvTranspose", [b, g.const(g.weights(32, 16, 2, 2)), g.const(g.weights(16, scale=0.1))],
               kernel_shape=[2, 2], strides=[2, 2])
    d2 = _conv_bn_relu(g, g.op("Concat", [up2, e2], axis=1), 32, 16)
    up1 = g.op("Upsample", [d2, g.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    d1 = _conv_bn_relu(g, g.op("Concat", [up1, e1], axis=1), 24, 8)
    g.output(g.conv(d1, 8, 3, k=1, pad=0))
    return g.model()


def shufflenet_opset11() -> onnx.ModelProto:
    """ShuffleNet style: channel shuffle (Reshape/Transpose/Reshape of a batch of 1: a permutation of the
    channels, which slim turns into one Gather); Split on channels."""
    g = GraphBuilder(opset=11, seed=8)
    x = g.input([1, 3, 16, 16])
    y = _conv_bn_relu(g, x, 3, 16)
    for _ in range(2):
        left, right = g.op("Split", [y], outputs=2, axis=1, split=[8, 8])
        right = _conv_bn_relu(g, right, 8, 8, k=1)
        right = g.bn(g.conv(right, 8, 8, groups=8, bias=False), 8)
        right = _conv_bn_relu(g, right, 8, 8, k=1)
        y = g.op("Concat", [left, right], axis=1)
        y = g.op("Reshape", [y, g.const(np.array([1, 2, 8, 16, 16], np.int64))])
        y = g.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
        y = g.op("Reshape", [y, g.const(np.array([1, 16, 16, 16], np.int64))])
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    g.output(g.gemm(y, 16, 10))
    return g.model()


def _identity(model: onnx.ModelProto) -> onnx.ModelProto:
    return model


# name -> (graph builder, the exporter convention applied after masks are inserted)
THIRD_PARTY = {
    "resnet_v1_ir3": (resnet_v1_ir3, to_ir3),
    "mobilenet_v2_opset9": (mobilenet_v2_opset9, weights_as_constant_nodes),
    "squeezenet_opset9": (squeezenet_opset9, _identity),
    "densenet_opset9": (densenet_opset9, _identity),
    "googlenet_opset9": (googlenet_opset9, _identity),
    "mobilenet_v3_opset11": (mobilenet_v3_opset11, lambda m: weights_as_constant_nodes(m, every=3)),
    "fcn_opset9": (fcn_opset9, _identity),
    "shufflenet_opset11": (shufflenet_opset11, _identity),
}
