"""Acceptance on third-party style graphs: masks after every conv's BN (zeros chosen per coupled class,
as mask training produces them), then slim. The output must match the masked model, and at least 95 %
of the masked channels that are not held by a barrier must be deleted."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import assert_equivalent
from thirdparty import THIRD_PARTY

from onnxslim.graph.prune import insert_masks
from onnxslim.graph.slim import analyse, slim


def mask_after_every_conv(model: onnx.ModelProto, fraction: float, seed: int) -> onnx.ModelProto:
    """Zero a random ``fraction`` of every layer's channel classes (barrier-held ones included)."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    analysis = analyse(masked)
    roots = analysis.uf.roots()
    rng = np.random.default_rng(seed)
    chosen = set()
    for name in analysis.creators:
        layer = list(dict.fromkeys(roots[analysis.info[name].ids].tolist()))
        chosen.update(rng.choice(layer, int(fraction * len(layer)), replace=False).tolist())
    insert_masks(masked, analysis, np.array(sorted(chosen), np.int64), placement="after_bn")
    return masked


@pytest.mark.parametrize("name", list(THIRD_PARTY))
def test_third_party_graph(name):
    build, convention = THIRD_PARTY[name]
    masked = convention(mask_after_every_conv(build(), fraction=0.4, seed=0))
    onnx.checker.check_model(masked)
    slimmed, report = slim(masked)
    assert_equivalent(masked, slimmed)
    assert slimmed.ir_version == masked.ir_version
    assert slimmed.opset_import[0].version == masked.opset_import[0].version
    assert report.masked_channels > 0
    assert report.deletion_rate >= 0.95, report.format_table()
    assert report.params_after < report.params_before
    if name in ("googlenet_opset9", "squeezenet_opset9"):
        assert report.masked_behind_barriers > 0  # LRN, Softmax output
    if name == "shufflenet_opset11":  # the batch-1 channel shuffle is a permutation: a Gather, nothing held
        assert report.deleted_masked_channels == report.masked_channels
        assert [n.op_type for n in slimmed.graph.node].count("Gather") == 2


def _frozen_bn_net(masked: bool) -> onnx.ModelProto:
    from graphs import GraphBuilder

    g = GraphBuilder(opset=12, seed=4)
    x = g.input([1, 3, 8, 8])

    def frozen_bn(y, c):
        y = g.op("Div", [g.op("Sub", [y, g.const(g.weights(c, 1, 1, scale=0.1))]), g.const(np.full((c, 1, 1), 1.5, np.float32))])
        return g.op("Add", [g.op("Mul", [y, g.const(g.weights(c, 1, 1) + 1.0)]), g.const(g.weights(c, 1, 1, scale=0.1))])

    y = g.op("Relu", [frozen_bn(g.conv(x, 3, 8, bias=False), 8)])
    y = frozen_bn(g.conv(y, 8, 8, bias=False), 8)
    y = g.op("Relu", [g.mask(y, 8, zeros=[2, 5]) if masked else y])
    g.output(g.conv(y, 8, 4))
    return g.model()


def test_an_unfused_frozen_bn_scale_is_not_reported_as_a_mask():
    """A PyTorch 1.6 DBNet export (MobileNetV3, PaddleOCR's torch port) spells its frozen BN as
    ``(conv - mean) / std * w + b``: 49 per-channel ``Mul`` nodes that zero nothing. The report said
    "mask Mul nodes folded into weights: 0; kept: 49" for the dense model; masks are those with a zero."""
    model = _frozen_bn_net(masked=True)
    slimmed, report = slim(model)
    assert_equivalent(model, slimmed)
    assert report.deleted_masked_channels == report.masked_channels == 2
    assert report.folded_masks + len(report.remaining_masks) == 1, report.format_table()  # the mask, not the BNs
    _, dense = slim(_frozen_bn_net(masked=False))
    assert (dense.folded_masks, dense.remaining_masks) == (0, [])
    assert "mask Mul nodes" not in dense.format_table()
