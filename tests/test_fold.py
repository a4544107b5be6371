"""Weights and scales computed from constants (issue #11, kind 3).

ONNX-zoo opset-9 graphs converted from Caffe2 (DenseNet-121, Inception-v2) apply BN's affine as
``Mul(x, Unsqueeze(gamma))`` / ``Add(x, Unsqueeze(beta))``; other old exports give weights as ``Constant``
nodes feeding ``Reshape`` or ``Unsqueeze``. Normalisation folds these constant subgraphs (onnxscript's
constant folder, onnx's reference ops of the model's opset) so that a zero ``gamma`` (and ``beta``) is seen
as a per-channel zero and its channels are deleted. Built here with onnx.helper, in IR 3 and IR 4.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, assert_equivalent
from onnx import helper
from thirdparty import to_ir3

from onnxslim.graph.slim import slim


def _affine(g: GraphBuilder, y: str, c: int, zeros=(), constant_node: bool = False) -> str:
    """Caffe2's SpatialBN after the opset-9 version converter: Mul/Add by Unsqueeze(axes=[1, 2]) of [C]."""
    gamma = g.rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = g.rng.uniform(-0.5, 0.5, c).astype(np.float32)
    gamma[list(zeros)] = 0  # BN-slimming: gamma and beta of a dead channel are both 0
    beta[list(zeros)] = 0
    if constant_node:
        scale = g.name("gamma")
        g.nodes.append(helper.make_node("Constant", [], [scale], value=onnx.numpy_helper.from_array(gamma)))
    else:
        scale = g.const(gamma, "gamma")
    y = g.op("Mul", [y, g.op("Unsqueeze", [scale], axes=[1, 2])])
    return g.op("Add", [y, g.op("Unsqueeze", [g.const(beta, "beta")], axes=[1, 2])])


def _conv(g: GraphBuilder, x: str, cin: int, cout: int, k: int = 3, zeros=(), reshaped: bool = False) -> str:
    """Conv (no bias) + affine + Relu; ``reshaped`` gives the weight as Reshape(flat constant, shape)."""
    w = g.weights(cout, cin, k, k)
    weight = g.const(w, "w")
    if reshaped:
        weight = g.op("Reshape", [g.const(w.reshape(-1), "wflat"), g.const(np.array(w.shape, np.int64), "wshape")])
    y = g.op("Conv", [x, weight], kernel_shape=[k, k], pads=[k // 2] * 4)
    return g.op("Relu", [_affine(g, y, cout, zeros, constant_node=reshaped)])


def densenet_caffe2() -> tuple[onnx.ModelProto, int]:
    """DenseNet-121 style (pre-activation dense layers, Concat, transition); returns (model, zeroed)."""
    g = GraphBuilder(opset=9, seed=11)
    x = g.input([1, 3, 16, 16])
    y, c, zeroed = _conv(g, x, 3, 8, zeros=(1, 5)), 8, 2
    for block in range(2):
        features = [y]
        for layer in range(3):
            inner = g.op("Concat", features, axis=1) if len(features) > 1 else features[0]
            inner = g.op("Relu", [_affine(g, inner, c)])  # BN over the concatenation: nothing to delete
            h = _conv(g, inner, c, 8, k=1, zeros=(0, 3, 6), reshaped=layer == 1)  # the bottleneck
            zeroed += 3
            features.append(g.op("Conv", [h, g.const(g.weights(4, 8, 3, 3), "w")], kernel_shape=[3, 3], pads=[1] * 4))
            c += 4
        y = g.op("Concat", features, axis=1)
        if block == 0:
            y = _conv(g, g.op("Relu", [_affine(g, y, c)]), c, c // 2, k=1, zeros=(2,))
            y = g.op("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2])
            c, zeroed = c // 2, zeroed + 1
    y = g.op("Flatten", [g.op("GlobalAveragePool", [g.op("Relu", [_affine(g, y, c)])])], axis=1)
    g.output(g.gemm(y, c, 10))
    return g.model(), zeroed


def inception_v2_caffe2() -> tuple[onnx.ModelProto, int]:
    """Inception-v2 style: four branches (1x1, 1x1-3x3, 1x1-3x3-3x3, pool-1x1) joined by Concat."""
    g = GraphBuilder(opset=9, seed=12)
    x = g.input([1, 3, 16, 16])
    y, cin, zeroed = _conv(g, x, 3, 16, zeros=(4,)), 16, 1
    for b1, b2, b3, b4 in ((8, 8, 6, 4), (6, 8, 8, 4)):
        branch1 = _conv(g, y, cin, b1, k=1, zeros=(0, 2))
        branch2 = _conv(g, _conv(g, y, cin, 6, k=1, zeros=(1,), reshaped=True), 6, b2, zeros=(3,))
        branch3 = _conv(g, _conv(g, _conv(g, y, cin, 4, k=1, zeros=(2,)), 4, b3), b3, b3, zeros=(0, 1))
        pooled = g.op("AveragePool", [y], kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=0)
        branch4 = _conv(g, pooled, cin, b4, k=1, zeros=(3,))
        y = g.op("Concat", [branch1, branch2, branch3, branch4], axis=1)
        cin, zeroed = b1 + b2 + b3 + b4, zeroed + 8
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    g.output(g.gemm(y, cin, 10))
    return g.model(), zeroed


@pytest.mark.parametrize("ir3", [False, True], ids=["ir4", "ir3"])
@pytest.mark.parametrize("build", [densenet_caffe2, inception_v2_caffe2])
def test_affine_from_unsqueezed_constants(build, ir3):
    model, zeroed = build()
    if ir3:
        model = to_ir3(model)
    before = model.SerializeToString()
    slimmed, report = slim(model)
    assert model.SerializeToString() == before  # the input model is not modified
    assert_equivalent(model, slimmed)
    assert (slimmed.ir_version, slimmed.opset_import[0].version) == (model.ir_version, 9)
    assert report.masked_channels == zeroed
    assert report.deleted_masked_channels == zeroed, report.format_table()
    assert report.params_after < report.params_before
    assert not any(n.op_type in ("Unsqueeze", "Constant") for n in slimmed.graph.node)


@pytest.mark.parametrize("opset", [10, 11, 13])
def test_a_folded_shape_stays_valid_in_old_opsets(opset):
    """BlazePose (torch 1.6, opset 10) reshapes its head with ``input.shape[0]``: ``Shape -> Gather
    (index from a Constant node) -> Unsqueeze -> Concat -> Reshape``. onnxscript's folder writes the static
    Shape as ``Constant(value_ints)``, an attribute of Constant-12+: lifted to an initializer it is valid
    in every opset. 2 masked channels, 2 deleted (before, opset 10/11: "invalid input model ... Attribute
    'value' of Constant node must exist")."""
    g = GraphBuilder(opset=opset)
    x = g.input([1, 3, 8, 8], name="input")
    y = g.op("Relu", [g.mask(g.conv(x, 3, 6), 6, zeros=[1, 4])])
    y = g.op("Transpose", [g.conv(y, 6, 4)], perm=[0, 2, 3, 1])
    index = g.name("index")
    g.nodes.append(helper.make_node("Constant", [], [index], value=onnx.numpy_helper.from_array(np.array(0, np.int64))))
    batch = g.op("Gather", [g.op("Shape", [x]), index], axis=0)
    batch = g.op("Unsqueeze", [batch], axes=[0]) if opset < 13 else \
        g.op("Unsqueeze", [batch, g.const(np.array([0], np.int64))])
    target = g.op("Concat", [batch, g.const(np.array([-1, 4], np.int64))], axis=0)
    g.output(g.op("Reshape", [y, target]), shape=[1, 64, 4])
    model = g.model()
    slimmed, report = slim(model)
    assert_equivalent(model, slimmed)
    assert report.masked_channels == report.deleted_masked_channels == 2, report.format_table()


def test_a_scale_before_a_mask_folds_in_the_same_slim():
    """LDC's dense block ``0.5 * (conv(x) + conv'(x))`` before a conv; prune puts its mask between the Muls.
    The mask folds into the conv, and then (a second pass) the 0.5 too: one slim leaves no Mul, so a
    second slim is a fixed point (before: the 0.5 stayed until the next slim). 2 masked channels go."""
    g = GraphBuilder()
    x = g.op("Relu", [g.conv(g.input([1, 3, 8, 8]), 3, 6)])
    y = g.op("Mul", [g.op("Add", [g.conv(x, 6, 6), g.conv(x, 6, 6, k=1, pad=0)]), g.const(np.float32(0.5))])
    g.output(g.conv(g.mask(y, 6, zeros=[1, 4]), 6, 4))
    model = g.model()
    slimmed, report = slim(model)
    assert_equivalent(model, slimmed)
    assert report.deleted_masked_channels == 2 and "Mul" not in {n.op_type for n in slimmed.graph.node}
    again, _ = slim(slimmed)
    assert again.SerializeToString() == slimmed.SerializeToString()
