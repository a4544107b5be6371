"""tools/reproduce_fmnist.py end to end on a tiny slice of the real Fashion-MNIST files (skipped without them):
a calibrated row slims exactly, and a rerun reuses every finished row (fingerprints match)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# beside the checkout (../shared/data), or wherever ONNXSLIM_FASHION_MNIST says (a fresh clone elsewhere)
DATA = Path(os.environ.get("ONNXSLIM_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))


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
    assert row["slim_diff"] <= 1e-4  # masked.onnx against slim.onnx, both in onnxruntime
    assert 0.1 < row["accuracy"] <= 1.0  # 10 classes: above chance after one epoch per phase
    table = (tmp_path / "REPRODUCE_FMNIST.md").read_text()
    assert "| lenet5 | 50% | l1_norm | 1 |" in table and f"| {row['slim_diff']:.1e} |" in table
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()}
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()} == stamps  # nothing redone
    assert (tmp_path / "accuracy_vs_macs.png").stat().st_size > 0
    assert row["round_to"] >= 1 and row["diff_reference"] == "PyTorch masked"  # slimmed at round_to auto
    # --remeasure trains nothing and measures the finished row again from its ONNX files; without the
    # kept PyTorch logits the max diff is taken against masked.onnx in onnxruntime
    (tmp_path / "onnx" / "lenet5_l1_norm_0.5_0" / "reference.npy").unlink()
    third = subprocess.run(command + ["--remeasure"], capture_output=True, text=True, env=env, timeout=900)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "lenet5_l1_norm_0.5_0: measured again" in third.stdout
    again = json.loads((tmp_path / "rows" / "lenet5_l1_norm_0.5_0.json").read_text())
    assert again["diff_reference"] == "masked.onnx (onnxruntime)" and again["max_abs_diff"] <= 1e-4
    assert again["fingerprint"] == row["fingerprint"] and again["macs_after"] == row["macs_after"]
    assert "Max abs diff against: masked.onnx (onnxruntime): 1 rows" in (tmp_path / "REPRODUCE_FMNIST.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/fashion-mnist is not beside the checkout")
def test_table_only_lists_pending_rows_and_trains_nothing(tmp_path):
    rows = tmp_path / "out" / "rows"
    command = [sys.executable, str(ROOT / "tools" / "reproduce_fmnist.py"), "--data", str(DATA), "--out",
               str(tmp_path / "out"), "--models", "lenet5", "--methods", "gal,joint,bn_slimming", "--costs", "0.5",
               "--seeds", "0,1", "--quick", "--table-only", "--publish", str(tmp_path / "docs")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not rows.exists()  # nothing trained, nothing written as a row
    published = json.loads((tmp_path / "docs" / "REPRODUCE_FMNIST.json").read_text())
    assert sorted(published["pending"]) == ["lenet5_baseline_0", "lenet5_baseline_1", "lenet5_gal_0.5_0",
                                            "lenet5_gal_0.5_1", "lenet5_gal_0.5_calibration", "lenet5_joint_0.5_0",
                                            "lenet5_joint_0.5_1", "lenet5_joint_0.5_calibration"]
    assert "--table-only" not in published["finish"] and "--publish" not in published["finish"]
    text = (tmp_path / "docs" / "REPRODUCE_FMNIST.md").read_text()
    assert "Not yet computed (8 rows)" in text
    # LeNet-5 has no BatchNorm: BN-slimming is a stated "not applicable", never a pending row or a crash
    assert "lenet5 / bn_slimming: not applicable" in text


def test_rows_whose_masks_missed_the_cost_are_flagged():
    spec = importlib.util.spec_from_file_location("reproduce_fmnist", ROOT / "tools" / "reproduce_fmnist.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclasses look their module up
    spec.loader.exec_module(tool)

    def row(removed: float) -> dict:
        return {"macs_before": 1000, "macs_masked": round(1000 * (1 - removed)), "macs_after": 1000}

    groups = {("vgg16", 0.5, "ssr_l21"): [row(0.942)], ("vgg16", 0.7, "joint"): [row(0.65), row(0.62)],
              ("resnet20", 0.5, "l1_mask"): [row(0.488)]}
    assert tool._unmatched(groups) == ["vgg16 ssr_l21 50%: 94.2%"]  # joint's 63.5 % is within 10 points of 70 %


@pytest.mark.parametrize("extra, message", [
    (["--costs", "abc"], "could not convert string to float: 'abc'"),
    (["--costs", "0.5,1.5"], "--costs are shares of the MACs to remove, each in (0, 1)"),
    (["--seeds", "x"], "invalid literal for int()"),
    (["--train", "-5"], "--train must be >= 1, got -5"),
    (["--probes", "0"], "--probes must be >= 1, got 0"),
    ([], "lacks train-images-idx3-ubyte[.gz]"),  # the --data folder is empty
], ids=["costs-not-a-number", "cost-above-1", "seed-not-an-int", "negative-train", "no-probes", "empty-data"])
def test_bad_arguments_are_an_error_line_before_anything_loads(tmp_path, capsys, extra, message):
    """Bad numbers and a data folder without the IDX files exit 2 with `error: ...` (before: a ValueError or
    OnnxSlimError traceback, exit 1)."""
    spec = importlib.util.spec_from_file_location("reproduce_fmnist", ROOT / "tools" / "reproduce_fmnist.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as raised:
        tool.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out"), *extra])
    assert raised.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last and message in last, last  # argparse: "<prog>: error: ..."
    assert not (tmp_path / "out").exists()


def test_torch_pruning_rows_without_the_package_are_refused_before_training(tmp_path, capsys, monkeypatch):
    """--torch-pruning without torch-pruning installed: an error line at once (before: a ModuleNotFoundError
    when the first Torch-Pruning row came up, after the other rows had trained); --table-only needs no package."""
    spec = importlib.util.spec_from_file_location("reproduce_fmnist", ROOT / "tools" / "reproduce_fmnist.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_pruning" else real(name, *a))
    with pytest.raises(SystemExit) as raised:
        tool.parse_args(["--data", str(tmp_path), "--torch-pruning"])
    assert raised.value.code == 2
    assert "--torch-pruning needs the torch-pruning package" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # past that check: the empty --data folder is what stops it now
        tool.parse_args(["--data", str(tmp_path), "--torch-pruning", "--table-only"])
    assert "lacks train-images" in capsys.readouterr().err
