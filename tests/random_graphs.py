"""Random CNN graphs with random masks, for the property test and ``tools/fuzz_slim.py``.

A graph is a DAG over a pool of NCHW feature maps (batch 2, spatial 6x6, 1-12 channels): each step takes
a map from the pool and adds a block of one **kind** (:data:`KINDS`): plain / grouped / depthwise
(channel multiplier) convs, ConvTranspose, activations, pooling, masks (positive, negative, mixed sign,
whole-layer), residual Add / Sub / Mul / Max / Min / Sum (also broadcast from a one-channel map),
Concat, Split into 2-4 outputs, Slice and Gather on the channel axis, Pad (constant, reflect, edge),
Resize, SE gates, spatial gates (ReduceMean/ReduceMax over channels, or a C->1 conv), channel shuffles,
NHWC Transpose round trips (with a mask in NHWC), GroupNormalization (opset 21) or its exporters'
decomposition, QDQ pairs on activations and int8 QDQ convs (per-channel weight scales). A head (Flatten -> Gemm, GlobalAveragePool -> Gemm, or a
Keras-style NHWC Flatten -> Gemm) ends it. The opset is 13, 17, 18 or 21.

Draws go through a :class:`Draw` so that the same generator runs under hypothesis (shrinking, the CI
test) and from a seeded numpy generator (long campaigns: example ``i`` of seed ``S`` is reproducible).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import onnx
from graphs import GraphBuilder, random_feeds, run

SPATIAL = 6
BATCH = 2
MAX_CHANNELS = 12


class Draw(Protocol):
    def integer(self, low: int, high: int, label: str) -> int: ...  # inclusive bounds
    def choice(self, options: Sequence, label: str): ...
    def subset(self, size: int, label: str) -> list[int]: ...  # a sorted subset of range(size)


class HypothesisDraw:
    """Draws from hypothesis' ``st.data()`` (so failures shrink)."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, low, high, label):
        return self.data.draw(self.st.integers(low, high), label=label)

    def choice(self, options, label):
        return self.data.draw(self.st.sampled_from(list(options)), label=label)

    def subset(self, size, label):
        return sorted(self.data.draw(self.st.sets(self.st.integers(0, size - 1), max_size=size), label=label)) \
            if size else []


class RandomDraw:
    """Draws from a seeded numpy generator (reproducible long campaigns)."""

    def __init__(self, seed: int | Sequence[int]):
        self.rng = np.random.default_rng(seed)

    def integer(self, low, high, label):
        return int(self.rng.integers(low, high + 1))

    def choice(self, options, label):
        options = list(options)
        return options[int(self.rng.integers(len(options)))]

    def subset(self, size, label):
        if not size:
            return []
        mode = self.rng.integers(4)  # none, all, or a random share: the edge cases come up often
        if mode == 0:
            return []
        if mode == 1:
            return list(range(size))
        return sorted(np.flatnonzero(self.rng.random(size) < self.rng.random()).tolist())


@dataclasses.dataclass
class Builder:
    """The graph under construction: the builder, its opset, the pool of (map, channels), masked count."""

    g: GraphBuilder
    draw: Draw
    pool: list[tuple[str, int]]
    masked: int = 0

    @property
    def opset(self) -> int:
        return self.g.opset

    def pick(self, label: str = "src") -> tuple[str, int]:
        return self.pool[self.draw.integer(0, len(self.pool) - 1, label)]

    def add(self, tensor: str, channels: int) -> None:
        self.pool.append((tensor, channels))

    def ints(self, values) -> str:
        return self.g.const(np.asarray(values, np.int64))

    def activation(self, x: str) -> str:
        options = ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu"] + (["HardSwish"] if self.opset >= 14 else [])
        return self.g.op(self.draw.choice(options, "act"), [x])

    def mask(self, x: str, c: int, rank: int = 4, axis: int = 1) -> str:
        """A per-channel Mul with zeros: positive, negative or mixed-sign scales; sometimes all zero."""
        zeros = self.draw.subset(c, "zeros")
        sign = self.draw.choice(["positive", "negative", "mixed"], "sign")
        values = self.g.mask_values(c, zeros)
        if sign == "negative":
            values = -values
        elif sign == "mixed":
            values = values * np.where(np.arange(c) % 2, -1.0, 1.0).astype(np.float32)
        self.masked += len(zeros)
        shape = [1] * rank
        shape[axis] = c
        return self.g.op("Mul", [x, self.g.const(values.reshape(shape), "mask")])

    def reduce_channels(self, op: str, x: str) -> str:
        if self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13):
            return self.g.op(op, [x, self.ints([1])], keepdims=1)
        return self.g.op(op, [x], axes=[1], keepdims=1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# -- one function per kind; each appends what it makes to the pool ----------------------------------

def conv(b: Builder) -> None:
    src, c = b.pick()
    cout = b.draw.integer(1, 8, "cout")
    k = b.draw.choice([1, 3], "k")
    y = b.g.conv(src, c, cout, k=k, pad=k // 2, bias=b.draw.choice([True, False], "bias"))
    b.add(b.activation(y), cout)


def conv_bn_mask(b: Builder) -> None:
    src, c = b.pick()
    cout = b.draw.integer(1, 8, "cout")
    y = b.mask(b.g.bn(b.g.conv(src, c, cout, k=b.draw.choice([1, 3], "k")), cout), cout)
    b.add(b.activation(y), cout)


def dead(b: Builder) -> None:
    src, c = b.pick()
    cout = b.draw.integer(1, 8, "cout")
    y = b.g.conv(src, c, cout, k=3, dead=b.draw.subset(cout, "dead"), bias=b.draw.choice([True, False], "bias"))
    b.add(b.activation(y), cout)


def grouped(b: Builder) -> None:
    """A grouped conv (1 < groups <= C) or a depthwise conv with channel multiplier 1 or 2."""
    src, c = b.pick()
    groups = b.draw.choice([d for d in _divisors(c) if d > 1] or [1], "groups")
    per_group = b.draw.integer(1, max(1, 8 // groups), "per_group") if groups < c else b.draw.choice([1, 2], "mult")
    cout = groups * per_group
    y = b.g.conv(src, c, cout, k=b.draw.choice([1, 3], "k"), groups=groups)
    if b.draw.choice([True, False], "bn_mask"):
        y = b.mask(b.g.bn(y, cout), cout)
    b.add(b.activation(y), cout)


def conv_transpose(b: Builder) -> None:
    """ConvTranspose k3 s1 p1 (same size) or k2 s2 followed by a 2x2 pool back to the size."""
    src, c = b.pick()
    groups = b.draw.choice([d for d in _divisors(c) if d <= 2], "groups")
    cout = groups * b.draw.integer(1, 4, "per_group")
    stride = b.draw.choice([1, 2], "stride")
    k = 3 if stride == 1 else 2
    inputs = [src, b.g.const(b.g.weights(c, cout // groups, k, k), "wt")]
    if b.draw.choice([True, False], "bias"):
        inputs.append(b.g.const(b.g.weights(cout, scale=0.1), "bt"))
    y = b.g.op("ConvTranspose", inputs, kernel_shape=[k, k], strides=[stride, stride],
               pads=[stride % 2] * 4, group=groups)
    if stride == 2:
        y = b.g.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    b.add(b.activation(y), cout)


def act(b: Builder) -> None:
    src, c = b.pick()
    op = b.draw.choice(["Relu", "Elu", "Sigmoid", "HardSigmoid", "Clip", "Abs", "Neg"], "act")
    b.add(b.g.op(op, [src, b.g.const(np.float32(0.0)), b.g.const(np.float32(3.0))] if op == "Clip" else [src]), c)


def pool(b: Builder) -> None:
    src, c = b.pick()
    op = b.draw.choice(["MaxPool", "AveragePool"], "pool")
    b.add(b.g.op(op, [src], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), c)


def mask(b: Builder) -> None:
    src, c = b.pick()
    b.add(b.mask(src, c), c)


def binop(b: Builder) -> None:
    """A residual op between maps with the same channels, or broadcast from a one-channel map."""
    src, c = b.pick()
    partners = [t for t, cc in b.pool if (cc == c or cc == 1) and t != src]
    if not partners:
        return
    op = b.draw.choice(["Add", "Sub", "Mul", "Max", "Min", "Sum"], "binop")
    operands = [src, partners[b.draw.integer(0, len(partners) - 1, "other")]]
    if op == "Sum" and len(partners) > 1:
        operands.append(partners[b.draw.integer(0, len(partners) - 1, "third")])
    if b.draw.choice([True, False], "swap"):
        operands.reverse()
    b.add(b.g.op(op, operands), c)


def concat(b: Builder) -> None:
    parts = [b.pick("concat") for _ in range(b.draw.integer(2, 3, "parts"))]
    if sum(c for _, c in parts) <= MAX_CHANNELS:
        b.add(b.g.op("Concat", [t for t, _ in parts], axis=1), sum(c for _, c in parts))


def split(b: Builder) -> None:
    src, c = b.pick()
    if c < 2:
        return
    count = b.draw.integer(2, min(4, c), "outputs")
    sizes, left = [], c
    for position in range(count - 1):
        sizes.append(b.draw.integer(1, left - (count - 1 - position), "size"))
        left -= sizes[-1]
    sizes.append(left)
    outs = b.g.op("Split", [src, b.ints(sizes)], outputs=count, axis=1)
    for name, size in zip(outs, sizes):
        b.add(name, int(size))


def slice_channels(b: Builder) -> None:
    src, c = b.pick()
    start, end = sorted((b.draw.integer(0, c - 1, "start"), b.draw.integer(1, c, "end")))
    end = max(end, start + 1)
    step = b.draw.choice([1, 2], "step")
    count = len(range(start, end, step))
    starts = start - c if b.draw.choice([True, False], "negative") else start
    y = b.g.op("Slice", [src, b.ints([starts]), b.ints([end]), b.ints([1]), b.ints([step])])
    b.add(y, count)


def gather_channels(b: Builder) -> None:
    src, c = b.pick()
    count = b.draw.integer(1, c + 1, "count")
    indices = [b.draw.integer(-c, c - 1, "index") for _ in range(count)]
    b.add(b.g.op("Gather", [src, b.ints(indices)], axis=1), count)


def pad(b: Builder) -> None:
    """Pad H and W by one (constant 0 or 0.5, reflect, edge), then a valid 3x3 conv back to 6x6."""
    src, c = b.pick()
    mode = b.draw.choice(["constant", "constant_nonzero", "reflect", "edge"], "pad_mode")
    inputs = [src, b.ints([0, 0, 1, 1, 0, 0, 1, 1])]
    if mode == "constant_nonzero":
        inputs.append(b.g.const(np.float32(0.5)))
    y = b.g.op("Pad", inputs, mode="constant" if mode.startswith("constant") else mode)
    cout = b.draw.integer(1, 8, "cout")
    b.add(b.activation(b.g.conv(y, c, cout, k=3, pad=0)), cout)


def resize(b: Builder) -> None:
    src, c = b.pick()
    mode = b.draw.choice(["nearest", "linear"], "resize_mode")
    up = b.g.op("Resize", [src, "", b.g.const(np.array([1, 1, 2, 2], np.float32))], mode=mode)
    b.add(b.g.op(b.draw.choice(["MaxPool", "AveragePool"], "down"), [up], kernel_shape=[2, 2], strides=[2, 2]), c)


def se_gate(b: Builder) -> None:
    src, c = b.pick()
    squeeze = b.g.op("GlobalAveragePool", [src])
    hidden = max(1, c // 2)
    s = b.g.op("Relu", [b.g.conv(squeeze, c, hidden, k=1, pad=0)])
    s = b.g.op(b.draw.choice(["Sigmoid", "HardSigmoid"], "gate"), [b.g.conv(s, hidden, c, k=1, pad=0)])
    b.add(b.g.op("Mul", [src, s]), c)


def spatial_gate(b: Builder) -> None:
    """CBAM: mean (and max) over channels -> conv -> sigmoid, or an attention U-Net C->1 conv gate."""
    src, c = b.pick()
    kind = b.draw.choice(["mean", "mean_max", "sum", "conv"], "spatial")
    if kind == "conv":
        pooled, width = src, c
    elif kind == "mean_max":
        pooled = b.g.op("Concat", [b.reduce_channels("ReduceMean", src), b.reduce_channels("ReduceMax", src)], axis=1)
        width = 2
    else:
        pooled, width = b.reduce_channels("ReduceMean" if kind == "mean" else "ReduceSum", src), 1
    gate = b.g.op("Sigmoid", [b.g.conv(pooled, width, 1, k=3)])
    b.add(b.g.op("Mul", [src, gate] if b.draw.choice([True, False], "order") else [gate, src]), c)


def shuffle(b: Builder) -> None:
    """ShuffleNet's channel shuffle: Reshape (N, g, C/g, H, W) -> Transpose -> Reshape (N, C, H, W)."""
    src, c = b.pick()
    groups = b.draw.choice([d for d in _divisors(c) if 1 < d < c] or [1], "shuffle_groups")
    if groups == 1:
        return
    y = b.g.op("Reshape", [src, b.ints([BATCH, groups, c // groups, SPATIAL, SPATIAL])])
    y = b.g.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    b.add(b.g.op("Reshape", [y, b.ints([BATCH, c, SPATIAL, SPATIAL])]), c)


def transpose(b: Builder) -> None:
    """NCHW -> NHWC, a mask and an activation in NHWC, and back."""
    src, c = b.pick()
    y = b.g.op("Transpose", [src], perm=[0, 2, 3, 1])
    if b.draw.choice([True, False], "nhwc_mask"):
        y = b.mask(y, c, rank=4, axis=3)
    y = b.g.op("Relu", [y])
    b.add(b.g.op("Transpose", [y], perm=[0, 3, 1, 2]), c)


def group_norm(b: Builder) -> None:
    """GroupNormalization (opset 21) or the exporters' Reshape -> InstanceNormalization -> Reshape -> Mul -> Add."""
    src, c = b.pick()
    groups = b.draw.choice(_divisors(c), "gn_groups")
    if b.opset >= 21 and b.draw.choice([True, False], "gn_op"):  # GroupNormalization-18 fails onnx.checker
        scale, bias = b.g.rng.uniform(0.5, 1.5, c), b.g.rng.uniform(-0.5, 0.5, c)
        y = b.g.op("GroupNormalization", [src, b.g.const(scale.astype(np.float32)), b.g.const(bias.astype(np.float32))],
                   num_groups=groups, epsilon=1e-5)
    else:
        y = b.g.op("Reshape", [src, b.ints([BATCH, groups, -1])])
        y = b.g.op("InstanceNormalization", [y, b.g.const(np.ones(groups, np.float32)),
                                             b.g.const(np.zeros(groups, np.float32))], epsilon=1e-5)
        y = b.g.op("Reshape", [y, b.ints([BATCH, c, SPATIAL, SPATIAL])])
        gamma = b.g.rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)
        y = b.g.op("Add", [b.g.op("Mul", [y, b.g.const(gamma)]), b.g.const(np.zeros((1, c, 1, 1), np.float32))])
    b.add(b.activation(y), c)


def qdq(b: Builder) -> None:
    """QuantizeLinear -> DequantizeLinear on an activation (uint8 or int8, per tensor)."""
    src, c = b.pick()
    dtype = b.draw.choice([np.uint8, np.int8], "qdtype")
    zero_point = b.g.const(np.array(128 if dtype == np.uint8 else 0, dtype))
    scale = b.g.const(np.float32(0.05))
    q = b.g.op("QuantizeLinear", [src, scale, zero_point])
    b.add(b.g.op("DequantizeLinear", [q, scale, zero_point]), c)


def qdq_conv(b: Builder) -> None:
    """An int8 QDQ conv as quantizers write it: DQ(Q(x)) -> Conv(W = DequantizeLinear(int8, per-channel
    scale on axis 0, zero point 0)) with a float bias."""
    src, c = b.pick()
    cout = b.draw.integer(1, 8, "cout")
    scale = b.g.const(np.float32(0.05))
    zero_point = b.g.const(np.int8(0))
    x = b.g.op("DequantizeLinear", [b.g.op("QuantizeLinear", [src, scale, zero_point]), scale, zero_point])
    levels = b.g.rng.integers(-127, 128, (cout, c, 3, 3)).astype(np.int8)
    levels[b.draw.subset(cout, "dead")] = 0
    w_scale = b.g.rng.uniform(0.002, 0.01, cout).astype(np.float32)
    weight = b.g.op("DequantizeLinear", [b.g.const(levels, "wq"), b.g.const(w_scale, "ws"),
                                         b.g.const(np.zeros(cout, np.int8), "wz")], axis=0)
    y = b.g.op("Conv", [x, weight, b.g.const(b.g.weights(cout, scale=0.1), "b")], kernel_shape=[3, 3],
               pads=[1, 1, 1, 1])
    if b.draw.choice([True, False], "mask_after"):
        y = b.mask(y, cout)
    b.add(b.activation(y), cout)


KINDS: dict[str, Callable[[Builder], None]] = {
    "conv": conv, "conv_bn_mask": conv_bn_mask, "dead": dead, "grouped": grouped, "conv_transpose": conv_transpose,
    "act": act, "pool": pool, "mask": mask, "binop": binop, "concat": concat, "split": split,
    "slice": slice_channels, "gather": gather_channels, "pad": pad, "resize": resize, "se_gate": se_gate,
    "spatial_gate": spatial_gate, "shuffle": shuffle, "transpose": transpose, "group_norm": group_norm, "qdq": qdq,
    "qdq_conv": qdq_conv,
}
# how often each kind is drawn (convs and masks more often: they make the channels and the zeros)
_WEIGHTS = {"conv": 2, "conv_bn_mask": 3, "mask": 2}


def head(b: Builder) -> None:
    """Flatten -> Gemm (3x3 max-pooled, global average pooled, or Keras-style NHWC), masked hidden layer."""
    last, c = b.pool[-1]
    kind = b.draw.choice(["flatten", "gap", "nhwc"], "head")
    if kind == "flatten":
        features = b.g.op("Flatten", [b.g.op("MaxPool", [last], kernel_shape=[3, 3], strides=[3, 3])], axis=1)
        width = c * (SPATIAL // 3) ** 2
    elif kind == "nhwc":
        pooled = b.g.op("MaxPool", [last], kernel_shape=[3, 3], strides=[3, 3])
        features = b.g.op("Flatten", [b.g.op("Transpose", [pooled], perm=[0, 2, 3, 1])], axis=1)
        width = c * (SPATIAL // 3) ** 2
    else:
        features = b.g.op("Flatten", [b.g.op("GlobalAveragePool", [last])], axis=1)
        width = c
    hidden = b.draw.integer(1, 6, "hidden")
    h = b.g.op("Relu", [b.mask(b.g.gemm(features, width, hidden), hidden, rank=2)])
    b.g.output(b.g.gemm(h, hidden, 3), shape=[BATCH, 3])  # known even where inference stops (GroupNorm-18)


def build_random_model(draw: Draw, kinds: Sequence[str] = tuple(KINDS), max_steps: int = 10) -> tuple[onnx.ModelProto, int]:
    """A random masked model and the number of masked channels."""
    opset = draw.choice([13, 17, 18, 21], "opset")
    g = GraphBuilder(opset=opset, seed=draw.integer(0, 2**16, "seed"))
    b = Builder(g, draw, [(g.input([BATCH, 3, SPATIAL, SPATIAL]), 3)])
    weighted = [k for k in kinds for _ in range(_WEIGHTS.get(k, 1))]
    for _ in range(draw.integer(2, max_steps, "steps")):
        KINDS[draw.choice(weighted, "kind")](b)
    head(b)
    return g.model(), b.masked


def _outputs_differ(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> str:
    """'' when onnxruntime's outputs agree within 1e-5 x max|output| (+1e-7), else what differs."""
    feeds = random_feeds(reference, batch=BATCH)
    for expected, actual in zip(run(reference, feeds), run(candidate, feeds)):
        scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-6)
        diff = float(np.max(np.abs(expected - actual))) if expected.size and expected.shape == actual.shape else -1.0
        if not 0.0 <= diff <= 1e-5 * scale + 1e-7:
            return f"max diff {diff} vs max |out| {scale}, shapes {expected.shape} {actual.shape}"
    return ""


def _slims_further(slimmed: onnx.ModelProto) -> bool:
    """Whether slimming ``slimmed`` again changes it (slim's output is a fixed point: every pass that could
    delete more ran; before, 153 of 900 slims and prunes of grouped / shuffle / concat graphs left more)."""
    from onnxslim.graph.slim import slim

    return slim(slimmed)[0].SerializeToString() != slimmed.SerializeToString()


def check_prune_example(model: onnx.ModelProto, ratio: float, scope: str = "layer", baseline=None):
    """Prune ``model``: the slimmed result must equal the masked reference, and with ``scope="layer"`` no
    layer may lose more than the ratio plus one unit beyond what slim alone deletes (the generator's own
    masks) — checked loosely as ratio + half the layer. ``baseline`` is slim's report on ``model`` (computed
    when not given). Same outcomes as :func:`check_example`, plus "budget"."""
    from onnxslim.graph.prune import prune
    from onnxslim.graph.slim import slim

    try:
        slimmed, report, masked = prune(model, ratio=ratio, scope=scope)
        baseline = baseline if baseline is not None else slim(model)[1]
    except Exception as exc:  # noqa: BLE001
        return "crash", f"prune: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", None
    differ = _outputs_differ(masked, slimmed)
    if differ:
        return "inexact", f"prune: {differ}", report
    if _slims_further(slimmed):
        return "unsettled", "prune: slimming its output again changes it", report
    if scope == "layer":
        alone = {layer.node: layer.channels_after for layer in baseline.layers}
        for layer in report.layers:
            extra = alone.get(layer.node, layer.channels_before) - layer.channels_after
            if extra > ratio * layer.channels_before + layer.channels_before / 2:
                return "budget", f"{layer.node}: {layer.channels_before} -> {layer.channels_after}", report
    return "ok", f"prune: {report.deleted_masked_channels}/{report.masked_channels} chosen channels deleted", report


def check_example(model: onnx.ModelProto):
    """Slim ``model`` and compare with onnxruntime: (outcome, detail, slim report or None), the outcome
    one of "ok", "crash", "inexact", "larger" (more params or MACs than the input), "unsettled" (slimming
    the output again changes it)."""
    from onnxslim.graph.slim import slim

    try:
        slimmed, report = slim(model)
    except Exception as exc:  # noqa: BLE001  (a campaign counts every failure)
        return "crash", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", None
    if report.params_after > report.params_before or report.macs_after > report.macs_before:
        return "larger", f"params {report.params_before} -> {report.params_after}, MACs {report.macs_before} -> " \
                         f"{report.macs_after}", report
    differ = _outputs_differ(model, slimmed)
    if differ:
        return "inexact", differ, report
    if _slims_further(slimmed):
        return "unsettled", "slimming the output again changes it", report
    return "ok", f"masked channels deleted {report.deleted_masked_channels}/{report.masked_channels}", report
