"""docs/own-loop.md: its example (a plain PyTorch loop over MaskController) runs as written, as one process
and under torchrun with 2 processes, and the slimmed model computes what the masked one computes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-loop.md"


def example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "own-loop.md has exactly one python example"
    return blocks[0]


def check_outputs(folder: Path) -> None:
    x = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)
    outputs = [ort.InferenceSession(str(folder / name)).run(None, {"input": x})[0]
               for name in ("masked.onnx", "slim.onnx")]
    assert np.abs(outputs[1] - outputs[0]).max() <= 1e-5 * max(1.0, float(np.abs(outputs[0]).max()))
    conv_channels = [node for node in onnx.load(str(folder / "slim.onnx")).graph.initializer if node.dims[:1]]
    assert conv_channels  # the slimmed file holds a real model


def test_own_loop_example_runs_and_slims_exactly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(example(), str(DOC), "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    pruned, channels, before, after = map(int, re.search(r"pruned (\d+) of (\d+) channels, params (\d+) -> (\d+)",
                                                         printed).groups())
    assert 0 < pruned < channels and after < before  # the loop made zeros and slim deleted them
    check_outputs(tmp_path)


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")
def test_own_loop_example_runs_under_torchrun(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(example())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pruned ") == 1  # rank 0 alone exports and reports
    check_outputs(tmp_path)
