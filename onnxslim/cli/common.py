"""What every ``onnxslim`` command shares: path parameters that know whether they are read or written,
and a command class that checks outputs against inputs before the command runs.

A parameter typed :func:`input_path` is read; :func:`output_path` is written (a file, or a folder with
the file names written into it); :func:`input_spec` is a string (a data spec such as ``mnist:32``) that
is an input when it names an existing file. :class:`Command` refuses, before any work, an output that
resolves to an input or to another output (symlinks and hard links followed): one ``error:`` line, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from onnxslim.errors import OnnxSlimError
from onnxslim.io import check_distinct_paths, small_model_data_files


class _RolePath(click.Path):
    def __init__(self, role: str, writes: tuple[str, ...] = (), beside: tuple[str, ...] = (), **kwargs: Any):
        super().__init__(path_type=Path, **kwargs)
        self.role = role
        self.writes = writes
        self.beside = beside

    def convert(self, value, param, ctx):
        """Refuse an option of the command where a file written was expected: click hands ``--json
        --no-verify-speed`` the option's name as the file, and the run then wrote a file named
        ``--no-verify-speed`` (``./--name`` still means such a file)."""
        if self.role == "output" and isinstance(value, str) and ctx is not None \
                and any(value in [*other.opts, *other.secondary_opts] for other in ctx.command.params):
            self.fail(f"needs a file name, got {value!r}, an option of this command (its file name is missing)",
                      param, ctx)
        return super().convert(value, param, ctx)


class _InputSpec(click.ParamType):
    name = "spec"
    role = "input"
    writes: tuple[str, ...] = ()

    def convert(self, value, param, ctx):
        return value


def input_path(**kwargs: Any) -> click.Path:
    """A path the command reads (``click.Path`` options: ``dir_okay`` and so on)."""
    return _RolePath("input", **kwargs)


def output_path(writes: tuple[str, ...] = (), **kwargs: Any) -> click.Path:
    """A path the command writes; for a folder, ``writes`` lists the file names written into it."""
    return _RolePath("output", writes, **kwargs)


def model_output_path(**kwargs: Any) -> click.Path:
    """An ONNX file the command writes; a big model's weights go to ``<name>.data`` beside it."""
    return _RolePath("output", beside=(".data",), **kwargs)


def input_spec() -> click.ParamType:
    """A string option that is an input file when it names one (``--data x.npz``, ``--data mnist``)."""
    return _InputSpec()


class Command(click.Command):
    """A click command whose outputs are checked against its inputs and each other before it runs."""

    def invoke(self, ctx: click.Context) -> Any:
        inputs, outputs = [], []
        for param in self.params:
            role = getattr(param.type, "role", None)
            if role is None:
                continue
            label = param.opts[-1] if param.param_type_name == "option" else param.human_readable_name.strip("[].")
            for value in _values(ctx.params.get(param.name)):
                path = Path(value)
                if role == "input":
                    if isinstance(param.type, _InputSpec) and not path.is_file():
                        continue
                    inputs.append((label, path))
                    inputs.extend((f"{label}'s external data", data) for data in small_model_data_files(path))
                else:
                    outputs.append((label, path))
                    outputs.extend((label, path / name) for name in param.type.writes)
                    outputs.extend((f"{label}'s external data", path.with_name(path.name + suffix))
                                   for suffix in getattr(param.type, "beside", ()))
        check_distinct_paths(inputs, outputs)
        return super().invoke(ctx)


def _values(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (tuple, list)):
        return [v for v in value if v is not None]
    return [value]


def single_output(positional: Path | None, option: Path | None) -> Path:
    """The output file given either as the OUT argument (``slim IN OUT``) or as ``-o OUT``."""
    if positional is not None and option is not None and positional != option:
        raise OnnxSlimError(f"two outputs given ({positional} and -o {option}); give one")
    output = positional or option
    if output is None:
        raise OnnxSlimError("missing the output: give it as OUT (after the input) or with -o OUT")
    return output
