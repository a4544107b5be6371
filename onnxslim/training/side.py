"""Run one picklable function in a second process while the caller keeps working (two trainings side by side).

On a CPU with ``2k`` PyTorch threads, two independent small trainings (the pipeline's dense baseline and
its mask training) can run side by side with ``k`` threads each instead of one after the other with ``2k``.

:class:`SideProcess` runs ``fn(*args)`` in a fresh interpreter (``sys.executable``, started with
:mod:`subprocess`) with ``torch.set_num_threads(threads)``, the caller's ``sys.path`` and the caller's
oneDNN switch (``torch.backends.mkldnn.enabled``), so it computes as the caller would with that thread
count. The function and its arguments go to the child, and the result comes back, as pickle files in a
private temporary folder written by these two processes only (the child writes its result atomically),
so nothing blocks the caller while the child starts, and the caller's ``__main__`` is never re-imported
(unlike :mod:`multiprocessing`'s spawn, whose bootstrap re-runs a script without a ``__main__`` guard).
``fn`` must be importable by module and name.

Failures are one-line :class:`OnnxSlimError` from :meth:`SideProcess.result`: an :class:`OnnxSlimError`
raised in the child keeps its message, any other exception is named with its type and place, a crash
(segfault, kill) gives the exit code. Leaving the ``with`` block early terminates the child.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from onnxslim.errors import OnnxSlimError

# the child's first line: the caller's sys.path before anything of onnxslim is imported
_BOOT = ("import pickle, sys\nwith open(sys.argv[1], 'rb') as job:\n    sys.path[:] = pickle.load(job)\n"
         "    from onnxslim.training.side import child_main\n    child_main(job, sys.argv[2])\n")


def child_main(job: BinaryIO, result_path: str) -> None:
    """In the child: read ``(threads, mkldnn, fn, args)`` from ``job``, run ``fn``, write the outcome."""
    import torch

    try:
        threads, mkldnn, fn, args = pickle.load(job)
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn
        outcome = ("ok", fn(*args))
    except OnnxSlimError as exc:
        outcome = ("error", str(exc))
    except BaseException as exc:  # noqa: BLE001 - everything the child raises goes back as one line
        last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" at {last.filename}:{last.lineno}" if last else ""
        outcome = ("error", f"{type(exc).__name__}: {exc}{where}")
    partial = result_path + ".tmp"
    with open(partial, "wb") as handle:
        pickle.dump(outcome, handle)
    os.replace(partial, result_path)


class SideProcess:
    """``fn(*args)`` in a second process with ``threads`` PyTorch threads; ``what`` names it in errors.

    Use as a context manager::

        with SideProcess(train_baseline, (payload,), threads=1, what="the dense baseline") as side:
            train_masked()              # meanwhile, in this process
            baseline = side.result()    # waits; raises OnnxSlimError when the child failed
    """

    def __init__(self, fn: Callable[..., Any], args: tuple = (), *, threads: int = 1, what: str = "the side process"):
        if threads < 1:
            raise OnnxSlimError(f"{what}: threads must be >= 1, got {threads}")
        self.fn, self.args, self.threads, self.what = fn, args, threads, what
        self._folder: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> SideProcess:
        import torch

        self._folder = tempfile.TemporaryDirectory(prefix="onnxslim-side-")
        job = Path(self._folder.name) / "job.pkl"
        with job.open("wb") as handle:
            pickle.dump(list(sys.path), handle)
            pickle.dump((self.threads, torch.backends.mkldnn.enabled, self.fn, self.args), handle)
        self._proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(job), str(self._result_path)],
                                      stdin=subprocess.DEVNULL)
        return self

    @property
    def _result_path(self) -> Path:
        return Path(self._folder.name) / "result.pkl"

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        if self._proc is not None:
            self._proc.wait()
        if self._folder is not None:
            self._folder.cleanup()

    def result(self) -> Any:
        """Wait for the child and give back what ``fn`` returned; OnnxSlimError (one line) when it failed.

        The result file is unpickled: it was written by the child this object started, into a folder
        only this process and that child know (never data from elsewhere)."""
        code = self._proc.wait()
        if not self._result_path.exists():
            raise OnnxSlimError(f"{self.what}: its process ended without a result (exit code {code}: a crash or "
                                f"a kill)")
        with self._result_path.open("rb") as handle:
            status, value = pickle.load(handle)
        if status != "ok":
            raise OnnxSlimError(f"{self.what}: {value}")
        return value


__all__ = ["SideProcess", "child_main"]
