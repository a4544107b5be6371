"""User-facing errors.

Anything the user can cause (a missing file, a malformed model, an impossible option) raises
:class:`OnnxSlimError` with a one-line message; the CLI prints it and exits with code 2.
"""


class OnnxSlimError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""
