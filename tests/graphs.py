"""Small ONNX graph builder and the equivalence check used by the slimmer's tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxslim.graph.slim import slim


class GraphBuilder:
    """Builds a model node by node with random (seeded) weights."""

    def __init__(self, opset: int = 17, seed: int = 0):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.output_shapes: dict[str, list | None] = {}
        self._count = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    # -- graph interface ---------------------------------------------------------------------------
    def input(self, shape, name: str = "x", dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, *names: str, shape=None) -> None:
        """Graph outputs; ``shape`` is used when shape inference cannot tell (computed Reshape targets)."""
        self.outputs.extend(names)
        for name in names:
            self.output_shapes[name] = shape

    def const(self, value, base: str = "c") -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs, outputs: int = 1, **attrs):
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def weights(self, *shape, scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    # -- layers ------------------------------------------------------------------------------------
    def conv(self, x, cin, cout, k=3, pad=None, stride=1, groups=1, bias=True, dead=(), **attrs):
        w = self.weights(cout, cin // groups, k, k)
        w[list(dead)] = 0
        inputs = [x, self.const(w, "w")]
        if bias:
            b = self.weights(cout, scale=0.1)
            b[list(dead)] = 0
            inputs.append(self.const(b, "b"))
        pad = k // 2 if pad is None else pad
        if "auto_pad" not in attrs:
            attrs["pads"] = [pad] * 4
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], group=groups, **attrs)

    def bn(self, x, c):
        scale = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        shift = self.rng.uniform(-0.5, 0.5, c).astype(np.float32)
        mean = self.rng.uniform(-0.2, 0.2, c).astype(np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        return self.op("BatchNormalization", [x, *(self.const(v, "bn") for v in (scale, shift, mean, var))],
                       epsilon=1e-5)

    def mask_values(self, c, zeros):
        values = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        values[list(zeros)] = 0
        return values

    def mask(self, x, c, zeros=(), rank=4, values=None):
        values = self.mask_values(c, zeros) if values is None else values
        shape = [1, c] + [1] * (rank - 2)
        return self.op("Mul", [x, self.const(values.reshape(shape), "mask")])

    def gemm(self, x, k, m, trans_b=1, bias=True):
        w = self.weights(m, k) if trans_b else self.weights(k, m)
        inputs = [x, self.const(w, "fc")]
        if bias:
            inputs.append(self.const(self.weights(m, scale=0.1), "fcb"))
        return self.op("Gemm", inputs, transB=trans_b)

    def model(self, ir_version: int | None = None) -> onnx.ModelProto:
        outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in self.outputs]
        graph = helper.make_graph(self.nodes, "test", self.inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = min(onnx.IR_VERSION, 9)
        inferred = onnx.shape_inference.infer_shapes(model)  # at IR >= 4: initializers need not be inputs
        model.ir_version = ir_version or model.ir_version
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for position, name in enumerate(self.outputs):
            if name in known and known[name].type.tensor_type.HasField("shape"):
                model.graph.output[position].CopyFrom(known[name])
            elif self.output_shapes.get(name) is not None:
                model.graph.output[position].CopyFrom(
                    helper.make_tensor_value_info(name, TensorProto.FLOAT, self.output_shapes[name]))
        if model.ir_version >= 4:
            onnx.checker.check_model(model, full_check=True)
        return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 1, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def assert_equivalent(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds=None, tolerance=1e-5):
    """onnxruntime outputs agree within ``tolerance * max|reference output|`` (plus a tiny floor)."""
    feeds = feeds or random_feeds(reference)
    expected = run(reference, feeds)
    actual = run(candidate, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape, (e.shape, a.shape)
        scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)
        diff = float(np.max(np.abs(e - a))) if e.size else 0.0
        assert diff <= tolerance * scale + 1e-7, f"max diff {diff} vs max |out| {scale}"
    return expected, actual


# -- helpers of the rule tests ----------------------------------------------------------------

def slim_checked(model: onnx.ModelProto, **options):
    slimmed, report = slim(model, **options)
    assert_equivalent(model, slimmed)
    assert report.params_after <= report.params_before
    return slimmed, report


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def conv_channels(model: onnx.ModelProto) -> list[int]:
    inits = {t.name: t for t in model.graph.initializer}
    return [int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv"]


def head(g: GraphBuilder, x, c, k=3):
    """A consumer that reduces over channels (a padded conv) and the graph output."""
    y = g.conv(x, c, 4, k=k, pad=k // 2)
    g.output(y)
    return y
