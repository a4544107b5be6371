"""`onnxslim run`: a tiny recipe end to end (train, mask-train, export, slim, validate, report)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from onnxslim.cli import main
from onnxslim.errors import OnnxSlimError
from onnxslim.recipes import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]

TINY_RECIPE = """
name = "tiny"
[model]
name = "lenet5"
params = { width = 0.5 }
[data]
dataset = "mnist"
train_samples = 1500
test_samples = 300
[method]
name = "l1_mask"
params = { lam = 0.05, proximal = true, mask_lr_scale = 20.0, epsilon = 0.0 }
[training]
batch_size = 50
[training.dense]
epochs = 1
lr = 0.02
[training.sparse]
epochs = 2
lr = 0.02
schedule = "constant"
[training.finetune]
epochs = 1
lr = 0.02
[slim]
round_to = 1  # the tests below count deleted channels exactly
[validate]
warmup = 2
repeat = 10
[targets]
min_params_removed = 0.2
max_abs_diff = 1e-4
max_accuracy_drop_pt = 100.0
"""

REQUIRED = ["params_before", "params_after", "macs_before", "macs_after", "accuracy_before", "accuracy_after",
            "latency_ms_before", "latency_ms_after", "max_abs_diff", "targets", "targets_met"]


def test_run_tiny_recipe_end_to_end_and_resume(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(recipe), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "params removed" in result.output
    report = json.loads((out / "REPORT.json").read_text())
    for key in REQUIRED:
        assert key in report, key
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    assert report["max_abs_diff"] <= 1e-4
    assert report["accuracy_after"] > 0.5 and report["accuracy_before"] > 0.5
    assert report["accuracy_after"] == report["accuracy_masked"]  # slimming is exact
    # the drop is in percentage points, as the target it is checked against
    assert "accuracy_drop" not in report
    assert report["accuracy_drop_pt"] == pytest.approx(100 * (report["accuracy_before"] - report["accuracy_after"]))
    (drop_check,) = [t for t in report["targets"] if t["name"] == "max_accuracy_drop_pt"]
    assert drop_check["value"] == report["accuracy_drop_pt"]
    assert f"accuracy drop {report['accuracy_drop_pt']:.2f} pt" in result.output
    assert report["deleted_masked_channels"] == report["masked_channels"] > 0
    assert {t["name"] for t in report["targets"]} == {"min_params_removed", "max_abs_diff", "max_accuracy_drop_pt"}
    assert report["targets_met"] is True
    for name in ("dense.pt", "baseline.pt", "masked.pt", "dense.onnx", "masked.onnx", "slim.onnx"):
        assert (out / name).exists(), name
    markdown = (out / "REPORT.md").read_text()
    assert "| params |" in markdown and "Targets" in markdown
    for plot in ("layers.png", "latency.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG" and (out / plot).stat().st_size > 5000
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # resuming a finished run trains nothing and reproduces the figures
    again = runner.invoke(main, ["run", str(recipe), "--out", str(out), "--no-progress", "--resume", "--json"])
    assert again.exit_code == 0, again.output
    repeated = json.loads(again.output)
    for key in ("params_after", "accuracy_before", "accuracy_after"):
        assert repeated[key] == report[key]
    assert repeated["seconds"]["masked"] < report["seconds"]["masked"]


def test_failed_target_exits_with_1(tmp_path):
    recipe = tmp_path / "strict.toml"
    text = TINY_RECIPE.replace("min_params_removed = 0.2", "min_params_removed = 0.999")
    text = text.replace("[training.dense]\nepochs = 1", "[training.dense]\nepochs = 0")
    text = text.replace("[training.sparse]\nepochs = 2", "[training.sparse]\nepochs = 1")
    recipe.write_text(text)
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 1
    assert "min_params_removed" in result.output


def test_shipped_recipes_are_valid():
    recipes = sorted((ROOT / "models").glob("*.toml"))
    assert any(p.name == "lenet5_mnist.toml" for p in recipes)
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.training.sparse.kind == "sparse"
    demo = load_recipe(ROOT / "models" / "lenet5_mnist.toml")
    assert demo.targets.min_params_removed == 0.9 and demo.targets.max_accuracy_drop_pt == 0.5
    assert demo.targets.max_abs_diff == 1e-4


@pytest.mark.parametrize("raw,message", [
    ({"model": {"name": "lenet5"}, "trainer": {}}, "unknown key"),
    ({"model": {"name": "lenet5", "params": {"widht": 2}}}, "no parameter 'widht'"),
    ({"model": {"name": "lenet5"}, "method": {"name": "l1_mask", "params": {"lamda": 1}}}, "unknown parameter"),
    ({"model": {"name": "lenet5"}, "training": {"sparse": {"epochs": "ten"}}}, "epochs must be int"),
    ({"model": {"name": "lenet5"}, "training": {"dense": {"epochs": 1, "optimizer": "lbfgs"}}}, "optimizer"),
    ({"model": {}}, "needs a name"),
    ({"model": {"name": "lenet5"}, "slim": {"round_to": 0}}, "round_to must be >= 1"),
    ({"model": {"name": "lenet5"}, "slim": {"round_to": "fast"}}, "round_to must be 'auto' or an integer"),
])
def test_recipe_errors_are_one_line(raw, message):
    with pytest.raises(OnnxSlimError, match=message):
        recipe_from_dict(raw)


def test_missing_recipe_file_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "recipe not found" in result.output


def test_train_then_export_cli(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.replace("epochs = 2", "epochs = 1"))
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(recipe), "--out", str(tmp_path / "t"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "masked top1" in result.output and "params:" in result.output
    assert not (tmp_path / "t" / "baseline.pt").exists()  # --no-baseline is the default for train
    result = runner.invoke(main, ["export", str(tmp_path / "t" / "masked.pt"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").exists()


SEGMENTATION_RECIPE = """
name = "tiny-seg"
[model]
name = "unet"
params = { num_classes = 11, in_channels = 1, input_size = 32, width = 0.25, depth = 2 }
[data]
dataset = "mnistseg:32"
train_samples = 96
test_samples = 24
[method]
name = "joint"
params = { window = 4, min_rate = 0.9, max_new_fraction = 0.5, decay = 0.5 }
[training]
batch_size = 8
[training.dense]
epochs = 1
lr = 0.003
optimizer = "adam"
weight_decay = 0.0
[training.sparse]
epochs = 2
lr = 0.003
optimizer = "adam"
weight_decay = 0.0
schedule = "constant"
[training.finetune]
epochs = 1
lr = 0.003
optimizer = "adam"
weight_decay = 0.0
[slim]
round_to = 4
[validate]
warmup = 2
repeat = 5
[targets]
max_abs_diff = 1e-4
"""


def test_run_segmentation_recipe_with_joint_method(tmp_path):
    """(N, H, W) labels select the segmentation task; the joint method's zeros are deleted exactly, channel
    counts rounded to multiples of 4 as the recipe's [slim] round_to asks."""
    recipe = tmp_path / "seg.toml"
    recipe.write_text(SEGMENTATION_RECIPE)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "REPORT.json").read_text())
    assert "miou" in result.output.lower()
    assert 0 < report["deleted_masked_channels"] <= report["masked_channels"]
    assert report["params_after"] < report["params_before"]
    assert report["max_abs_diff"] <= 1e-4
    assert report["accuracy_after"] == report["accuracy_masked"]  # slimming is exact
    assert 0.0 < report["accuracy_after"] <= 1.0

    def conv_outputs(path):
        model = onnx.load(str(path))
        weights = {t.name: t for t in model.graph.initializer}
        return [weights[n.input[1]].dims[1 if n.op_type == "ConvTranspose" else 0]
                for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]

    before, after = conv_outputs(out / "masked.onnx"), conv_outputs(out / "slim.onnx")
    assert sum(after) < sum(before)
    assert all(a % 4 == 0 or a == b for a, b in zip(after, before))


def test_report_advises_round_to_when_slimmed_model_is_slower():
    from onnxslim.pipeline import RunReport

    fields = dict(recipe={"slim": {"round_to": 1}}, params_before=100, params_after=80, macs_before=1000,
                  macs_after=700, accuracy_before=0.98, accuracy_masked=0.98, accuracy_after=0.98,
                  accuracy_metric="top1", latency_ms_before=0.6, latency_ms_masked=0.6, latency_ms_after=0.9,
                  max_abs_diff=0.0, max_abs_diff_onnx=0.0, params_removed=0.2, macs_removed=0.3,
                  accuracy_drop_pt=0.0, masked_channels=10, deleted_masked_channels=10, live_channels={},
                  targets=[], targets_met=True, seconds={}, files={}, torch_accuracy={})
    slower = RunReport(**fields)
    assert 'round_to = "auto"' in slower.format_table() and 'round_to = "auto"' in slower.to_markdown()
    faster = RunReport(**{**fields, "latency_ms_after": 0.3})
    assert faster.advice() == [] and "round_to" not in faster.format_table()
    rounded = RunReport(**{**fields, "recipe": {"slim": {"round_to": 8}}})
    (hint,) = rounded.advice()  # already rounded and still slower: the measuring fixes
    assert "--ensure-faster" in hint and "--per-layer" in hint


def test_stage_functions_one_by_one(tmp_path, capsys):
    """The stages `run` chains can be called from Python one at a time, each leaving its files; the export
    stage shows a progress bar (it was silent for the tens of seconds a dynamo export takes)."""
    from onnxslim import pipeline

    text = TINY_RECIPE.replace("train_samples = 1500", "train_samples = 400").replace(
        "test_samples = 300", "test_samples = 100").replace("lam = 0.05", "lam = 0.2")
    recipe = recipe_from_dict(__import__("tomllib").loads(text))
    run = pipeline.start_run(recipe, tmp_path / "run", progress=False)
    trained = pipeline.train(run, baseline=False)
    assert trained.baseline is None and (tmp_path / "run" / "masked.pt").exists()
    capsys.readouterr()
    run.progress = True
    exported = pipeline.export(run, trained)
    run.progress = False
    assert "export (" in capsys.readouterr().err
    assert exported.masked.exists() and exported.results["masked"].mask_nodes > 0
    slimmed = pipeline.slim(run, exported)
    assert slimmed.report.params_after < slimmed.dense_stats.params
    validation = pipeline.validate(run, trained, exported, slimmed)
    assert validation.max_abs_diff <= 1e-4
    assert validation.accuracy["slim"].value == validation.accuracy["masked"].value
    result = pipeline.report(run, trained, exported, slimmed, validation)
    assert set(run.seconds) == {"dense", "masked", "export", "slim", "validate"}
    saved = json.loads((tmp_path / "run" / "REPORT.json").read_text())
    assert saved["params_after"] == result.params_after == slimmed.report.params_after
    assert saved["torch_accuracy"]["baseline"] is None


MICRO = TINY_RECIPE.replace("train_samples = 1500", "train_samples = 200").replace("test_samples = 300",
                                                                                   "test_samples = 50")


def _train(runner, recipe_text, folder, *flags):
    recipe = folder.parent / f"{folder.name}.toml"
    recipe.write_text(recipe_text)
    return runner.invoke(main, ["train", str(recipe), "--out", str(folder), "--no-progress", *flags])


def test_resume_refuses_a_changed_recipe_and_names_the_keys(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    assert _train(runner, MICRO, out).exit_code == 0
    changed = MICRO.replace("lam = 0.05", "lam = 0.5").replace("train_samples = 200", "train_samples = 100")
    result = _train(runner, changed, out, "--resume")
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith("error:") and "\n" not in line
    assert "method.params.lam 0.05 -> 0.5" in line and "data.train_samples 200 -> 100" in line
    # a default made explicit is the same recipe; the device is not part of it
    same = MICRO.replace("[training]\n", "[training]\ndevice = \"cpu\"\n").replace("epsilon = 0.0", "epsilon = 0.0, "
                                                                                  "criterion = \"mean\"")
    from onnxslim.training.methods import get_method
    assert get_method("l1_mask", {}).params.criterion == "mean"
    again = _train(runner, same, out, "--resume")
    assert again.exit_code == 0, again.output


def test_resume_from_checkpoints_with_missing_keys_is_a_clear_error(tmp_path):
    import torch

    runner = CliRunner()
    out = tmp_path / "run"
    assert _train(runner, MICRO, out).exit_code == 0
    state = torch.load(out / "masked.pt", weights_only=False)
    del state["phases"], state["history"]
    torch.save(state, out / "masked.pt")
    result = _train(runner, MICRO, out, "--resume")
    assert result.exit_code == 2 and "incomplete checkpoint (no phases, history)" in result.output
    del state["extra"]
    torch.save(state, out / "masked.pt")
    result = _train(runner, MICRO, out, "--resume")
    assert result.exit_code == 2 and "does not record the recipe" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["run", "train"])
def test_a_run_that_fails_before_training_leaves_no_folder_behind(tmp_path, command):
    """A model that does not fit the data fails in the training stage before any checkpoint: the folders
    the run created (``runs/a/b``, both new) are removed, and a folder that was there stays."""
    recipe = tmp_path / "bad.toml"
    recipe.write_text(MICRO.replace("params = { width = 0.5 }", "params = { width = 0.5, in_channels = 3 }"))
    out = tmp_path / "runs" / "a" / "b"
    result = CliRunner().invoke(main, [command, str(recipe), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and result.output.startswith("error: model lenet5 expects inputs (3, 28, 28)")
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()
    out.mkdir(parents=True)  # an empty folder of the user's: kept
    again = CliRunner().invoke(main, [command, str(recipe), "--out", str(out), "--no-progress"])
    assert again.exit_code == 2 and out.is_dir() and not any(out.iterdir())


def test_a_run_folder_that_is_not_empty_needs_resume_or_overwrite(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    assert _train(runner, MICRO, out).exit_code == 0
    dense = (out / "dense.pt").read_bytes()
    (out / "REPORT.md").write_text("# a report of an earlier run\n")
    (out / "notes.txt").write_text("mine\n")
    refused = _train(runner, MICRO, out)
    assert refused.exit_code == 2 and "is not empty" in refused.output and "--overwrite" in refused.output
    assert (out / "dense.pt").read_bytes() == dense and (out / "REPORT.md").exists()
    both = _train(runner, MICRO, out, "--resume", "--overwrite")
    assert both.exit_code == 2 and "exclude each other" in both.output
    resumed = _train(runner, MICRO, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert not (out / "REPORT.md").exists()  # a report never sits beside checkpoints it was not made from
    (out / "REPORT.md").write_text("# stale\n")
    fresh = _train(runner, MICRO.replace("seed = 0", "seed = 1") if "seed = 0" in MICRO else
                   MICRO.replace("[training]\n", "[training]\nseed = 1\n"), out, "--overwrite")
    assert fresh.exit_code == 0, fresh.output
    assert not (out / "REPORT.md").exists() and (out / "notes.txt").read_text() == "mine\n"
    assert (out / "dense.pt").read_bytes() != dense


def test_read_report_reads_points_and_converts_old_fraction_reports(tmp_path):
    """REPORT.json is read back as written; a report from before the drop was kept in points (its
    ``accuracy_drop`` a fraction, as docs/unet_mnistseg_joint/REPORT.json) comes back in points."""
    from onnxslim.pipeline import RunReport, TargetCheck, read_report

    old_path = ROOT / "docs" / "unet_mnistseg_joint" / "REPORT.json"
    old = json.loads(old_path.read_text())
    assert "accuracy_drop" in old and "accuracy_drop_pt" not in old
    converted = read_report(old_path)
    assert converted.accuracy_drop_pt == pytest.approx(100 * old["accuracy_drop"])
    assert converted.accuracy_drop_pt == pytest.approx(100 * (old["accuracy_before"] - old["accuracy_after"]))
    assert all(isinstance(check, TargetCheck) for check in converted.targets)

    current = dataclasses.replace(converted, accuracy_drop_pt=0.35)
    path = tmp_path / "REPORT.json"
    path.write_text(json.dumps(current.to_dict()))
    assert read_report(path) == current
    assert RunReport.from_dict(current.to_dict()).accuracy_drop_pt == 0.35


@pytest.mark.parametrize("text,message", [
    ("not json", "cannot read a run report"),
    ("[1, 2]", "not an onnxslim run report (a JSON list)"),
    ('{"params_before": 1}', "not an onnxslim run report (no recipe"),
])
def test_read_report_refuses_other_files_in_one_line(tmp_path, text, message):
    from onnxslim.pipeline import read_report

    path = tmp_path / "REPORT.json"
    path.write_text(text)
    with pytest.raises(OnnxSlimError, match="^" + re.escape(str(path))) as caught:
        read_report(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(OnnxSlimError, match="cannot read"):
        read_report(tmp_path / "missing.json")


def _micro_models(out, *, threads, side_by_side, resume=False):
    from onnxslim import pipeline

    recipe = recipe_from_dict(__import__("tomllib").loads(MICRO))
    train, test = pipeline.load_data(recipe)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return pipeline.train_models(recipe, out, train, test, progress=False, side_by_side=side_by_side,
                                     resume=resume)
    finally:
        torch.set_num_threads(before)


def test_side_by_side_training_gives_the_weights_of_training_one_after_the_other(tmp_path):
    """Side by side with 2 threads, the baseline trains in a second process (1 thread each): the same
    weights as training both with 1 thread in this process; a failure there is one line that says how
    to go on."""
    one = _micro_models(tmp_path / "one", threads=1, side_by_side=False)
    (tmp_path / "side").mkdir()
    shutil.copy(tmp_path / "one" / "dense.pt", tmp_path / "side" / "dense.pt")  # the same start, trained at 1 thread
    side = _micro_models(tmp_path / "side", threads=2, side_by_side=True, resume=True)
    assert side.side_by_side and not one.side_by_side
    assert list(side.seconds) == list(one.seconds) == ["dense", "baseline", "masked"]
    for name in ("baseline", "masked"):
        ours, theirs = getattr(side, name).state_dict(), getattr(one, name).state_dict()
        assert all(torch.equal(value, theirs[key]) for key, value in ours.items()), name
    assert side.baseline_result.test_metric == one.baseline_result.test_metric
    assert len(side.baseline_result.history) == 3  # sparse 2 + finetune 1 epochs, without masks

    (tmp_path / "broken" / "baseline.pt").mkdir(parents=True)  # its checkpoint cannot be written
    with pytest.raises(OnnxSlimError, match=r"^training the dense baseline: .*run again with --resume$"):
        _micro_models(tmp_path / "broken", threads=2, side_by_side=True)
