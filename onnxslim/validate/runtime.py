"""onnxruntime sessions and inputs shared by accuracy, equivalence, benchmarking and the CI gate.

A model is a path (``.onnx`` or ``.ort``) or an in-memory :class:`onnx.ModelProto`. Input shapes come
from the session's input metadata; a dimension that is not a fixed number (a ``dim_param`` or unknown)
needs a value. The *leading* dimension of every input is treated as the batch dimension: when it is
dynamic it takes the requested batch size (1 by default). Any other dynamic dimension must be given
through ``input_shapes={"name": [1, 3, 224, 224]}``, otherwise :class:`OnnxSlimError` names it.

Random inputs are seeded per input (the seed mixed with the input's position), so two models with the
same input signature receive identical arrays.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxslim.errors import OnnxSlimError
from onnxslim.io import path_size_with_data

ModelSource = str | os.PathLike | onnx.ModelProto

OPT_LEVELS = ("disable", "basic", "extended", "all")

# short names accepted by --provider, mapped to onnxruntime's provider names
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
}

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """How to build an onnxruntime session: intra-op threads, graph optimisation level, providers;
    ``profile_prefix``: turn on onnxruntime's profiler, writing its trace to ``<prefix>_<time>.json``."""

    threads: int = 1
    opt_level: str = "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    profile_prefix: str | None = None


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output as onnxruntime reports it; ``shape`` entries are int, str or None."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


def model_name(source: ModelSource, index: int = 0) -> str:
    """A short display name: the file name for paths, the graph name (or ``model<i>``) for protos."""
    if isinstance(source, onnx.ModelProto):
        return source.graph.name or f"model{index}"
    return Path(source).name


def model_size_bytes(source: ModelSource) -> int:
    """Bytes on disk including external-data files; the serialised size for in-memory models."""
    if isinstance(source, onnx.ModelProto):
        return source.ByteSize()
    path = Path(source)
    if not path.is_file():
        raise OnnxSlimError(f"model not found: {path}")
    return path_size_with_data(path)


def resolve_providers(providers: Sequence[str]) -> tuple[str, ...]:
    """Map short names (``cpu``, ``xnnpack``) to onnxruntime's names; fail listing what is installed."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    resolved = []
    for name in providers:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise OnnxSlimError(
                f"execution provider {name!r} is not available in the installed onnxruntime "
                f"{ort.__version__}; available: {', '.join(available)}")
        resolved.append(full)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")  # fallback for nodes the chosen provider cannot run
    return tuple(resolved)


def make_session_options(options: SessionOptions):
    import onnxruntime as ort

    if options.opt_level not in OPT_LEVELS:
        raise OnnxSlimError(f"unknown graph optimisation level {options.opt_level!r}; use one of {', '.join(OPT_LEVELS)}")
    if options.threads < 0:
        raise OnnxSlimError(f"thread count must be >= 0 (0 = onnxruntime's default), got {options.threads}")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[options.opt_level]
    so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 4  # fatal only: warnings are noise, and an error is raised (and reported) anyway
    if options.profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = options.profile_prefix
    return so


def model_payload(source: ModelSource) -> str | bytes:
    """What ``InferenceSession`` takes: the path (so external data resolves) or the serialised proto."""
    if isinstance(source, onnx.ModelProto):
        return source.SerializeToString()
    path = Path(source)
    if not path.exists():
        raise OnnxSlimError(f"model not found: {path}")
    if not path.is_file():
        raise OnnxSlimError(f"not a model file: {path}")
    return str(path)


def create_session(source: ModelSource, options: SessionOptions = SessionOptions()):
    """An onnxruntime ``InferenceSession``; a file that is not a loadable model raises OnnxSlimError."""
    import onnxruntime as ort

    payload = model_payload(source)
    providers = resolve_providers(options.providers)
    try:
        return ort.InferenceSession(payload, sess_options=make_session_options(options), providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types for bad models
        label = payload if isinstance(payload, str) else model_name(source)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxSlimError(f"{label}: not a loadable ONNX model ({first_line[:300]})") from None


def input_specs(session) -> list[TensorSpec]:
    return [TensorSpec(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()]


def output_specs(session) -> list[TensorSpec]:
    return [TensorSpec(o.name, o.type, tuple(o.shape)) for o in session.get_outputs()]


def numpy_dtype(spec: TensorSpec):
    try:
        return _ORT_DTYPES[spec.dtype]
    except KeyError:
        raise OnnxSlimError(f"input {spec.name!r} has unsupported type {spec.dtype}") from None


def resolve_shapes(specs: Sequence[TensorSpec], overrides: Mapping[str, Sequence[int]] | None = None,
                   batch_size: int | None = None, label: str = "model") -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: overrides first, then the model's fixed dims; see the module docstring.

    ``batch_size`` replaces the leading dimension (a fixed leading dimension that differs is an error).
    """
    overrides = dict(overrides or {})
    known = {spec.name for spec in specs}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise OnnxSlimError(f"{label}: --input-shape names unknown input(s) {', '.join(unknown)}; "
                            f"inputs are {', '.join(sorted(known))}")
    shapes = {}
    for spec in specs:
        if spec.name in overrides:
            shape = [int(d) for d in overrides[spec.name]]
            if len(shape) != len(spec.shape):
                raise OnnxSlimError(f"{label}: input {spec.name!r} has rank {len(spec.shape)} "
                                    f"but the given shape {shape} has rank {len(shape)}")
            for axis, (given, declared) in enumerate(zip(shape, spec.shape)):
                if isinstance(declared, int) and declared != given and not (axis == 0 and batch_size):
                    raise OnnxSlimError(f"{label}: input {spec.name!r} has fixed dim {axis} = {declared}, "
                                        f"the given shape says {given}")
        else:
            shape = []
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, int) and dim > 0:
                    shape.append(dim)
                elif axis == 0:
                    shape.append(batch_size or 1)
                else:
                    example = _shape_example(spec.shape)
                    raise OnnxSlimError(
                        f"{label}: input {spec.name!r} has a dynamic dimension {axis} ({dim!r}) in shape "
                        f"{list(spec.shape)}; give its shape in numbers: --input-shape {spec.name}:{example} "
                        f"(input_shapes={{{spec.name!r}: [...]}} in Python)")
        if batch_size and shape:
            declared = spec.shape[0] if spec.shape else None
            if isinstance(declared, int) and declared > 0 and declared != batch_size:
                raise OnnxSlimError(f"{label}: input {spec.name!r} has a fixed batch size of {declared}; "
                                    f"batch size {batch_size} is not possible")
            shape[0] = batch_size
        if any(d <= 0 for d in shape):
            raise OnnxSlimError(f"{label}: input {spec.name!r} shape {shape} has a non-positive dimension")
        shapes[spec.name] = tuple(shape)
    return shapes


def _shape_example(shape: Sequence) -> str:
    """How ``--input-shape`` could spell ``shape`` (for a message): its static dims, 1 for a dynamic
    batch, each other dynamic dim by its name, or ``D<axis>`` where the name does not read as one
    (``?``, onnx's ``unk__3``, none)."""
    parts = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            parts.append(str(dim))
        elif axis == 0:
            parts.append("1")
        elif isinstance(dim, str) and dim.isidentifier() and not dim.startswith("unk__"):
            parts.append(dim)
        else:
            parts.append(f"D{axis}")
    return ",".join(parts)


def random_feeds(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]], seed: int = 0,
                 stream: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs: standard normal floats, small non-negative integers, random booleans.

    ``stream`` selects an independent draw for the same seed (the i-th random batch of a comparison).
    """
    feeds = {}
    for position, spec in enumerate(specs):
        rng = np.random.default_rng([seed, stream, position])
        dtype = numpy_dtype(spec)
        shape = tuple(shapes[spec.name])
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[spec.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds
