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
    assert 0.1 < row["dense_rate_efficiency"] < 2.0 and row["kernel_efficiency"] > 0  # profiled kernel time
    assert "speedup / MACs ratio" in stdout and "dense time per MAC: median" in stdout


def test_latency_efficiency_tool_measures_given_onnx_files(tmp_path):
    """--onnx: a user's own file, measured at its own image size; a non-batch dynamic dim is a one-line error."""
    import onnx
    from graphs import GraphBuilder

    g = GraphBuilder(seed=1)
    x = g.input([1, 3, 16, 16])
    y = g.op("Relu", [g.conv(x, 3, 32)])
    g.output(g.conv(g.op("Relu", [g.conv(y, 32, 32)]), 32, 8))
    path = tmp_path / "user_net.onnx"
    onnx.save(g.model(), path)
    out, kept = tmp_path / "eff.json", tmp_path / "graphs"
    run_tool("bench_latency_efficiency.py", "--models", "", "--onnx", path, "--rounds", "2", "--warmup", "0",
             "--threads", "1", "--batch", "1", "--ratios", "0.5", "--round-to", "1", "--json", out, "--keep", kept)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "user_net" and row["macs_ratio"] > 2  # half of both sides of the middle conv
    assert sorted(p.name for p in kept.iterdir()) == ["user_net_r0.5.onnx"]  # the pruned graph, for bench --per-layer

    dynamic = onnx.load(path)
    dynamic.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    onnx.save(dynamic, tmp_path / "dynamic.onnx")
    completed = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_latency_efficiency.py"), "--models", "",
                                "--onnx", str(tmp_path / "dynamic.onnx")], cwd=ROOT, capture_output=True, text=True,
                               timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 2 and completed.stderr.strip().startswith("error:")
    assert "dynamic dims besides the batch" in completed.stderr
    before = path.read_bytes()
    completed = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_latency_efficiency.py"), "--models", "",
                                "--onnx", str(path), "--keep", str(tmp_path)], cwd=ROOT, capture_output=True,
                               text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 2 and "holds an --onnx input" in completed.stderr  # never written over
    assert path.read_bytes() == before
    # --json naming an --onnx input: refused before anything runs (before: the input was replaced by the JSON)
    completed = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_latency_efficiency.py"), "--models", "",
                                "--onnx", str(path), "--json", str(path)], cwd=ROOT, capture_output=True,
                               text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 2 and "is the input --onnx" in completed.stderr, completed.stderr
    assert path.read_bytes() == before


@pytest.mark.slow
def test_latency_efficiency_tool_target_mode(tmp_path):
    out = tmp_path / "target.json"
    run_tool("bench_latency_efficiency.py", "--models", "mobilenet_v3_small", "--size", "32", "--rounds", "3",
             "--warmup", "0", "--target-latency", "0.6", "--json", out)
    (row,) = json.loads(out.read_text())["targets"]
    assert row["target"] == 0.6 and 1 <= row["prunes"] <= 8 and 0 < row["macs_fraction"] < 1
    assert row["error"] == pytest.approx(row["verified_latency_fraction"] / 0.6 - 1)


@pytest.mark.slow
def test_tune_demo_tool_holds_out_validation_images(tmp_path):
    """tools/tune_demo.py: the held-out images are the validation split; settings share the baseline."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('[model]\nname = "lenet5"\nparams = { width = 0.25 }\n[data]\ntrain_samples = 240\n'
                      '[method]\nparams = { lam = 0.05, proximal = true, mask_lr_scale = 20.0, epsilon = 0.0 }\n'
                      '[training]\nbatch_size = 40\n[slim]\nround_to = 1\n')
    stdout = run_tool("tune_demo.py", "--recipe", recipe, "--epochs", "1,3,1", "--val", "80", "--set", "lam=0.2",
                      "--set", "lam=2.0", "--out", tmp_path / "tune")
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("240 train / 80 validation images (split seed 0)")  # train_samples kept
    rows = [json.loads(line) for line in lines[1:]]
    assert [row["params"] for row in rows] == [{"lam": 0.2}, {"lam": 2.0}]
    assert rows[0]["val_baseline"] == rows[1]["val_baseline"]  # one baseline for both settings
    for row in rows:
        assert row["drop_pt"] == pytest.approx(100 * (row["val_baseline"] - row["val_slim"]))
        assert 0 <= row["params_removed"] < 1
    assert rows[1]["params_removed"] > 0 and rows[1]["params_removed"] >= rows[0]["params_removed"]


@pytest.mark.slow
def test_side_by_side_tool(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('[model]\nname = "lenet5"\nparams = { width = 0.25 }\n[data]\ntrain_samples = 120\n'
                      '[training]\nbatch_size = 40\n')
    lines = run_tool("bench_side_by_side.py", "--recipe", recipe, "--epochs", "1,1", "--rounds", "1").splitlines()
    assert [line.split(":")[0] for line in lines] == ["round 0 side by side  ", "round 0 one after other"]
    assert all("wall" in line for line in lines)


@pytest.mark.slow
def test_round_to_models_tool_on_masked_models(tmp_path):
    """``--masked``: slim's rounding keeps extra zero channels, so the MACs ratio never rises with the multiple."""
    import onnx
    from graphs import GraphBuilder

    for name, zeros in (("dense", ()), ("masked", tuple(range(0, 24, 2)))):
        g = GraphBuilder(seed=3)
        y = g.op("Relu", [g.mask(g.conv(g.input([1, 3, 16, 16]), 3, 24), 24, zeros=zeros)])
        g.output(g.conv(y, 24, 8))
        onnx.save(g.model(), str(tmp_path / f"{name}.onnx"))
    stdout = run_tool("bench_round_to_models.py", "--masked", tmp_path, "--multiples", "1,8", "--rounds", "2")
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith(f"| {tmp_path.name} ")]
    assert [int(r[2]) for r in rows] == [1, 8]
    unrounded, rounded = (float(r[3]) for r in rows)
    assert unrounded == pytest.approx(2.0, rel=0.01) and 1.0 < rounded <= unrounded  # 12 of 24 channels zero


def test_run_main_turns_onnxslim_errors_into_one_line_and_exit_2(capsys):
    from onnxslim.errors import OnnxSlimError, run_main

    def bad():
        raise OnnxSlimError("unknown model 'nosuch'")

    with pytest.raises(SystemExit) as raised:
        run_main(bad)
    assert raised.value.code == 2 and capsys.readouterr().err == "error: unknown model 'nosuch'\n"
    for returned, code in ((None, None), (0, 0), (1, 1)):
        with pytest.raises(SystemExit) as raised:
            run_main(lambda returned=returned: returned)
        assert raised.value.code == code


@pytest.mark.parametrize("args, message", [
    (("bench_mask_overhead.py", "--model", "nosuch"), "error: unknown model 'nosuch'"),
    (("fuzz_slim.py", "--prune", "1.5"), "error: --prune is prune's ratio, in [0, 1)"),
    (("bench_slim.py", "--repeat", "0"), "error: --repeat and every --depths value must be >= 1"),
    # bench_latency_efficiency: before, a bad value was a traceback (--ratios a) or a "skipped" line for
    # every model and exit 0 (--ratios nan, --rounds 0, --batch 0, --round-to 0)
    (("bench_latency_efficiency.py", "--ratios", "a"), "error: --ratios takes ','-separated floats, got 'a'"),
    (("bench_latency_efficiency.py", "--ratios", "0.5,nan"), "error: --ratios must be in [0, 1), got [0.5, nan]"),
    (("bench_latency_efficiency.py", "--rounds", "0"), "error: --rounds and --size must be >= 1"),
    (("bench_latency_efficiency.py", "--batch", "0"), "error: --threads must be >= 0 and --batch >= 1"),
    (("bench_latency_efficiency.py", "--round-to", "0"), "error: round_to must be 'auto' or an integer >= 1"),
    (("bench_latency_efficiency.py", "--target-latency", "1.5"), "error: --target-latency must be in (0, 1]"),
    (("bench_latency_efficiency.py", "--models", ""), "error: nothing to measure: give --models or --onnx"),
    (("bench_latency_efficiency.py", "--models", "", "--onnx", "tools"), "error: tools: a folder, not an ONNX file"),
    (("bench_latency_efficiency.py", "--models", "", "--onnx", "a/net.onnx", "--onnx", "b/net.onnx"),
     "error: two graphs share the name 'net'"),
    # malformed number lists in the other tools: before, ValueError tracebacks (onnxslim.errors.parse_numbers)
    (("bench_round_to_models.py", "--ratios", "x"), "error: --ratios takes ','-separated floats, got 'x'"),
    (("bench_channel_sweep.py", "--channels", "1:2:3"), "error: --channels takes 2 ':'-separated ints, got '1:2:3'"),
    (("bench_round_to.py", "--keep-range", "0.3"), "error: --keep-range takes 2 ','-separated floats, got '0.3'"),
    (("bench_side_by_side.py", "--epochs", "2"), "error: --epochs takes 2 ','-separated ints, got '2'"),
    # before: every test ran (minutes), then a FileNotFoundError traceback
    (("channel_counts.py", "compare", "/nonexistent/counts.json"),
     "error: cannot read the fixture /nonexistent/counts.json: No such file or directory"),
], ids=["unknown-model", "prune-ratio", "zero-repeat", "eff-ratio-text", "eff-ratio-nan", "eff-rounds",
        "eff-batch", "eff-round-to", "eff-target", "eff-nothing", "eff-folder", "eff-same-stem", "round-to-models-ratios",
        "channel-sweep-range", "round-to-keep-range", "side-by-side-epochs", "channel-counts-no-fixture"])
def test_tools_refuse_bad_input_with_an_error_line(args, message):
    """Every tool runs its main through onnxslim.errors.run_main: bad input is `error: ...`, exit 2, no
    traceback (before: an OnnxSlimError or CalledProcessError traceback, exit 1)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run([sys.executable, str(ROOT / "tools" / args[0]), *args[1:]], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr and message in completed.stderr.strip().splitlines()[-1]


def test_every_tool_runs_its_main_through_run_main():
    for path in sorted((ROOT / "tools").glob("*.py")):
        if path.name != "check_function_length.py":
            assert path.read_text().endswith("    run_main(main)\n"), path.name
