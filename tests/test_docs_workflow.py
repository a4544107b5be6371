"""The example CI workflow in docs/ci/model-gate.yml: its gate step's commands run as written."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "ci" / "model-gate.yml"
STEP = "Export, slim and gate"


def step_script(text: str, step_name: str) -> str:
    """The ``run: |`` block of the named step (a minimal reader for this file; no YAML library needed)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"- name: {step_name}")
    run = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "run: |")
    block = []
    indent = None
    for line in lines[run + 1:]:
        if line.strip() and indent is None:
            indent = len(line) - len(line.lstrip())
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        block.append(line[indent:] if line.strip() else "")
    return "\n".join(block).strip() + "\n"


def test_workflow_names_the_step_and_its_environment():
    text = WORKFLOW.read_text()
    script = step_script(text, STEP)
    assert [line.split()[1] for line in script.splitlines() if line.startswith("onnxslim ")] == \
        ["train", "export", "slim", "check"]
    assert "GATE_DIR: build/gate" in text


@pytest.mark.slow
def test_gate_step_runs_as_written(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `python` and `onnxslim` as a fresh runner would have them after `pip install -e .`
    for name, command in (("python", f'exec "{sys.executable}" "$@"'),
                          ("onnxslim", f'exec "{sys.executable}" -m onnxslim "$@"')):
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\n{command}\n")
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    gate_dir = tmp_path / "gate"
    summary = tmp_path / "step-summary.md"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GATE_DIR": str(gate_dir),
           "GITHUB_STEP_SUMMARY": str(summary),
           "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    script = step_script(WORKFLOW.read_text(), STEP)
    completed = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert (gate_dir / "slim.onnx").stat().st_size < (gate_dir / "masked.onnx").stat().st_size
    assert (gate_dir / "report" / "check.md").read_text().startswith("## onnxslim check: PASS")
    assert "## onnxslim check: PASS" in summary.read_text()
