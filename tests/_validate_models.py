"""Tiny ONNX models built with onnx.helper for the validation tests (no torch, no slim engine)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_classifier(weight: np.ndarray, bias: np.ndarray, input_shape=("N", 1, 28, 28),
                      name: str = "linear", output_name: str = "logits") -> onnx.ModelProto:
    """Flatten -> Gemm: logits = x.reshape(N, -1) @ weight + bias."""
    features, classes = weight.shape
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [input_shape[0], classes])],
        [numpy_helper.from_array(weight.astype(np.float32), "W"), numpy_helper.from_array(bias.astype(np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_net(channels: int = 8, classes: int = 10, size: int = 28, seed: int = 0, mask: np.ndarray | None = None,
             name: str = "convnet") -> onnx.ModelProto:
    """Conv 3x3 -> Relu -> (optional per-channel Mul mask) -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    conv_w = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32) * 0.5
    conv_b = rng.standard_normal(channels).astype(np.float32) * 0.1
    fc_w = rng.standard_normal((channels, classes)).astype(np.float32)
    fc_b = np.zeros(classes, np.float32)
    inits = [numpy_helper.from_array(conv_w, "cw"), numpy_helper.from_array(conv_b, "cb"),
             numpy_helper.from_array(fc_w, "fw"), numpy_helper.from_array(fc_b, "fb")]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"])]
    last = "r"
    if mask is not None:
        inits.append(numpy_helper.from_array(mask.astype(np.float32).reshape(1, channels, 1, 1), "mask"))
        nodes.append(helper.make_node("Mul", ["r", "mask"], ["m"]))
        last = "m"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"], axis=1),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"])]
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def segmenter(classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """1x1 Conv producing per-pixel logits (N, classes, H, W) from (N, 1, H, W)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((classes, 1, 1, 1)).astype(np.float32)
    b = rng.standard_normal(classes).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["logits"])], "seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, "H", "W"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fitted_linear_weights(images: np.ndarray, labels: np.ndarray, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares one-hot regression: a weak but far-better-than-chance linear classifier."""
    x = images.reshape(len(images), -1).astype(np.float64)
    target = np.eye(classes)[labels]
    weight, *_ = np.linalg.lstsq(x.T @ x + 10.0 * np.eye(x.shape[1]), x.T @ target, rcond=None)
    return weight.astype(np.float32), np.zeros(classes, np.float32)
