"""Benchmark: the figures exist and are consistent, the A/B ratio and its CI, options, `bench` CLI."""

import dataclasses
import json
import math

import numpy as np
import onnx
import pytest
from _validate_models import conv_net, segmenter
from click.testing import CliRunner

from onnxslim.cli import main
from onnxslim.errors import OnnxSlimError
from onnxslim.validate.bench import BenchOptions, benchmark, median_ci

FAST = dict(warmup=1, repeat=7, session_repeats=1)


def test_median_ci_is_the_sign_test_interval():
    rng = np.random.default_rng(0)
    for n in (6, 11, 40, 101):
        values = rng.standard_normal(n).tolist()
        low, high, coverage = median_ci(values, 0.95)
        ordered = sorted(values)
        k = ordered.index(low) + 1  # 1-based rank of the lower bound
        assert high == ordered[n - k]
        assert low <= float(np.median(values)) <= high
        # coverage is 1 - 2 P(B <= k-1), B ~ Binomial(n, 1/2); it reaches 95%, and k+1 would not
        tail = sum(math.comb(n, i) for i in range(k)) / 2**n
        assert coverage == pytest.approx(1 - 2 * tail)
        assert coverage >= 0.95
        assert 1 - 2 * (tail + math.comb(n, k) / 2**n) < 0.95 or k == (n + 1) // 2


def test_median_ci_with_too_few_values_returns_the_range():
    low, high, coverage = median_ci([3.0, 1.0, 2.0], 0.95)
    assert (low, high) == (1.0, 3.0) and coverage == pytest.approx(0.75)


def test_two_models_give_figures_and_a_paired_ratio():
    mask = np.ones(8)
    mask[:4] = 0
    report = benchmark([conv_net(8, name="a"), conv_net(8, mask=mask, name="b")],
                       BenchOptions(**FAST), progress=False)
    assert [m.name for m in report.models] == ["a", "b"]
    for timing in report.models:
        assert len(timing.samples_ms) == FAST["repeat"]
        assert 0 < timing.min_ms <= timing.median_ms <= timing.p90_ms <= timing.p99_ms
        assert timing.mean_ms > 0 and timing.std_ms >= 0 and timing.session_ms > 0
        assert timing.peak_memory_mb is not None and timing.peak_memory_mb >= 0
    (comparison,) = report.comparisons
    ratios = np.array(report.models[0].samples_ms) / np.array(report.models[1].samples_ms)
    assert comparison.speedup == pytest.approx(float(np.median(ratios)))
    assert comparison.ci_low <= comparison.speedup <= comparison.ci_high
    assert comparison.rounds == FAST["repeat"]
    data = report.to_dict()
    assert data["configs"][0]["comparisons"][0]["speedup"] == comparison.speedup
    assert "peak RSS" in data["memory_method"]
    json.dumps(data)  # every figure is plain JSON
    assert "speedup" in report.format_table()


def test_round_order_is_random_seeded_and_recorded():
    model = conv_net(8)
    options = BenchOptions(**{**FAST, "repeat": 40}, measure_memory=False, order_seed=3)
    first = benchmark([model, model, model], options, progress=False, names=["a", "b", "c"])
    again = benchmark([model, model, model], options, progress=False, names=["a", "b", "c"])
    orders = first.configs[0].orders
    assert orders == again.configs[0].orders  # seeded
    assert len(orders) == 40 and all(sorted(o) == [0, 1, 2] for o in orders)
    assert len(set(orders)) > 2  # not a fixed alternation
    assert {o[0] for o in orders} == {0, 1, 2}  # every model also runs first in some round
    data = first.to_dict()
    assert data["options"]["order_seed"] == 3 and data["configs"][0]["round_orders"][0] == list(orders[0])
    other = benchmark([model, model, model], dataclasses.replace(options, order_seed=4), progress=False,
                      names=["a", "b", "c"])
    assert other.configs[0].orders != orders


@pytest.mark.parametrize("round_warmup", [0, 1, 3])
def test_each_timed_run_follows_untimed_runs_of_the_same_model(round_warmup):
    """Every round, a model runs ``round_warmup`` times untimed, then once timed: its timed run finds its
    own weights in cache (a slimmed model is not timed right after the dense model evicted them)."""
    from onnxslim.validate.bench import _time_rounds

    calls = []

    class Session:
        def __init__(self, label):
            self.label = label

        def run(self, outputs, feed):
            calls.append(self.label)

    orders = [(0, 1), (1, 0), (1, 0)]
    out = np.zeros((2, len(orders)))
    _time_rounds([Session("a"), Session("b")], [{}, {}], orders, out, round_warmup)
    per_model = round_warmup + 1
    expected = [label for order in orders for i in order for label in ["ab"[i]] * per_model]
    assert calls == expected and (out >= 0).all()
    with pytest.raises(OnnxSlimError, match="round_warmup >= 0"):
        BenchOptions(round_warmup=-1).validate()


def test_identical_copies_come_out_even():
    """Two byte-identical copies: the ratio's confidence interval contains 1.0 (no order bias).

    A statistical property, not a timing threshold: with random order per round the two copies are
    exchangeable, so the sign-test interval (99 %) misses 1.0 only by chance (about 1 % of runs).
    """
    model = conv_net(4, size=8)
    options = BenchOptions(warmup=20, repeat=300, session_repeats=6, measure_memory=False, confidence=0.99)
    report = benchmark([model, model], options, progress=False, names=["copy-a", "copy-b"])
    (comparison,) = report.comparisons
    assert comparison.coverage >= 0.99
    assert comparison.ci_low <= 1.0 <= comparison.ci_high, comparison


def test_thread_and_batch_grid():
    report = benchmark([conv_net(4)], BenchOptions(threads=(1, 2), batch_sizes=(1, 3), measure_memory=False, **FAST),
                       progress=False)
    grid = [(c.threads, c.batch_size) for c in report.configs]
    assert grid == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert report.configs[1].models[0].input_shapes == {"x": [3, 1, 28, 28]}


def test_dynamic_dims_need_a_shape():
    with pytest.raises(OnnxSlimError, match="dynamic dimension 2.*--input-shape x:1,1,H,W"):
        benchmark([segmenter()], BenchOptions(measure_memory=False, **FAST), progress=False)
    report = benchmark([segmenter()], BenchOptions(input_shapes={"x": [2, 1, 16, 16]}, measure_memory=False, **FAST),
                       progress=False)
    assert report.models[0].input_shapes == {"x": [2, 1, 16, 16]}


def test_unnamed_dynamic_dims_get_placeholders_in_the_message():
    """SCRFD (InsightFace) declares its input ``[1, 3, '?', '?']``: the message's example spells those dims
    ``D2,D3``, not ``?,?`` (which looks like something to type)."""
    model = segmenter()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "?", "unk__3"
    with pytest.raises(OnnxSlimError, match=r"dynamic dimension 2 \('\?'\).*--input-shape x:1,1,D2,D3 "):
        benchmark([model], BenchOptions(measure_memory=False, **FAST), progress=False)


def test_unavailable_provider_lists_the_installed_ones():
    import onnxruntime as ort

    with pytest.raises(OnnxSlimError, match="CPUExecutionProvider") as error:
        benchmark([conv_net(4)], BenchOptions(providers=("NoSuchExecutionProvider",), **FAST), progress=False)
    assert ort.__version__ in str(error.value)


@pytest.fixture()
def two_models(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_net(8), a)
    onnx.save(conv_net(4, seed=1), b)
    return a, b


def test_bench_cli_writes_json_and_plot(two_models, tmp_path):
    a, b = two_models
    out, plot = tmp_path / "bench.json", tmp_path / "latency.png"
    result = CliRunner().invoke(main, ["bench", str(a), str(b), "--warmup", "1", "--repeat", "5",
                                       "--session-repeats", "1", "--threads", "1", "--batch", "1,2",
                                       "--opt-level", "basic", "--json", str(out), "--plot", str(plot),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "A/B" in result.stdout and "median ms" in result.stdout
    data = json.loads(out.read_text())
    assert [c["batch_size"] for c in data["configs"]] == [1, 2]
    assert data["options"]["opt_level"] == "basic"
    assert data["configs"][0]["comparisons"][0]["candidate"] == "b.onnx"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_notes_weights_declared_as_graph_inputs(two_models, tmp_path):
    """A legacy export listing its weights as graph inputs (onnxruntime neither folds nor fuses them) is named."""
    a, _ = two_models
    legacy = onnx.load(a)
    legacy.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                              for t in legacy.graph.initializer)
    path = tmp_path / "legacy.onnx"
    onnx.save(legacy, path)
    result = CliRunner().invoke(main, ["bench", str(a), str(path), "--warmup", "1", "--repeat", "3",
                                       "--session-repeats", "1", "--threads", "1", "--no-memory", "--no-progress"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"{path} declares {len(legacy.graph.initializer)} weight(s)" in notes[0]


def test_bench_cli_unknown_provider_exits_2(two_models):
    result = CliRunner().invoke(main, ["bench", str(two_models[0]), "--provider", "xnnpack", "--no-progress"])
    import onnxruntime as ort

    if "XnnpackExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has XNNPACK")
    assert result.exit_code == 2
    assert "not available" in result.stderr and "CPUExecutionProvider" in result.stderr


def test_bench_cli_mobile_converts_to_ort(two_models, tmp_path):
    mobile_dir = tmp_path / "ort"
    out = tmp_path / "mobile.json"
    result = CliRunner().invoke(main, ["bench", str(two_models[0]), "--mobile", "--mobile-dir", str(mobile_dir),
                                       "--warmup", "1", "--repeat", "3", "--session-repeats", "1", "--no-memory",
                                       "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    ort_file = mobile_dir / "a.ort"
    assert ort_file.is_file() and ort_file.stat().st_size > 0
    data = json.loads(out.read_text())
    assert data["configs"][0]["threads"] == 1 and data["configs"][0]["models"][0]["name"] == "a.ort"
    (entry,) = data["mobile"]
    assert "NNAPI" in entry["usability_log"] and entry["usability_summary"]
    assert "Model should perform well with" in result.stdout


def test_bench_cli_mobile_rejects_threads(two_models):
    result = CliRunner().invoke(main, ["bench", str(two_models[0]), "--mobile", "--threads", "2", "--no-progress"])
    assert result.exit_code == 2 and "one thread" in result.stderr


def test_bench_cli_bad_model_exits_2(two_models, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    missing = CliRunner().invoke(main, ["bench", str(tmp_path / "missing.onnx"), "--no-progress"])
    assert missing.exit_code == 2 and "model not found" in missing.stderr
    garbage = CliRunner().invoke(main, ["bench", str(two_models[0]), str(text), "--no-progress"])
    assert garbage.exit_code == 2 and "not a loadable ONNX model" in garbage.stderr


def test_bench_takes_rounds_like_check_and_the_tools(tmp_path):
    """``bench --rounds N`` is ``--repeat N`` (``check`` and every tool spell it --rounds; bench refused it):
    a masked model slimmed by the CLI, equal in onnxruntime, then timed for exactly N rounds."""
    import onnxruntime as ort

    masked, slimmed = tmp_path / "masked.onnx", tmp_path / "slim.onnx"
    onnx.save(conv_net(8, mask=np.array([1, 0, 1, 0, 0, 1, 1, 0])), masked)
    runner = CliRunner()
    result = runner.invoke(main, ["slim", str(masked), "-o", str(slimmed), "--round-to", "1", "--no-verify-speed"])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(slimmed)).graph
    conv = next(node for node in graph.node if node.op_type == "Conv")
    assert next(i for i in graph.initializer if i.name == conv.input[1]).dims[0] == 4  # its 4 live filters
    x = {"x": np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)}
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, x)[0] for p in (masked, slimmed)]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    out = tmp_path / "bench.json"
    result = runner.invoke(main, ["bench", str(masked), str(slimmed), "--rounds", "6", "--warmup", "1",
                                  "--session-repeats", "1", "--no-memory", "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["configs"][0]["comparisons"][0]["rounds"] == 6
