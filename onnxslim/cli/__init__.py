"""The ``onnxslim`` command line: a thin click layer over the Python API.

Commands live in one module per area and are imported only when invoked, so ``onnxslim slim`` never
pays for importing torch. Errors the user can cause are :class:`~onnxslim.errors.OnnxSlimError` (and
onnxruntime's errors running a model), and click's own usage errors (a bad option value, a folder given as
MODEL, a missing argument) are reported the same way: one ``error: ...`` line on stderr and exit code 2; ``check`` uses 1 for a failed gate.
SIGTERM (CI cancellation, ``timeout``, ``docker stop``) unwinds like Ctrl-C, so partly written temporary
files are removed; the process then exits with 128 + 15.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
from collections.abc import Iterator

import click

from onnxslim import __version__
from onnxslim.errors import OnnxSlimError

# command name -> "module:attribute"; one module per area so that areas never edit the same file
_COMMANDS = {
    "run": "onnxslim.cli.training_cmds:run",
    "train": "onnxslim.cli.training_cmds:train",
    "export": "onnxslim.cli.training_cmds:export",
    "slim": "onnxslim.cli.graph_cmds:slim",
    "prune": "onnxslim.cli.graph_cmds:prune",
    "inspect": "onnxslim.cli.graph_cmds:inspect",
    "bench": "onnxslim.cli.validate_cmds:bench",
    "check": "onnxslim.cli.validate_cmds:check",
}

_SUMMARIES = {
    "run": "Run a recipe end to end: train, mask-train, export, slim, validate, report.",
    "train": "Train a zoo model (or your own factory) with channel masks and a sparsity method.",
    "export": "Export a trained checkpoint to ONNX with masks as per-channel Mul nodes.",
    "slim": "Delete provably-zero channels from an ONNX model (exactly equivalent output).",
    "prune": "Choose channels to remove by a criterion on any ONNX model, then slim.",
    "inspect": "Show channels, coupled groups, zero channels and barriers of an ONNX model.",
    "bench": "Measure onnxruntime latency of one or more models (interleaved A/B rounds).",
    "check": "CI gate: compare a candidate model with a reference; exit 1 when a threshold fails.",
}


# the module of onnxruntime's exception types (Fail, InvalidArgument, ...), all plain Exception subclasses
_ORT_ERRORS = "onnxruntime.capi.onnxruntime_pybind11_state"


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return _unavailable(name, module_name)
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # the summaries are static so that `onnxslim --help` does not import every command module
        with formatter.section("Commands"):
            formatter.write_dl([(name, _SUMMARIES[name]) for name in _COMMANDS])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OnnxSlimError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except OSError as exc:  # a file-system error no layer turned into a message (a folder that cannot be made)
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)
        except Exception as exc:
            if type(exc).__module__ != _ORT_ERRORS:
                raise
            # onnxruntime refused to run a model (a DequantizeLinear axis out of range ...): the model's fault
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            click.echo(f"error: onnxruntime cannot run the model: {first[:400]}", err=True)
            ctx.exit(2)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's ``main`` with usage errors as one ``error:`` line (exit 2) and SIGTERM as an unwind."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        with _sigterm_unwinds():
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.exceptions.NoArgsIsHelpError as exc:  # bare `onnxslim`: the help, as before
                exc.show()
                code = exc.exit_code
            except click.ClickException as exc:
                click.echo(f"error: {_one_line(exc.format_message())}", err=True)
                code = 2
            except click.exceptions.Abort:  # Ctrl-C: the shell's convention for SIGINT, 128 + 2
                click.echo("Aborted!", err=True)
                code = 130
        sys.exit(code if isinstance(code, int) else 0)


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the command runs, SIGTERM raises SystemExit(143), so ``finally``/``except`` blocks run."""
    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unavailable(name: str, module_name: str) -> click.Command:
    @click.command(name=name, help=_SUMMARIES[name], context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        raise OnnxSlimError(f"command '{name}' is not available in this build ({module_name} is missing)")

    return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxslim")
def main() -> None:
    """onnxslim: physically remove masked channels from CNNs and prove the result is equivalent.

    Note: an unrelated ONNX simplifier on PyPI also installs an `onnxslim` command; use a separate
    virtual environment.
    """
