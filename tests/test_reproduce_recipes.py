"""tools/reproduce.py reads every method's settings from a recipe in models/, and every recipe records how
its knobs were chosen (issue 15: on a validation split with tools/tune_demo.py, never on the test split)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from onnxslim.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "tools" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)

PAIRS = [(model, method) for model in reproduce.MODELS for method in reproduce.METHODS]
# recipes whose own phases differ from the table's row (the table keeps their method params and sparse
# phase, and gives the rest of its per-model budget to fine-tuning): the 90-s demo recipe (batch 128,
# 4+10+6 epochs), and LeNet-5's gal and joint recipes (tuned at 5+4+11 and 4+8+4 epochs)
OWN_PHASES = {("lenet5", "l1_mask"), ("lenet5", "gal"), ("lenet5", "joint")}
# recipes whose knobs were not chosen with tools/tune_demo.py, each with the reason its header gives
NOT_TUNED = {
    "lenet5_mnist_ssr_l21_layerwise.toml": "keeps the paper's lambdas on purpose",
}


@pytest.mark.parametrize("model,method", PAIRS)
def test_every_table_row_reads_its_recipe(model, method):
    """The row's method params and sparse phase are the recipe's; the new recipes run the row itself."""
    path = reproduce.recipe_path(model, method)
    assert path.parent == ROOT / "models" and path.exists(), path
    recipe = load_recipe(path)
    assert recipe.method.name == method
    built, source = reproduce.build_recipe(model, method, quick=False)
    assert source == str(path.relative_to(ROOT))
    assert built.method == recipe.method
    assert built.training.sparse == recipe.training.sparse
    assert built.training.finetune.lr == recipe.training.finetune.lr
    if (model, method) not in OWN_PHASES:
        assert built.training == recipe.training
        assert built.data == recipe.data and built.model.name == recipe.model.name


def test_missing_recipe_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(reproduce.MODELS, "lenet5", {**reproduce.MODELS["lenet5"], "recipe_prefix": "no_such"})
    with pytest.raises(SystemExit) as raised:
        reproduce.build_recipe("lenet5", "gal", quick=False)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no recipe for gal on lenet5: models/no_such_gal.toml") and err.count("\n") == 1


def test_recipe_naming_another_method_is_refused(monkeypatch, capsys):
    monkeypatch.setitem(reproduce.RECIPE_SUFFIX, "gal", "_joint")
    with pytest.raises(SystemExit) as raised:
        reproduce.method_settings("lenet5", "gal")
    assert raised.value.code == 2
    assert "models/lenet5_mnist_joint.toml is a 'joint' recipe, not 'gal'" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "models").glob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_states_its_validation_tuning(path):
    """Each header (the comment lines before the first key) names tools/tune_demo.py and the validation
    split, or is one of NOT_TUNED and says it was not tuned."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header = "\n".join(header)
    load_recipe(path)
    if path.name in NOT_TUNED:
        assert "not" in header.lower() and "issue 15" in header, path.name
        return
    assert "tools/tune_demo.py" in header and "validation split" in header, path.name
    assert "--split-seed" in header, path.name


def test_shared_dense_checkpoint_is_restamped_for_the_next_method(tmp_path):
    """A dense checkpoint of one row resumes in the next row of the same model (``--resume`` checks the
    recipe fingerprint, method included); a row of another model gets no copy."""
    import torch

    from onnxslim.errors import OnnxSlimError
    from onnxslim.pipeline import check_resumable, recipe_fingerprint
    from onnxslim.training.trainer import CHECKPOINT_FORMAT

    gal, _ = reproduce.build_recipe("lenet5", "gal", quick=True)
    joint, _ = reproduce.build_recipe("lenet5", "joint", quick=True)
    source = tmp_path / "gal" / "dense.pt"
    source.parent.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "weights": torch.ones(3),
                "extra": {"recipe": gal.name, "fingerprint": recipe_fingerprint(gal)}}, source)
    with pytest.raises(OnnxSlimError, match="trained with another recipe"):
        check_resumable(source.parent, recipe_fingerprint(joint))  # what a plain copy would meet
    target = tmp_path / "joint" / "dense.pt"
    target.parent.mkdir()
    assert reproduce.share_dense(source, target, joint)
    check_resumable(target.parent, recipe_fingerprint(joint))
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.ones(3))
    other, _ = reproduce.build_recipe("resnet20", "joint", quick=True)
    assert not reproduce.share_dense(source, tmp_path / "other.pt", other)
    assert not (tmp_path / "other.pt").exists()


@pytest.mark.parametrize("argv,message", [
    (["--set", "l1_mask.lam=abc"], "error: reproduce:lenet5/l1_mask: [method.params]: lam must be a float, got 'abc'"),
    (["--methods", "gal", "--set", "gal.no_such_knob=1"], "unknown parameter(s) no_such_knob"),
    (["--methods", "l1_mask", "--set", "gal.lam_channel=0.1"], "--set names gal, which --methods does not run"),
    (["--set", "nosuch.lam=1"], "unknown: nosuch"),
    # before: a TypeError traceback (the epoch budget's arithmetic), or 2.5 epochs accepted by --quick
    (["--methods", "l1_mask", "--set", "l1_mask.sparse_epochs=x"], "sparse_epochs must be an integer, got 'x'"),
    (["--quick", "--methods", "l1_mask", "--set", "l1_mask.sparse_epochs=2.5"], "must be an integer, got 2.5"),
    (["--methods", "l1_mask", "--set", "l1_mask.sparse_epochs=null"], "must be an integer, got None"),
    (["--methods", "l1_mask", "--set", 'l1_mask.sparse_lr="a"'], "[training.sparse] lr must be float, got 'a'"),
])
def test_bad_set_is_a_one_line_error_before_training(monkeypatch, capsys, tmp_path, argv, message):
    """Every row's recipe, --set values applied, is checked before the first row trains."""
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--out", str(tmp_path / "out"), *argv])
    monkeypatch.setattr(reproduce, "run_all", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as raised:
        reproduce.main()
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith(("error: ", "reproduce.py: error: "))
