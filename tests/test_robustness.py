"""Hostile and unlucky inputs (issue 13): safe checkpoints, outputs that never clobber inputs, atomic
big models, OS errors, malformed initializers, strict recipes, signals, file modes, usage errors.

Every bad input must give one ``error: ...`` line and exit code 2, leave its inputs untouched and
leave nothing half-written behind. docs/robustness.md lists each case with the test that holds it.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from graphs import GraphBuilder, assert_equivalent
from onnx import numpy_helper

from onnxslim.cli import main
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.slim import slim
from onnxslim.io import TEMP_PREFIX, load_onnx, save_model_atomic, write_with_atomic
from onnxslim.recipes import recipe_from_dict
from onnxslim.training.trainer import CHECKPOINT_FORMAT, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def masked_graph(channels: int = 8, size: int = 8) -> onnx.ModelProto:
    g = GraphBuilder()
    x = g.input([1, 3, size, size])
    a = g.op("Relu", [g.mask(g.conv(x, 3, channels), channels, zeros=[0, 2])])
    g.output(g.conv(a, channels, 4))
    return g.model()


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "masked.onnx"
    onnx.save(masked_graph(), path)
    return path


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "Usage:" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def stray_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]


# -- 1. checkpoints never run code ------------------------------------------------------------------
class _Payload:
    """Unpickling this object would create ``marker`` (a stand-in for any code a crafted file runs)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "masked.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "payload": _Payload(marker)}, crafted)
    result = invoke(["export", crafted, "-o", tmp_path / "out.onnx"])
    assert_one_line_error(result, "refusing to load", "GLOBAL")
    assert not marker.exists() and not (tmp_path / "out.onnx").exists()
    with pytest.raises(OnnxSlimError, match="refusing to load"):  # --resume reads through the same function
        load_checkpoint(crafted)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"garbage", "not a readable checkpoint"),
    (None, "not an onnxslim checkpoint"),
], ids=["garbage", "foreign"])
def test_unreadable_or_foreign_checkpoints(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    assert_one_line_error(invoke(["export", path, "-o", tmp_path / "out.onnx"]), message)


# -- 2. outputs never replace inputs -----------------------------------------------------------------
def _collision_args(case: str, model: Path, tmp_path: Path) -> list:
    out = tmp_path / "out.onnx"
    link = tmp_path / "link.onnx"
    link.symlink_to(model)
    hard = tmp_path / "hard.onnx"
    os.link(model, hard)
    data = tmp_path / "data.npz"
    np.savez(data, images=np.zeros((2, 3, 8, 8), np.float32), labels=np.zeros(2, np.int64))
    checkpoint = tmp_path / "masked.pt"
    checkpoint.write_bytes(b"checkpoint")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nname = "lenet5"\n')
    return {
        "slim -o input": ["slim", model, "-o", model],
        "slim OUT input": ["slim", model, model],
        "slim via symlink": ["slim", link, model],
        "slim via hard link": ["slim", model, hard],
        "slim --json input": ["slim", model, out, "--json", model],
        "slim --plot input": ["slim", model, out, "--plot", model],
        "slim --json = OUT": ["slim", model, out, "--json", out],
        "slim --plot = --json": ["slim", model, out, "--json", tmp_path / "r.json", "--plot", tmp_path / "r.json"],
        "inspect --json input": ["inspect", model, "--json", link],
        "prune --save-masked input": ["prune", model, out, "--save-masked", model],
        "prune --save-masked = OUT": ["prune", model, out, "--save-masked", out],
        "check --json reference": ["check", model, hard, "--json", model],
        "check --json data": ["check", model, hard, "--data", data, "--json", data],
        "check --report-dir file": ["check", model, hard, "--report-dir", tmp_path, "--json", tmp_path / "check.json"],
        "bench --json input": ["bench", model, "--json", model],
        "bench --plot input": ["bench", model, "--plot", link],
        "export -o checkpoint": ["export", checkpoint, "-o", checkpoint],
        "run --out = recipe": ["run", recipe, "--out", recipe],
    }[case]


@pytest.mark.parametrize("case", [
    "slim -o input", "slim OUT input", "slim via symlink", "slim via hard link", "slim --json input",
    "slim --plot input", "slim --json = OUT", "slim --plot = --json", "inspect --json input",
    "prune --save-masked input", "prune --save-masked = OUT", "check --json reference", "check --json data",
    "check --report-dir file", "bench --json input", "bench --plot input", "export -o checkpoint",
    "run --out = recipe",
])
def test_outputs_never_replace_inputs_or_each_other(model_path, tmp_path, case):
    args = _collision_args(case, model_path, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()}
    result = invoke(args)
    assert_one_line_error(result)
    assert any(word in result.stderr for word in ("refusing to overwrite", "same file", "is a file"))
    after = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()}
    assert after == before  # nothing written, nothing replaced


@pytest.mark.parametrize("case", ["--json on the input's data", "OUT's data is the input's data"])
def test_external_data_files_count_as_inputs_and_outputs(tmp_path, case):
    model = tmp_path / "ext.onnx"
    location = "weights.bin" if case.startswith("--json") else "slim.onnx.data"
    onnx.save_model(masked_graph(64), str(model), save_as_external_data=True, location=location, size_threshold=0)
    args = {"--json on the input's data": ["slim", model, tmp_path / "slim.onnx", "--json", tmp_path / location],
            "OUT's data is the input's data": ["slim", model, tmp_path / "slim.onnx"]}[case]
    before = (tmp_path / location).read_bytes()
    assert_one_line_error(invoke(args), "external data")
    assert (tmp_path / location).read_bytes() == before and not (tmp_path / "slim.onnx").exists()


# -- 12. usage errors are one line too --------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["slim", "{dir}", "out.onnx"], "is a directory"),
    (["prune", "{model}", "out.onnx", "--ratio", "1.0"], "--ratio"),
    (["slim", "{model}", "out.onnx", "--round-to", "0"], "round"),
    (["run", "{recipe}", "--threads", "0"], "--threads"),
    (["run", "{recipe}", "--threads", "two"], "--threads"),
    (["bench", "{model}", "--threads", "1,x"], "--threads"),
    (["slim", "{model}", "out.onnx", "--no-such-option"], "--no-such-option"),
    (["slim"], "MODEL"),
    (["nonsense"], "nonsense"),
], ids=["dir-as-model", "ratio-1.0", "round-to-0", "threads-0", "threads-two", "bench-threads", "unknown-option",
        "missing-model", "unknown-command"])
def test_usage_errors_are_one_error_line(model_path, tmp_path, args, fragment):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nname = "lenet5"\n')
    args = [a.replace("{dir}", str(tmp_path)).replace("{model}", str(model_path)).replace("{recipe}", str(recipe))
            for a in args]
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        assert_one_line_error(invoke(args), fragment)


def test_help_and_bare_command_still_work():
    assert invoke(["--help"]).exit_code == 0
    assert "Usage" in invoke(["slim", "--help"]).output


# -- 4. output-side OS errors -----------------------------------------------------------------------
def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("target, code", [
    ("os.fsync", errno.ENOSPC),  # disk full while writing
    ("os.replace", errno.EROFS),  # read-only file system at the rename
    ("tempfile.mkstemp", errno.EACCES),  # folder not writable
], ids=["ENOSPC", "EROFS", "EACCES"])
def test_os_errors_on_output_are_one_line_and_leave_nothing(model_path, tmp_path, monkeypatch, target, code):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    module, name = target.split(".")
    monkeypatch.setattr(sys.modules[module], name, _fail_with(code))
    result = invoke(["slim", model_path, out])
    monkeypatch.undo()
    assert_one_line_error(result, "cannot write", str(out), os.strerror(code))
    assert out.read_bytes() == b"previous result"
    assert stray_temporaries(tmp_path) == []


def test_unwritable_output_path(model_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert_one_line_error(invoke(["slim", model_path, blocker / "out.onnx"]), "cannot write")
    assert blocker.read_text() == "a file where a folder should be"


def test_run_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nname = "lenet5"\n[data]\ntrain_samples = 100\ntest_samples = 50\n')
    assert_one_line_error(invoke(["run", recipe, "--out", blocker / "run", "--no-progress"]), "Not a directory")


def test_writer_errors_remove_the_temporary(tmp_path):
    def torch_save_fails(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OnnxSlimError, match="No space left"):
        write_with_atomic(tmp_path / "masked.pt", torch_save_fails)
    assert list(tmp_path.iterdir()) == []


# -- 3 and 11. big models: external data written atomically, never appended, and counted -----------
def test_external_data_is_atomic_and_never_appended(tmp_path):
    model = masked_graph(channels=64, size=8)  # weights of 1 KiB and more go to the side file
    path, data = tmp_path / "big.onnx", tmp_path / "big.onnx.data"
    data.write_bytes(b"x" * 100_000)  # a previous, larger side file: must be replaced, not appended to
    written = save_model_atomic(model, path, external_threshold=0)
    reloaded = onnx.load(str(path))
    assert written == path.stat().st_size + data.stat().st_size
    assert data.stat().st_size < 100_000 and b"xxxx" not in data.read_bytes()[:4]
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(path), load_external_data=False)
               .graph.initializer)
    assert_equivalent(model, reloaded)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)  # caller's model intact
    assert stray_temporaries(tmp_path) == []
    save_model_atomic(model, path, external_threshold=0)  # again: same size, nothing appended
    assert path.stat().st_size + data.stat().st_size == written


def test_failed_external_write_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(model, target, **kwargs):
        Path(target).with_name(kwargs["location"]).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full_disk)
    with pytest.raises(OnnxSlimError, match="No space left"):
        save_model_atomic(masked_graph(64), tmp_path / "big.onnx", external_threshold=0)
    assert list(tmp_path.iterdir()) == []


def test_size_figures_count_external_data(tmp_path):
    model = masked_graph(channels=64)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.weights", size_threshold=1024)
    on_disk = path.stat().st_size + (tmp_path / "ext.weights").stat().st_size
    _, report = slim(path, tmp_path / "slim.onnx")
    assert report.size_before == on_disk
    assert report.size_after == (tmp_path / "slim.onnx").stat().st_size
    assert 0 < report.size_after < report.size_before


# -- 5. malformed initializers ----------------------------------------------------------------------
def _break(model: onnx.ModelProto, how: str, folder: Path) -> Path:
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    path = folder / "broken.onnx"
    if how == "raw bytes":
        weight.raw_data = weight.raw_data[:-4]
    elif how == "typed values":
        values = numpy_helper.to_array(weight).ravel()[:-1]
        weight.ClearField("raw_data")
        weight.float_data.extend(values.tolist())
    elif how == "negative dims":
        weight.dims[0] = -weight.dims[0]
    if how.startswith("external"):
        onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
        side = folder / "w.bin"
        if how == "external short":
            side.write_bytes(side.read_bytes()[:-8])
        elif how == "external missing":
            side.unlink()
        else:  # external data outside the model's folder
            proto = onnx.load(str(path), load_external_data=False)
            for tensor in proto.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = "../w.bin"
            onnx.save(proto, str(path))
    else:
        onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("how, message", [
    ("raw bytes", "holds"),
    ("typed values", "holds"),
    ("negative dims", "negative dims"),
    ("external short", "shorter than"),
    ("external missing", "not found"),
    ("external outside", "outside the model's folder"),
], ids=["raw-bytes", "typed-values", "negative-dims", "external-short", "external-missing", "external-outside"])
def test_malformed_initializers_are_bad_input(tmp_path, how, message):
    broken = _break(masked_graph(), how, tmp_path)
    before = broken.read_bytes()
    for command in (["slim", broken, tmp_path / "out.onnx"], ["inspect", broken]):
        assert_one_line_error(invoke(command), message)
    assert broken.read_bytes() == before and not (tmp_path / "out.onnx").exists()
    with pytest.raises(OnnxSlimError, match=message):
        load_onnx(broken)


# -- 6. strict recipes ------------------------------------------------------------------------------
@pytest.mark.parametrize("section, message", [
    ({"training": {"sparse": {"lr": float("nan")}}}, "[training.sparse] lr must be a finite number"),
    ({"training": {"dense": {"lr": float("inf")}}}, "[training.dense] lr must be a finite number"),
    ({"training": {"dense": {"lr": 0.0}}}, "[training.dense] lr must be > 0"),
    ({"training": {"batch_size": 0}}, "[training] batch_size must be > 0"),
    ({"training": {"finetune": {"epochs": -1}}}, "[training.finetune] epochs must be >= 0"),
    ({"training": {"sparse": {"momentum": 1.5}}}, "[training.sparse] momentum must be <= 1"),
    ({"training": {"device": 1}}, "[training] device must be str"),
    ({"data": {"train_samples": -5}}, "[data] train_samples must be >= 0"),
    ({"data": {"dataset": 3}}, "[data] dataset must be str"),
    ({"validate": {"repeat": 0}}, "[validate] repeat must be > 0"),
    ({"validate": {"eval_batch_size": -2}}, "[validate] eval_batch_size must be > 0"),
    ({"targets": {"max_abs_diff": float("nan")}}, "[targets] max_abs_diff must be a finite number"),
    ({"targets": {"min_params_removed": 1.5}}, "[targets] min_params_removed must be <= 1"),
    ({"targets": {"max_accuracy_drop": 0.005}}, "max_accuracy_drop_pt = 0.5"),
    ({"targets": {"max_acuracy_drop_pt": 1}}, "[targets]: unknown key(s) max_acuracy_drop_pt"),
    ({"method": {"name": "l1_mask", "params": {"lam": float("nan")}}}, "[method.params] lam must be a finite"),
    ({"method": {"name": "l1_mask", "params": 3}}, "[method] params must be a table"),
    ({"method": {"name": 7}}, "[method] name must be a string"),
    ({"export": {"opset": True}}, "[export] opset must not be a boolean"),
    ({"export": {"opset": 13}}, "[export] opset must be >= 17"),
    ({"export": {"opset": 99}}, "[export] opset must be <= "),  # above the installed onnx's newest
    ({"name": ["x"]}, "name must be a string"),
])
def test_recipe_values_are_checked_with_their_key_path(section, message):
    raw = {"model": {"name": "lenet5"}, **section}
    with pytest.raises(OnnxSlimError) as info:
        recipe_from_dict(raw, source="r.toml")
    assert message in str(info.value) and str(info.value).startswith("r.toml")
    assert "\n" not in str(info.value)


def test_recipe_nan_from_toml_file_exits_2(tmp_path):
    recipe = tmp_path / "nan.toml"
    recipe.write_text('[model]\nname = "lenet5"\n[training.sparse]\nepochs = 1\nlr = nan\n')
    assert_one_line_error(invoke(["run", recipe, "--out", tmp_path / "run"]), "[training.sparse] lr")
    assert not (tmp_path / "run").exists()


# -- 9. SIGTERM unwinds like Ctrl-C; temporaries of killed runs are recognised and removed -----------
_SLOW_WRITE = """
import os, sys, time
def slow_fsync(fd):
    print("WRITING", flush=True)
    time.sleep(60)
os.fsync = slow_fsync
from onnxslim.cli import main
main(sys.argv[1:])
"""


def _start_slow_slim(model: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SLOW_WRITE), "slim", str(model), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:  # wait until the temporary file is open and half-written
        if "WRITING" in line:
            return process
    process.wait(timeout=30)
    raise AssertionError(f"the writer never started: {process.stderr.read()}")


def test_sigterm_mid_write_removes_the_temporary(model_path, tmp_path):
    out_dir = tmp_path / "out"
    process = _start_slow_slim(model_path, out_dir / "slim.onnx")
    assert len(stray_temporaries(out_dir)) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(out_dir.iterdir()) == []


def test_temporaries_of_killed_runs_are_removed_by_the_next_run(model_path, tmp_path):
    out_dir = tmp_path / "out"
    process = _start_slow_slim(model_path, out_dir / "slim.onnx")
    process.kill()  # SIGKILL: no cleanup possible
    process.wait(timeout=30)
    (stray,) = stray_temporaries(out_dir)
    assert stray.name.startswith(f"{TEMP_PREFIX}{process.pid}-slim.onnx.")
    alive = out_dir / f"{TEMP_PREFIX}{os.getppid()}-other.onnx.abc.tmp"  # a running writer's file stays
    alive.write_bytes(b"in progress")
    result = invoke(["slim", model_path, out_dir / "slim.onnx"])
    assert result.exit_code == 0, result.output
    assert not stray.exists() and alive.exists()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["slim.onnx", alive.name])


# -- 10. the umask decides the mode -----------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_honour_the_umask(model_path, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "slim.onnx"
        result = invoke(["slim", model_path, out, "--json", tmp_path / "r.json"])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    for path in (out, tmp_path / "r.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# -- docs/robustness.md names real tests ------------------------------------------------------------
def test_robustness_doc_names_real_tests():
    import re

    rows = [line for line in (ROOT / "docs" / "robustness.md").read_text().splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 40
    for row in rows:
        references = re.findall(r"`(test_\w+\.py)::(test_\w+)", row)
        assert references, row
        for file, function in references:
            assert f"def {function}(" in (ROOT / "tests" / file).read_text(), (file, function)
