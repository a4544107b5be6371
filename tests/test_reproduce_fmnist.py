"""tools/reproduce_fmnist.py end to end on a tiny slice of the real Fashion-MNIST files (skipped without them):
a calibrated row slims exactly, and a rerun reuses every finished row (fingerprints match)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/fashion-mnist is not beside the checkout")
def test_quick_row_slims_exactly_and_resumes(tmp_path):
    command = [sys.executable, str(ROOT / "tools" / "reproduce_fmnist.py"), "--data", str(DATA), "--out",
               str(tmp_path), "--models", "lenet5", "--methods", "l1_norm", "--costs", "0.5", "--seeds", "0",
               "--quick", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    row = json.loads((tmp_path / "rows" / "lenet5_l1_norm_0.5_0.json").read_text())
    calibration = json.loads((tmp_path / "rows" / "lenet5_l1_norm_0.5_calibration.json").read_text())
    assert len(calibration["probes"]) == 2 and calibration["knob"] == "ratio"
    assert row["macs_after"] < row["macs_before"] and row["max_abs_diff"] <= 1e-4
    assert 0.1 < row["accuracy"] <= 1.0  # 10 classes: above chance after one epoch per phase
    table = (tmp_path / "REPRODUCE_FMNIST.md").read_text()
    assert "| lenet5 | 50% | l1_norm | 1 |" in table
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()}
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()} == stamps  # nothing redone
