"""ORT-format (``.ort``) conversion and onnxruntime's mobile-usability check, with onnxruntime's own tools.

* Conversion: ``python -m onnxruntime.tools.convert_onnx_models_to_ort --optimization_style Fixed``,
  i.e. the model is optimised at level "all" and saved in the flatbuffer ORT format used by
  onnxruntime-mobile / minimal builds. Without ``--target_platform amd64`` the tool leaves out the
  x86-only NCHWc layout transformer, so the ``.ort`` file is the one an ARM phone would run.
* Usability: ``python -m onnxruntime.tools.check_onnx_model_mobile_usability`` reports whether the
  NNAPI (Android) and CoreML (iOS) execution providers could take the model's nodes; its log is kept
  verbatim for the report.

Both run as child processes of the current interpreter, so their logging set-up and prints stay out
of this process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from onnxslim.errors import OnnxSlimError
from onnxslim.validate.runtime import ModelSource, model_name


@dataclasses.dataclass(frozen=True)
class MobileArtifact:
    """One model prepared for the mobile benchmark."""

    source: str
    ort_path: str
    onnx_size_bytes: int
    ort_size_bytes: int
    conversion_log: str
    usability_log: str


def _tool_available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _require_tool(module: str) -> None:
    if not _tool_available(module):
        import onnxruntime as ort

        raise OnnxSlimError(f"the installed onnxruntime {ort.__version__} has no {module}; "
                            "--mobile needs onnxruntime's Python tools (the full onnxruntime package)")


def _as_onnx_file(model: ModelSource, folder: Path, index: int) -> Path:
    """A path ending in ``.onnx`` for the conversion tool (it only takes files with that suffix)."""
    if isinstance(model, onnx.ModelProto):
        path = folder / f"{model_name(model, index)}.onnx"
        path.write_bytes(model.SerializeToString())
        return path
    path = Path(model)
    if not path.is_file():
        raise OnnxSlimError(f"model not found: {path}")
    if path.suffix.lower() == ".onnx":
        return path.resolve()
    link = folder / f"{path.stem}.onnx"
    shutil.copyfile(path, link)
    return link


def convert_to_ort(model: ModelSource, output_dir: str | os.PathLike, index: int = 0,
                   stem: str | None = None) -> tuple[Path, str]:
    """Convert to ``<output_dir>/<stem>.ort`` (the model's own stem by default); returns the path and the log.

    The conversion runs in a temporary folder inside ``output_dir`` and the file is renamed into place.
    """
    module = "onnxruntime.tools.convert_onnx_models_to_ort"
    _require_tool(module)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ort-convert-", dir=output_dir) as tmp:
        tmp_path = Path(tmp)
        source = _as_onnx_file(model, tmp_path, index)
        converted_dir = tmp_path / "out"
        command = [sys.executable, "-m", module, "--optimization_style", "Fixed", "--output_dir",
                   str(converted_dir), str(source)]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        log = (completed.stdout + completed.stderr).strip()
        produced = sorted(converted_dir.glob("*.ort")) if converted_dir.exists() else []
        if completed.returncode != 0 or not produced:
            last = log.splitlines()[-1] if log else "no output"
            raise OnnxSlimError(f"{source.name}: ORT-format conversion failed ({last[:300]})")
        target = output_dir / f"{stem or source.stem}.ort"
        os.replace(produced[0], target)
    return target, log


def check_mobile_usability(model: ModelSource) -> str:
    """The log of onnxruntime's mobile-usability checker for an ONNX model (NNAPI / CoreML suitability)."""
    module = "onnxruntime.tools.check_onnx_model_mobile_usability"
    _require_tool(module)
    with tempfile.TemporaryDirectory(prefix="onnxslim-usability-") as tmp:
        source = _as_onnx_file(model, Path(tmp), 0)
        completed = subprocess.run([sys.executable, "-m", module, "--log_level", "info", str(source)],
                                   capture_output=True, text=True, timeout=1800)
    log = (completed.stdout + completed.stderr).strip()
    if completed.returncode != 0:
        last = log.splitlines()[-1] if log else "no output"
        raise OnnxSlimError(f"mobile usability check failed for {source.name} ({last[:300]})")
    return log


def usability_summary(log: str) -> list[str]:
    """The verdict lines of a usability log ("Model should perform well with NNAPI as is: NO", ...)."""
    keep = ("Model should perform well with", "recommended to compare", "should be used with the CPU EP")
    lines = []
    for line in log.splitlines():
        text = line.split(":", 1)[1].strip() if line.startswith(("INFO:", "WARNING:")) else line.strip()
        if any(k in text for k in keep):
            lines.append(text)
    return lines


def fixed_shape_advice(model: ModelSource, log: str) -> str | None:
    """A command that fixes the model's dynamic input dims, when the usability log says it would help.

    Dynamic dims become 1 (the phone's batch); returns None when every input is static or the log
    does not ask for fixed shapes.
    """
    if "if modified to have fixed input shapes: YES" not in log and \
            "if modified to have fixed input shapes: MAYBE" not in log:
        return None
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    fixes = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            shape = ",".join(str(d.dim_value) if d.HasField("dim_value") else "1" for d in dims)
            fixes.append((value.name, shape))
    if not fixes:
        return None
    source = Path(model_name(model) if isinstance(model, onnx.ModelProto) else model)
    target = source.with_name(f"{source.stem}_static{source.suffix or '.onnx'}")
    commands = [f"python -m onnxruntime.tools.make_dynamic_shape_fixed --input_name {name} --input_shape {shape} "
                f"{source} {target}" for name, shape in fixes]
    return ("dynamic input shapes keep NNAPI/CoreML from running it; fix them with: " + " && ".join(commands)
            + " (or re-export with `onnxslim export --static-batch`)")


def prepare_mobile(models: list[ModelSource], output_dir: str | os.PathLike) -> list[MobileArtifact]:
    """Convert every model to ``.ort`` in ``output_dir`` and run the usability check on each."""
    artifacts = []
    used: set[str] = set()
    for index, model in enumerate(models):
        if not isinstance(model, onnx.ModelProto) and Path(model).suffix.lower() == ".ort":
            raise OnnxSlimError(f"{model}: already in ORT format; --mobile takes .onnx models")
        stem = Path(model_name(model, index)).stem
        if stem in used:  # two inputs named alike (runs/a/model.onnx, runs/b/model.onnx)
            stem = f"{stem}-{index}"
        used.add(stem)
        ort_path, conversion_log = convert_to_ort(model, output_dir, index, stem)
        usability = check_mobile_usability(model)
        onnx_size = model.ByteSize() if isinstance(model, onnx.ModelProto) else Path(model).stat().st_size
        artifacts.append(MobileArtifact(model_name(model, index), str(ort_path), onnx_size,
                                        ort_path.stat().st_size, conversion_log, usability))
    return artifacts
