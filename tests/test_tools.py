"""Smoke runs of the measurement scripts under tools/ (tiny images, two rounds; figures not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(name, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                                      if os.environ.get("PYTHONPATH") else "")}
    completed = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    return completed.stdout


@pytest.mark.slow
def test_resnet50_speedup_tool(tmp_path):
    out = tmp_path / "r50.json"
    stdout = run_tool("bench_resnet50_speedup.py", "--size", "32", "--rounds", "2", "--warmup", "0", "--json", out)
    data = json.loads(out.read_text())
    assert data["macs_ratio"] == pytest.approx(data["macs_before"] / data["macs_after"])
    assert data["macs_ratio"] > 3  # half of the channels on both sides of most convolutions
    # the engine's result (or the hand-built reference without it) computes what the masked model computes
    for difference in data["max_abs_difference"].values():
        assert difference < 1e-4
    assert "speedup / MACs ratio" in stdout


@pytest.mark.slow
def test_round_to_tool(tmp_path):
    out = tmp_path / "round.json"
    run_tool("bench_round_to.py", "--size", "32", "--rounds", "2", "--warmup", "0", "--round-to", "1,8",
             "--json", out)
    results = json.loads(out.read_text())["results"]
    assert [r["round_to"] for r in results] == [1, 8]
    assert results[1]["macs"] >= results[0]["macs"]  # rounding up only keeps extra channels


@pytest.mark.slow
def test_channel_sweep_tool(tmp_path):
    out = tmp_path / "sweep.json"
    run_tool("bench_channel_sweep.py", "--channels", "6,8", "--base", "8", "--size", "6", "--rounds", "2",
             "--warmup", "0", "--json", out)
    data = json.loads(out.read_text())
    assert [r["channels"] for r in data["rows"]] == [6, 8] and data["block"] in (4, 8, 16)
    assert all(r["nchwc_convs"] in (0, 1, 2) and r["macs"] > 0 for r in data["rows"])


@pytest.mark.slow
def test_latency_efficiency_tool(tmp_path):
    out = tmp_path / "eff.json"
    stdout = run_tool("bench_latency_efficiency.py", "--models", "yolo_style", "--size", "32", "--rounds", "2",
                      "--warmup", "0", "--threads", "1", "--batch", "1", "--ratios", "0.5", "--json", out)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "yolo_style" and row["macs_ratio"] > 1.5  # half the channels of most layers
    assert row["efficiency"] == pytest.approx(row["speedup"] / row["macs_ratio"])
    assert "speedup / MACs ratio" in stdout


@pytest.mark.slow
def test_latency_efficiency_tool_target_mode(tmp_path):
    out = tmp_path / "target.json"
    run_tool("bench_latency_efficiency.py", "--models", "mobilenet_v3_small", "--size", "32", "--rounds", "3",
             "--warmup", "0", "--target-latency", "0.6", "--json", out)
    (row,) = json.loads(out.read_text())["targets"]
    assert row["target"] == 0.6 and 1 <= row["prunes"] <= 8 and 0 < row["macs_fraction"] < 1
    assert row["error"] == pytest.approx(row["verified_latency_fraction"] / 0.6 - 1)
