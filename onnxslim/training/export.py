"""Export a (masked) PyTorch model to ONNX and prove the file computes what the model computes.

The model is exported in eval mode, where both exporters fold every BatchNorm into the convolution
before it, so a masked block becomes ``Conv -> Mul(mask constant [1,C,1,1]) -> activation``. Every
Conv/ConvTranspose/Gemm/MatMul node gets its PyTorch module path (``layer2.0.conv1``) in its
``metadata_props`` (:func:`annotate_module_paths`), which slim, inspect and the reports show. The file is
written atomically, then onnxruntime runs it on the example input and the largest absolute difference to
the PyTorch output is compared with ``tolerance * max(1, max|output|)``.

``dynamo=True`` (default) uses ``torch.export`` + onnxscript; ``dynamo=False`` the TorchScript exporter.
The batch dimension is exported as dynamic (``batch``) unless ``dynamic_batch=False``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from onnxslim.errors import OnnxSlimError
from onnxslim.graph.names import MODULE_KEY
from onnxslim.io import save_model_atomic
from onnxslim.training.channel_mask import ChannelMask
from onnxslim.training.coupling import analyze_coupling
from onnxslim.training.masks import MaskedSite

MIN_OPSET = 17


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    max_abs_diff: float | None  # None when check=False
    mask_nodes: int  # Mul nodes by a per-channel constant
    input_name: str
    input_shape: tuple[int, ...]
    requested_opset: int | None = None  # the dynamo exporter writes 18 when asked for 17, or for what it cannot convert to

    def to_dict(self) -> dict:
        payload = dataclasses.asdict(self)
        payload["path"] = str(self.path)
        return payload


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' prints, warnings and log lines (they report progress, not problems)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                                    "onnxscript", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *, dynamo: bool = True,
           opset: int = 18, check: bool = True, tolerance: float = 1e-4, dynamic_batch: bool = True,
           input_name: str = "input", output_name: str = "output") -> ExportResult:
    """Export ``model`` (eval mode) to ``path``; with ``check`` compare onnxruntime with PyTorch.

    Raises :class:`OnnxSlimError` when the export fails, ``opset`` is below :data:`MIN_OPSET` or above the
    installed onnx's newest, or the outputs differ by more than ``tolerance * max(1, max|output|)``. The
    result's ``opset`` is the one written (``requested_opset`` the one asked for). The model's train/eval
    mode is restored afterwards.
    """
    if opset < MIN_OPSET:
        raise OnnxSlimError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    if opset > onnx.defs.onnx_opset_version():
        raise OnnxSlimError(f"opset {opset} is newer than the installed onnx {onnx.__version__} knows "
                            f"({onnx.defs.onnx_opset_version()})")
    path = Path(path)
    example_input = example_input.detach().to("cpu")
    was_training = model.training
    device = next(iter(model.parameters()), torch.empty(0)).device
    model.eval()
    try:
        if device.type != "cpu":
            model.to("cpu")
        proto = _export_proto(model, example_input, dynamo, opset, dynamic_batch, input_name, output_name)
        annotate_module_paths(proto, model, example_input)
        save_model_atomic(proto, path)
        max_diff = None
        if check:
            with torch.no_grad():
                reference = model(example_input)
            max_diff = _compare_with_onnxruntime(path, example_input, reference, input_name)
            scale = max(1.0, float(reference.abs().max()))
            if not np.isfinite(max_diff) or max_diff > tolerance * scale:
                raise OnnxSlimError(f"{path}: onnxruntime output differs from PyTorch by {max_diff:.3g} "
                                    f"(allowed {tolerance * scale:.3g})")
    finally:
        if device.type != "cpu":
            model.to(device)
        model.train(was_training)
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    return ExportResult(path, "dynamo" if dynamo else "torchscript", written, max_diff, count_mask_nodes(proto),
                        input_name, tuple(example_input.shape), opset)


def _export_proto(model, example_input, dynamo, opset, dynamic_batch, input_name, output_name) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="onnxslim-export-") as folder:
        target = Path(folder) / "model.onnx"
        try:
            with _quiet_exporter():
                if dynamo:
                    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
                    torch.onnx.export(model, (example_input,), str(target), dynamo=True, opset_version=opset,
                                      input_names=[input_name], output_names=[output_name],
                                      dynamic_shapes=dynamic_shapes, verbose=False, external_data=False)
                else:
                    dynamic_axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
                    torch.onnx.export(model, (example_input,), str(target), dynamo=False, opset_version=opset,
                                      input_names=[input_name], output_names=[output_name],
                                      dynamic_axes=dynamic_axes, do_constant_folding=True, verbose=False)
        except OnnxSlimError:
            raise
        except Exception as exc:  # the exporters raise many types; report one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxSlimError(f"ONNX export ({'dynamo' if dynamo else 'torchscript'}) failed: {first}") from None
        return _inline_identity_constants(onnx.load(str(target)))


def annotate_module_paths(proto: onnx.ModelProto, model: nn.Module, example_input: torch.Tensor) -> int:
    """Record the PyTorch module path of every Conv/ConvTranspose/Gemm/MatMul node and of every mask's ``Mul``
    (its ``ChannelMask``, e.g. ``layer1.0.bn1.mask``); returns how many.

    The path goes into the node's ``metadata_props`` under :data:`onnxslim.graph.names.MODULE_KEY`,
    read from what the exporter left: the dynamo exporter's ``pkg.torch.onnx.name_scopes`` property,
    the TorchScript exporter's scoped node names (``/layer1/layer1.0/conv1/Conv``). A BatchNorm folded
    into its conv is named by the conv (the exporters disagree on which of the two they keep), and
    the ``.module`` of a masked site's wrapper is dropped: ``features.conv1``, ``layer2.0.conv1``.
    """
    names = _user_module_names(model, example_input)
    masks = {names[name] for name, module in model.named_modules() if isinstance(module, ChannelMask) and name in names}
    count = 0
    for node in proto.graph.node:
        if node.op_type not in _PRODUCER_OPS and node.op_type != "Mul":
            continue
        path = next(filter(None, (_lookup(names, scope) for scope in reversed(_exporter_scopes(node)))), None)
        if node.op_type == "Mul" and path not in masks:
            continue  # a mask's Mul is named by its ChannelMask (slim's kept-channel lines), other Muls are not
        if path:
            for index in [i for i, prop in enumerate(node.metadata_props) if prop.key == MODULE_KEY][::-1]:
                del node.metadata_props[index]
            node.metadata_props.add(key=MODULE_KEY, value=path)
            count += 1
    return count


_PRODUCER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _user_module_names(model: nn.Module, example_input: torch.Tensor) -> dict[str, str]:
    """Qualified module name -> the name its user knows (conv for its folded BN, no MaskedSite ``.module``)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    wrappers = {name for name, module in modules.items() if isinstance(module, MaskedSite)}
    try:
        producers = analyze_coupling(model, example_input).producers.values()
        conv_of_norm = {producer.norm: producer.name for producer in producers if producer.norm}
    except OnnxSlimError:  # not traceable: the exporters' own scopes still name most layers
        conv_of_norm = {}

    def clean(name: str) -> str:
        parts = name.split(".")
        return ".".join(p for i, p in enumerate(parts) if not (p == "module" and ".".join(parts[:i]) in wrappers))

    return {name: clean(conv_of_norm.get(name, name)) for name in modules if name}


def _lookup(names: dict[str, str], scope: str) -> str | None:
    """The user's name for ``scope``: a qualified name, or the unique one it ends (the TorchScript exporter
    scopes a module reached through a ModuleList/ModuleDict index relative to the module that called it)."""
    if scope in names:
        return names[scope]
    found = {user for name, user in names.items() if name.endswith("." + scope)}
    return found.pop() if len(found) == 1 else None


def _exporter_scopes(node: onnx.NodeProto) -> list[str]:
    """The module scopes (outermost first) the exporter recorded for ``node``."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":  # dynamo: "['', 'features', 'features.conv1', 'conv2d']"
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(scope) for scope in scopes] if isinstance(scopes, list) else []
    # TorchScript: "/layer1/layer1.0/conv1/Conv", "/s1/s1.0/proj/proj.0/Conv": each part is named relative to
    # the module whose forward called it, so a part that extends the previous *part* (a container's child,
    # "proj" -> "proj.0") extends the previous scope, and any other part is an attribute of it
    scopes: list[str] = []
    previous = ""
    for part in node.name.split("/")[1:-1]:
        if not scopes:
            scopes.append(part)
        elif part.startswith(previous + "."):
            scopes.append(scopes[-1] + part[len(previous):])
        else:
            scopes.append(f"{scopes[-1]}.{part}")
        previous = part
    return scopes


def _inline_identity_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Identity(initializer)`` nodes by the initializer itself.

    The TorchScript exporter de-duplicates equal constants (e.g. two masks with the same values) through
    Identity nodes; reading the constant directly keeps every mask a ``Mul`` by an initializer.
    """
    initializers = {init.name for init in model.graph.initializer}
    outputs = {out.name for out in model.graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    if not alias:
        return model
    for node in kept:
        for index, name in enumerate(node.input):
            if name in alias:
                node.input[index] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _compare_with_onnxruntime(path: Path, example_input: torch.Tensor, reference: torch.Tensor,
                              input_name: str) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {input_name: example_input.numpy()})[:1]
    expected = reference.detach().cpu().numpy()
    if output.shape != expected.shape:
        raise OnnxSlimError(f"{path}: onnxruntime output shape {output.shape} != PyTorch {expected.shape}")
    return float(np.max(np.abs(output - expected))) if output.size else 0.0


def count_mask_nodes(model: onnx.ModelProto) -> int:
    """``Mul`` nodes whose second factor is a constant of shape [1,C,1,1], [C,1,1], [1,C] or [C] (C > 1)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
    count = 0
    for node in model.graph.node:
        if node.op_type != "Mul":
            continue
        for name in node.input:
            dims = shapes.get(name)
            if dims and max(dims) > 1 and sum(1 for d in dims if d != 1) == 1 and \
                    (len(dims) == 1 or dims[0] == 1 or len(dims) == 3):
                count += 1
                break
    return count
