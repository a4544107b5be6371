"""Parameter and MAC counts of an ONNX model.

* params: elements of all floating-point initializers (integer ones are shapes and indices).
* MACs: multiply-accumulates of one sample (batch dimension taken as 1) in Conv, ConvTranspose, Gemm
  and MatMul, from static shapes — ``Cout * prod(out spatial) * Cin/g * prod(kernel)`` for Conv,
  ``Cin * prod(in spatial) * Cout/g * prod(kernel)`` for ConvTranspose, ``K * M`` per row for Gemm/MatMul.
  Elementwise ops, BN and pooling are not counted (they are not multiply-accumulates into weights).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from onnxslim.graph.shapes import infer_shapes

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclasses.dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int
    macs_complete: bool  # False when some layer's shapes were not static (its MACs are not counted)
    layer_macs: dict[str, int]


def count_params(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_type in _FLOAT_TYPES:
            total += int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return total


def count_macs(model: onnx.ModelProto, shapes: dict[str, tuple]) -> tuple[int, bool, dict[str, int]]:
    initializer_dims = {t.name: tuple(t.dims) for t in model.graph.initializer}

    def dims(name):
        return initializer_dims.get(name) or shapes.get(name)

    total, complete, per_layer = 0, True, {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        macs = _node_macs(node, dims)
        if macs is None:
            complete = False
            continue
        per_layer[node.name or node.output[0]] = macs
        total += macs
    return total, complete, per_layer


def _node_macs(node, dims) -> int | None:
    x, w = dims(node.input[0]), dims(node.input[1])
    y = dims(node.output[0])
    if node.op_type == "Gemm" and w is not None and len(w) == 2:
        return int(w[0] * w[1])  # K * M per row, whatever the batch
    if node.op_type == "MatMul" and w is not None and len(w) == 2 and (x is None or len(x) == 2):
        return int(w[0] * w[1])
    if x is None or w is None or y is None or any(d is None for d in list(x[1:]) + list(w) + list(y[1:])):
        return None
    if node.op_type == "Conv":
        return int(np.prod(y[1:], dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        return int(np.prod(x[1:], dtype=np.int64) * w[1] * np.prod(w[2:], dtype=np.int64))
    # MatMul: every leading dim but the batch multiplies
    if len(x) < 2 or len(w) < 2:
        return None
    rows = int(np.prod(x[1:-1], dtype=np.int64)) if len(x) > 2 else 1
    return int(rows * x[-1] * w[-1])


def model_stats(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
                shapes: dict[str, tuple] | None = None) -> ModelStats:
    """Params and per-sample MACs; ``input_shapes`` fixes dynamic input dims for the MAC count."""
    if shapes is None:
        shapes = infer_shapes(model, input_shapes)
    macs, complete, per_layer = count_macs(model, shapes)
    return ModelStats(count_params(model), macs, complete, per_layer)
