"""Command-line conventions users bring from other tools (issue 14, item 5): ``slim IN OUT``,
Polygraphy's ``--atol/--rtol``, accuracy drops in percentage points, listed ``--method`` choices, methods
refused before training when they cannot apply, ``check`` as an equivalence gate by default, actionable
``bench --mobile`` advice and the MACs / parameter ratio gates."""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
from _validate_models import conv_net
from click.testing import CliRunner
from graphs import GraphBuilder

from onnxslim.cli import main
from onnxslim.graph.slim import slim
from onnxslim.pipeline import check_targets
from onnxslim.recipes import recipe_from_dict
from onnxslim.validate.mobile import fixed_shape_advice


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def masked(tmp_path):
    g = GraphBuilder()
    x = g.input([1, 3, 8, 8])
    a = g.op("Relu", [g.mask(g.conv(x, 3, 8), 8, zeros=[0, 2, 4, 6])])
    g.output(g.conv(a, 8, 4))
    path = tmp_path / "masked.onnx"
    onnx.save(g.model(), path)
    return path


def test_slim_and_prune_take_the_output_as_second_argument(masked, tmp_path):
    for command in ("slim", "prune"):
        positional, option = tmp_path / f"{command}_a.onnx", tmp_path / f"{command}_b.onnx"
        assert invoke(command, masked, positional).exit_code == 0
        assert invoke(command, masked, "-o", option).exit_code == 0
        assert positional.read_bytes() == option.read_bytes()
    both = invoke("slim", masked, tmp_path / "x.onnx", "-o", tmp_path / "y.onnx")
    assert both.exit_code == 2 and "two outputs" in both.stderr
    neither = invoke("slim", masked)
    assert neither.exit_code == 2 and "missing the output" in neither.stderr


def test_a_file_option_followed_by_another_option_is_refused(masked, tmp_path, monkeypatch):
    """``--json --no-verify-speed`` gave the JSON file the next option's name: the run wrote a file named
    ``--no-verify-speed`` into the working folder and ran the speed check it was asked to skip."""
    monkeypatch.chdir(tmp_path)
    for flag in ("--no-verify-speed", "--all", "-o"):
        result = invoke("slim", masked, tmp_path / "out.onnx", "--json", flag)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines()[-1].startswith("error: Invalid value for '--json'")
        assert "an option of this command" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masked.onnx"]


@pytest.fixture
def pair(tmp_path):
    reference, changed = tmp_path / "ref.onnx", tmp_path / "changed.onnx"
    onnx.save(conv_net(8), reference)
    mask = np.ones(8, np.float32)
    mask[0] = 0.0  # one channel switched off: outputs change visibly
    onnx.save(conv_net(8, mask=mask), changed)
    return reference, changed


@pytest.mark.parametrize("names", [("--atol", "--rtol"), ("--max-abs-diff", "--max-rel-diff")])
def test_check_takes_polygraphy_tolerance_names_and_the_old_ones(pair, names):
    reference, changed = pair
    strict = invoke("check", reference, changed, names[0], "1e-6", names[1], "0", "--no-progress")
    assert strict.exit_code == 1 and "FAILED: output difference" in strict.stderr
    loose = invoke("check", reference, changed, names[0], "1e3", names[1], "0", "--no-progress")
    assert loose.exit_code == 0, loose.output


def test_check_without_thresholds_is_an_equivalence_gate(pair):
    reference, changed = pair
    same = invoke("check", reference, reference, "--no-progress")
    assert same.exit_code == 0 and "## onnxslim check: PASS" in same.stdout
    different = invoke("check", reference, changed, "--no-progress")
    assert different.exit_code == 1
    assert "PASS" not in different.stdout and "## onnxslim check: FAIL" in different.stdout
    assert "atol 0.0001 or rtol 0.0001" in different.stdout


def test_check_reports_ungated_output_difference_as_such(pair):
    reference, changed = pair
    result = invoke("check", reference, changed, "--max-size-ratio", "2", "--no-progress")
    assert result.exit_code == 0
    assert "Output difference not gated (no --atol/--rtol)" in result.stdout


def test_gate_on_macs_and_params_ratios(masked, tmp_path):
    slimmed = tmp_path / "slim.onnx"
    slim(masked, slimmed)
    passing = invoke("check", masked, slimmed, "--max-macs-ratio", "0.6", "--max-params-ratio", "0.6", "--no-progress")
    assert passing.exit_code == 0, passing.output
    assert "MACs ratio" in passing.stdout and "params ratio" in passing.stdout
    unslimmed = invoke("check", masked, masked, "--max-params-ratio", "0.6", "--no-progress")
    assert unslimmed.exit_code == 1 and "FAILED: params ratio 1.000" in unslimmed.stderr


def test_accuracy_drops_are_percentage_points_everywhere():
    assert "percentage points" in " ".join(invoke("check", "--help").output.split())
    recipe = recipe_from_dict({"model": {"name": "lenet5"}, "targets": {"max_accuracy_drop_pt": 0.5}})
    within = types.SimpleNamespace(accuracy_drop_pt=0.4)  # the report's drop, in points too
    beyond = types.SimpleNamespace(accuracy_drop_pt=0.6)
    assert [(c.name, c.value, c.ok) for c in check_targets(recipe, within)] == \
        [("max_accuracy_drop_pt", pytest.approx(0.4), True)]
    assert not check_targets(recipe, beyond)[0].ok


def test_method_option_lists_its_choices(tmp_path):
    help_text = invoke("train", "--help").output
    assert "[" in help_text and "bn_slimming" in help_text and "l1_mask" in help_text
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nname = "lenet5"\n')
    wrong = invoke("train", recipe, "--method", "l1_mask_typo", "--out", tmp_path / "run")
    assert wrong.exit_code == 2 and "'l1_mask_typo' is not one of" in wrong.stderr


def test_inapplicable_method_is_refused_before_training(tmp_path):
    recipe = tmp_path / "bn.toml"
    recipe.write_text('[model]\nname = "lenet5"\n[method]\nname = "bn_slimming"\n'
                      '[data]\ntrain_samples = 200\ntest_samples = 100\n[training.dense]\nepochs = 1\n')
    result = invoke("train", recipe, "--out", tmp_path / "run", "--no-progress")
    assert result.exit_code == 2
    assert "bn_slimming cannot train model lenet5" in result.stderr and "BatchNorm" in result.stderr
    assert not (tmp_path / "run" / "dense.pt").exists()


@pytest.mark.parametrize("spec", ["fashion-mnist:{tmp}/absent", "{tmp}/absent.npz"])
def test_bad_data_spec_leaves_no_output_folder(tmp_path, spec):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nname = "lenet5"\n[data]\ndataset = "{spec.format(tmp=tmp_path.as_posix())}"\n')
    result = invoke("train", recipe, "--out", tmp_path / "run", "--no-progress")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_mobile_advice_names_the_command_that_fixes_shapes(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_net(8), path)  # input x: (N, 1, 28, 28)
    log = "INFO:  Model should perform well with NNAPI if modified to have fixed input shapes: YES"
    advice = fixed_shape_advice(path, log)
    assert f"make_dynamic_shape_fixed --input_name x --input_shape 1,1,28,28 {path} " in advice
    assert "onnxslim export --static-batch" in advice
    assert fixed_shape_advice(path, "INFO:  Model should perform well with NNAPI as is: YES") is None


def test_bench_mobile_prints_the_advice(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_net(8), path)
    result = invoke("bench", path, "--mobile", "--warmup", "0", "--repeat", "2", "--session-repeats", "1",
                    "--no-memory", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "advice: dynamic input shapes" in result.stdout and "--input_shape 1,1,28,28" in result.stdout


def test_ctrl_c_exits_130_and_leaves_no_output(masked, tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt mid-command) ends with the shell's SIGINT status 128 + 2, one line on
    stderr, and no output file (a CI script tells an interrupted run from a refused model, exit 2)."""
    import onnxslim.graph.slim as slim_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(slim_module, "_slim_pass", interrupted)
    out = tmp_path / "slim.onnx"
    with pytest.raises(SystemExit) as exit_info:
        main.main(args=["slim", str(masked), str(out), "--no-verify-speed"], prog_name="onnxslim")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "Aborted!"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["masked.onnx"]
