"""tools/tune_demo.py's validation hold-out: carved from the training split only, disjoint, seeded."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxslim.errors import OnnxSlimError
from onnxslim.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tune_demo", ROOT / "tools" / "tune_demo.py")
tune_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune_demo)


def _recipe(tmp_path, data: str):
    path = tmp_path / "r.toml"
    path.write_text(f'[model]\nname = "lenet5"\n[data]\n{data}\n')
    return load_recipe(path)


def _rows(dataset) -> set[bytes]:
    return {image.tobytes() for image in dataset.images}


def test_holdout_keeps_train_samples_and_is_disjoint(tmp_path):
    """train_samples 240 of MNIST-10k's 8,000 training images: 240 fit + 80 held out, no image in both."""
    recipe = _recipe(tmp_path, "train_samples = 240")
    fit, val = tune_demo.holdout(recipe, 80, seed=0)
    assert (len(fit), len(val)) == (240, 80)
    assert not _rows(fit) & _rows(val)
    again, other = tune_demo.holdout(recipe, 80, seed=0), tune_demo.holdout(recipe, 80, seed=1)
    assert np.array_equal(again[1].images, val.images)
    assert not np.array_equal(other[1].images, val.images)


def test_holdout_never_reads_the_test_split(tmp_path, monkeypatch):
    seen = []
    real = tune_demo.load_dataset
    monkeypatch.setattr(tune_demo, "load_dataset", lambda spec, split, seed: seen.append(split) or real(spec, split, seed))
    fit, val = tune_demo.holdout(_recipe(tmp_path, 'dataset = "mnist"'), 2000, seed=0)
    assert seen == ["train"]
    assert (len(fit), len(val)) == (6000, 2000)  # no train_samples: every other training image is fit


def test_holdout_rejects_a_split_that_leaves_nothing_to_train(tmp_path):
    with pytest.raises(OnnxSlimError, match="--val 8000"):
        tune_demo.holdout(_recipe(tmp_path, 'dataset = "mnist"'), 8000, seed=0)
    completed = subprocess.run([sys.executable, str(ROOT / "tools" / "tune_demo.py"), "--recipe",
                                str(tmp_path / "r.toml"), "--epochs", "1,1,1", "--val", "8000"],
                               capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith("error: --val 8000")


@pytest.mark.parametrize("args,message", [
    (["--set", "lam=abc"], "lam must be a float, got 'abc'"),
    (["--set", "no_such_knob=1"], "unknown parameter(s) no_such_knob"),
    (["--set", "lam"], "--set expects KEY=VALUE, got 'lam'"),
    (["--epochs", "1,1"], "--epochs expects three integers"),
])
def test_bad_set_or_epochs_is_one_line_error_before_training(tmp_path, args, message):
    """A wrong-type, unknown or malformed --set value (or --epochs) is refused with one `error:` line, exit 2,
    before any trial trains (nothing is written under --out)."""
    completed = subprocess.run([sys.executable, str(ROOT / "tools" / "tune_demo.py"), "--epochs", "1,1,1",
                                "--out", str(tmp_path / "out"), *args],
                               capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], completed.stderr
    assert not (tmp_path / "out").exists()


def test_set_values_are_json_or_strings():
    assert tune_demo.parse_sets(["lam=0.5", "criterion=mean_abs", "lam=1"]) == [
        {"lam": 0.5, "criterion": "mean_abs"}, {"lam": 1, "criterion": "mean_abs"}]
