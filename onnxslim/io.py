"""Atomic file output: every artefact is written to a temporary file in the target folder, then renamed.

A crash or Ctrl-C therefore never leaves a half-written model, report or checkpoint behind, and the
input file is never opened for writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import onnx

# Protobuf cannot serialise a single message over 2 GiB; above this size weights go to a side file.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_with_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` produce a file at a temporary path (e.g. ``torch.save``), then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Serialise ``model`` to ``path`` atomically; returns the file size in bytes.

    Models beyond protobuf's 2 GiB limit are written with their weights in ``<name>.data`` beside them.
    """
    from onnxslim.graph.model import serialized_size

    path = Path(path)
    if serialized_size(model) > _EXTERNAL_DATA_THRESHOLD:
        data_name = path.name + ".data"

        def _write(tmp: Path) -> None:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)

        write_with_atomic(path, _write)
        return path.stat().st_size + (path.parent / data_name).stat().st_size
    data = model.SerializeToString()
    write_bytes_atomic(path, data)
    return len(data)


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays show up in reports; turn them into plain JSON values
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
