"""PyTorch module paths of ONNX nodes: the names a user knows (``features.conv1``, ``layer2.0.conv1``).

:func:`onnxslim.training.export.export` writes the path of every channel-producing node into the
node's ``metadata_props`` under :data:`MODULE_KEY` (the same key for the dynamo and the TorchScript
exporter). Reports show it with the ONNX node name beside it; graphs from elsewhere have no such entry
and keep their ONNX names.
"""

from __future__ import annotations

import onnx

MODULE_KEY = "pytorch.module"


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module path recorded on ``node``, or ``""`` when there is none."""
    return next((prop.value for prop in node.metadata_props if prop.key == MODULE_KEY), "")


def layer_label(node_name: str, module: str) -> str:
    """``"features.conv1 (node_conv2d)"`` when the module is known, else the ONNX node name."""
    return f"{module} ({node_name})" if module else node_name
