"""File input and output: atomic writes, safe reads of ONNX files, and the output-versus-input check.

Writing: every artefact is written to a temporary file in the target folder, then renamed, so a crash,
Ctrl-C or SIGTERM never leaves a half-written model, report or checkpoint under its final name, and an
input file is never opened for writing. Temporary names start with :data:`TEMP_PREFIX` and carry the
writer's process id (``.onnxslim-tmp-<pid>-<name>.<random>``): the next write into the same folder
removes those of processes that no longer run (a SIGKILLed run). Files get the mode the umask gives
(``0666 & ~umask``), as ``open()`` would. Models beyond protobuf's 2 GiB limit are written with their
weights in ``<name>.data``: model and data are produced in a private temporary folder and both renamed
into place, so an existing ``.data`` file is replaced, never appended to. An OS error on the way (disk
full, read-only folder, a file where a folder should be) is an :class:`OnnxSlimError` naming the path.

Reading: :func:`load_onnx` loads a model and its external data and checks every initializer's byte
count against its dims; :func:`check_distinct_paths` refuses outputs that are an input or each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx

from onnxslim.errors import OnnxSlimError

# Protobuf cannot serialise a single message over 2 GiB; above this size weights go to a side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
TEMP_PREFIX = ".onnxslim-tmp-"
_NAME_LIMIT = 120  # characters of the final name kept in a temporary name (file names max out at 255)


# -- writing ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one rename.

    Raises :class:`OnnxSlimError` on an OS error (the temporary file is removed first).
    """
    path = Path(path)
    with _temporary(path) as tmp:
        with _os_errors(path), open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _replace(tmp, path)


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
    with _temporary(path) as tmp:
        with _os_errors(path):
            writer(tmp)
        _replace(tmp, path)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike,
                      external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> int:
    """Serialise ``model`` to ``path`` atomically; returns the bytes written (model plus external data).

    Models whose serialised size exceeds ``external_threshold`` bytes are written with their weights
    (tensors of 1 KiB and more) in ``<name>.data`` beside them; ``model`` keeps its weights in memory.
    """
    from onnxslim.graph.model import serialized_size

    path = Path(path)
    if serialized_size(model) <= external_threshold:
        data = model.SerializeToString()
        write_bytes_atomic(path, data)
        return len(data)
    data_name = path.name + ".data"
    folder = _prepare_folder(path)
    with _os_errors(path):
        staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=folder))
    try:
        with _os_errors(path):
            onnx.save_model(model, str(staging / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            for name in (data_name, path.name):  # the data first: a model never names missing data
                if (staging / name).exists():
                    _apply_umask(staging / name)
                    os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # onnx.save_model moved the weights out of the protos; bring them back for the caller
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(folder))
    return path_size_with_data(path)


def _temp_prefix(path: Path) -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{path.name[:_NAME_LIMIT]}."


def check_replaceable(path: str | os.PathLike, folder_ok: bool = False) -> None:
    """Refuse (:class:`OnnxSlimError`) an output path that names a device, a FIFO or a socket
    (``/dev/null``): the final rename would replace it with a regular file. A missing path, a regular
    file and a symlink (the rename replaces the link, never its target) are fine; a folder is fine when
    ``folder_ok`` (outputs that are folders)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return
    kind = "a folder" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
    raise OnnxSlimError(f"cannot write {path}: it is {kind}, not a regular file (writing renames a new file "
                        f"over it)")


def _prepare_folder(path: Path) -> Path:
    """Check that ``path`` may be replaced, create its folder and remove stray temporary files of dead
    writers from it."""
    check_replaceable(path, folder_ok=True)  # a folder: os.replace fails on it and says so
    folder = path.parent
    with _os_errors(path):
        folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    return folder


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    folder = _prepare_folder(path)
    with _os_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=folder)
        os.close(fd)
        _apply_umask(Path(tmp))
    try:
        yield Path(tmp)
    except BaseException:  # includes KeyboardInterrupt and the SystemExit of the CLI's SIGTERM handler
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _replace(tmp: Path, path: Path) -> None:
    with _os_errors(path):
        os.replace(tmp, path)


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise OnnxSlimError(f"cannot write {path}: {reason}") from None


def _apply_umask(path: Path) -> None:
    """``mkstemp`` creates files 0600; give them the mode ``open()`` would (0666 minus the umask)."""
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove ``TEMP_PREFIX`` files and folders in ``folder`` whose writing process no longer runs.

    Returns the removed paths. Temporaries of running processes (other runs into the same folder) are
    left alone; anything that cannot be removed is skipped.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            pid = _temporary_owner(entry.name)
            if pid is None or _process_alive(pid):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _temporary_owner(name: str) -> int | None:
    if not name.startswith(TEMP_PREFIX):
        return None
    pid = name[len(TEMP_PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays show up in reports; turn them into plain JSON values
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# -- reading ----------------------------------------------------------------------------------------
def external_data_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    """The distinct external-data files ``model``'s initializers name (relative to ``folder``)."""
    locations = {entry.value for tensor in model.graph.initializer
                 if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return [folder / location for location in sorted(locations)]


def small_model_data_files(path: str | os.PathLike, limit: int = 64 << 20) -> list[Path]:
    """The external-data files an ONNX file names, read only when the file is small (a model with its
    weights outside is); [] for other files and for unreadable ones."""
    path = Path(path)
    try:
        if path.suffix.lower() != ".onnx" or not path.is_file() or path.stat().st_size > limit:
            return []
        return external_data_files(onnx.load(str(path), load_external_data=False), path.parent)
    except Exception:  # noqa: BLE001 - not a model: the command reports it when it reads the file
        return []


def path_size_with_data(path: str | os.PathLike) -> int:
    """Bytes on disk of an ONNX file plus the external-data files it names (absent ones count 0)."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix.lower() == ".ort":
        return size
    try:
        skeleton = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable: the loader that follows reports it
        return size
    return size + sum(f.stat().st_size for f in external_data_files(skeleton, path.parent) if f.is_file())


def load_onnx(path: str | os.PathLike) -> tuple[onnx.ModelProto, int]:
    """Load an ONNX file with its external data; returns the model and its bytes on disk (data included).

    Raises :class:`OnnxSlimError` for a missing file, an unparseable one, external data that is missing,
    outside the model's folder or shorter than its tensor, and any initializer whose bytes do not match
    its dims and element type.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxSlimError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise OnnxSlimError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    files = external_data_files(model, path.parent)
    if files:
        _load_external(model, path)
    check_initializer_sizes(model, str(path))
    return model, path.stat().st_size + sum(f.stat().st_size for f in files)


def _load_external(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model

    folder = path.parent.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        target = (folder / info.get("location", "")).resolve()
        if folder not in target.parents:
            raise OnnxSlimError(f"{path}: initializer {tensor.name!r} names external data outside the model's "
                                f"folder ({info.get('location')})")
        if not target.is_file():
            raise OnnxSlimError(f"{path}: external data file {info.get('location')} of initializer "
                                f"{tensor.name!r} not found")
        try:
            offset, length = (int(info.get(key, 0) or 0) for key in ("offset", "length"))
        except ValueError:
            offset = length = -1
        if offset < 0 or length < 0:
            raise OnnxSlimError(f"{path}: initializer {tensor.name!r} has a bad external data offset or length "
                                f"({info.get('offset')!r}, {info.get('length')!r}); expected integers >= 0")
        end = offset + length
        if end > target.stat().st_size:
            raise OnnxSlimError(f"{path}: external data file {info.get('location')} is shorter than initializer "
                                f"{tensor.name!r} ({target.stat().st_size} bytes, needs {end})")
    try:
        load_external_data_for_model(model, str(folder))
    except Exception as exc:  # noqa: BLE001 - onnx raises ValueError/OSError for bad entries
        raise OnnxSlimError(f"{path}: cannot read its external data ({str(exc).splitlines()[0]})") from None


def check_initializer_sizes(model: onnx.ModelProto, where: str) -> None:
    """Raise :class:`OnnxSlimError` when an initializer's stored values do not fill its dims exactly."""
    for tensor in model.graph.initializer:
        if any(d < 0 for d in tensor.dims):
            raise OnnxSlimError(f"{where}: initializer {tensor.name!r} has negative dims {list(tensor.dims)}")
        expected = int(np.prod(tensor.dims, dtype=np.int64))
        found = _stored_elements(tensor)
        if found is not None and found != expected:
            raise OnnxSlimError(f"{where}: initializer {tensor.name!r} holds {found} values but its dims "
                                f"{list(tensor.dims)} need {expected}")


def _stored_elements(tensor: onnx.TensorProto) -> int | None:
    """Elements the tensor's data holds (None when it cannot be told: strings, unknown types)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    if tensor.data_type in _SUB_BYTE_TYPES:  # 4-bit types pack two values per byte (or per int32_data entry)
        return None
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) % itemsize:
            return -1
        return len(tensor.raw_data) // itemsize
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        values = len(getattr(tensor, field))
        if values:
            complex_pair = tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
            return values // 2 if complex_pair else values
    return 0 if tensor.data_location != onnx.TensorProto.EXTERNAL else None


_SUB_BYTE_TYPES = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                   if hasattr(onnx.TensorProto, name)}


# -- the output-versus-input check -----------------------------------------------------------------
def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal after resolving symlinks, or hard links of one inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct_paths(inputs: Sequence[tuple[str, Path]], outputs: Sequence[tuple[str, Path]]) -> None:
    """Refuse (``OnnxSlimError``) an output that is an input, two outputs that are one file, or an output
    on a device, FIFO or socket (:func:`check_replaceable`).

    ``inputs`` and ``outputs`` are ``(label, path)`` pairs; labels name the option in the message.
    Called before anything is written.
    """
    for index, (label, path) in enumerate(outputs):
        check_replaceable(path, folder_ok=True)
        for in_label, source in inputs:
            if same_file(path, source):
                raise OnnxSlimError(f"{label} {path} is the input {in_label} {source}; refusing to overwrite it")
        for other_label, other in outputs[:index]:
            if same_file(path, other):
                raise OnnxSlimError(f"{label} {path} and {other_label} {other} are the same file; give each "
                                    f"output its own path")


def pairs(label: str, paths: Iterable[Path | None]) -> list[tuple[str, Path]]:
    """``(label, path)`` for each given path (None skipped)."""
    return [(label, Path(p)) for p in paths if p is not None]
