"""Record or compare the channel counts that ``slim`` produces on every graph of the test suites.

Runs the given test modules under pytest with a plugin that wraps :func:`onnxslim.graph.slim.slim` and
records, per call, every channel-creating layer's (node, op, channels before, channels after). Calls are
keyed by the test's node id and the call's number within that test, so the record of one commit can be
compared with another's: a refactoring of the engine must leave every count unchanged.

    # record the counts of some commit (PYTHONPATH chooses the onnxslim that runs)
    PYTHONPATH=/path/to/checkout python tools/channel_counts.py record tests/fixtures/channel_counts_921edcf.json
    # compare the current tree with a record; prints every difference, exit code 1 when any
    PYTHONPATH=. python tools/channel_counts.py compare tests/fixtures/channel_counts_921edcf.json

``tests/fixtures/channel_counts_921edcf.json`` was recorded from commit 921edcf (before the rule set
refactoring of issue #10) with the default test modules below; compare a later tree with it to show that a
refactoring kept every count (changes that delete more channels on purpose show up as differences too).
Hypothesis runs with a fixed seed. Measured for the refactoring alone (commit 944c88d, in a checkout of
it): ``compare`` -> "compared 182 of 182 recorded slim calls: 0 differ".
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pytest

DEFAULT_TESTS = ("tests/test_rules.py", "tests/test_thirdparty.py", "tests/test_graph_cli.py",
                 "tests/test_random_graphs.py", "tests/test_torch_exports.py", "tests/test_zoo.py")


class _Recorder:
    """pytest plugin: wraps ``slim`` before the test modules import it, records every call."""

    def __init__(self) -> None:
        self.calls: dict[str, list] = {}
        self._count: dict[str, int] = {}

    def pytest_configure(self, config) -> None:
        import onnxslim.graph.slim as slim_module

        original = slim_module.slim

        def recording_slim(*args, **kwargs):
            model, report = original(*args, **kwargs)
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
            number = self._count.get(test, 0)
            self._count[test] = number + 1
            self.calls[f"{test}#{number}"] = [[layer.node, layer.op_type, layer.channels_before,
                                               layer.channels_after] for layer in report.layers]
            return model, report

        slim_module.slim = recording_slim


def record(tests: list[str]) -> dict[str, list]:
    """Run ``tests`` (paths) and return {call key: [[node, op, before, after], ...]}."""
    recorder = _Recorder()
    code = pytest.main(["-q", "-n", "0", "-p", "no:cacheprovider", "--hypothesis-seed=0", *tests],
                       plugins=[recorder])
    if code not in (0, 1):  # 1: some tests failed; their recorded calls still count
        raise SystemExit(f"error: pytest exited with {code}")
    return recorder.calls


def compare(reference: dict[str, list], current: dict[str, list], tests: list[str] | None = None) -> list[str]:
    """Differences for every recorded call of the test files ``tests`` (all when None): changed layer
    counts, and calls no longer made."""
    problems = []
    for key, layers in sorted(reference.items()):
        if tests is not None and not any(key.startswith(f"{path}::") for path in tests):
            continue
        if key not in current:
            problems.append(f"{key}: not run now")
        elif current[key] != layers:
            changed = [f"{a} -> {b}" for a, b in zip(layers, current[key]) if a != b]
            if len(layers) != len(current[key]):
                changed.append(f"{len(layers)} layers -> {len(current[key])}")
            problems.append(f"{key}: " + "; ".join(changed))
    return problems


def _fixture(path: Path) -> dict:
    """The recorded calls of ``path``; :class:`OnnxSlimError` when it is missing or not a JSON object
    (before: a traceback, after every test had run)."""
    from onnxslim.errors import OnnxSlimError

    try:
        reference = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OnnxSlimError(f"cannot read the fixture {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    if not isinstance(reference, dict):
        raise OnnxSlimError(f"the fixture {path} is not a recording of this tool (a JSON object)")
    return reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("fixture", type=Path)
    parser.add_argument("tests", nargs="*", default=list(DEFAULT_TESTS))
    args = parser.parse_args(argv)
    reference = _fixture(args.fixture) if args.action == "compare" else None  # before the tests run (minutes)
    calls = record(args.tests)
    if args.action == "record":
        args.fixture.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.fixture.parent, delete=False, suffix=".tmp") as handle:
            json.dump(calls, handle, indent=0, sort_keys=True)
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, args.fixture)
        print(f"recorded {len(calls)} slim calls into {args.fixture}")
        return 0
    problems = compare(reference, calls, args.tests)
    for line in problems:
        print(line)
    print(f"compared {len(set(reference) & set(calls))} of {len(reference)} recorded slim calls: "
          f"{len(problems)} differ")
    return 1 if problems else 0


if __name__ == "__main__":
    from onnxslim.errors import run_main

    run_main(main)
