"""User-facing errors.

Anything the user can cause (a missing file, a malformed model, an impossible option) raises
:class:`OnnxSlimError` with a one-line message; the CLI prints it and exits with code 2, and so do the
scripts under ``tools/`` through :func:`run_main`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class OnnxSlimError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's ``main()`` and exit with its return code (0 for None); an :class:`OnnxSlimError`
    becomes ``error: <message>`` on stderr and exit code 2, as in the CLI, instead of a traceback."""
    try:
        code = main()
    except OnnxSlimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


def parse_numbers(option: str, text: str, kind: type = float, sep: str = ",", count: int | None = None) -> list:
    """The ``sep``-separated values of a script's ``option`` as ``kind`` (int or float), ``count`` of them
    when given. Raises :class:`OnnxSlimError` (one ``error:`` line, exit 2 through :func:`run_main`) for a
    malformed value or a wrong count, instead of a ValueError traceback."""
    try:
        values = [kind(v) for v in text.split(sep)]
    except ValueError:
        values = None
    if values is None or (count is not None and len(values) != count):
        many = f"{count} " if count is not None else ""
        raise OnnxSlimError(f"{option} takes {many}{sep!r}-separated {kind.__name__}s, got {text!r}")
    return values

