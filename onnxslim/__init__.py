"""onnxslim: turn CNNs trained with channel masks into physically smaller, exactly equivalent ONNX models.

The public API is imported lazily so that the ONNX-only parts never import torch:

* :func:`slim` — delete provably-zero channels from an ONNX model (``onnxslim.graph``).
* :func:`prune` — choose channels by a criterion on any ONNX model, then slim.
* :func:`inspect_model` — the channel analysis without rewriting: groups, zeros, barriers.
* :func:`export` — export a PyTorch model with masks as per-channel ``Mul`` nodes (``onnxslim.training``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "slim": "onnxslim.graph.slim:slim",
    "SlimReport": "onnxslim.graph.report:SlimReport",
    "prune": "onnxslim.graph.prune:prune",
    "inspect_model": "onnxslim.graph.inspect:inspect_model",
    "export": "onnxslim.training.export:export",
    "OnnxSlimError": "onnxslim.errors:OnnxSlimError",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'onnxslim' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
