"""Report helpers (Markdown, JSON, GitHub step summary) and the PNG plots."""

import json

import numpy as np
import pytest
from PIL import Image

from onnxslim.graph.report import LayerChange
from onnxslim.plots import plot_accuracy_vs_macs, plot_latency, plot_layer_channels
from onnxslim.report import append_step_summary, format_bytes, markdown_table, write_report


def test_markdown_table_escapes_pipes():
    table = markdown_table(("a", "b"), [("x|y", 1)], align="lr")
    assert table.splitlines() == ["| a | b |", "|---|---:|", "| x\\|y | 1 |"]
    with pytest.raises(ValueError):
        markdown_table(("a", "b"), [("only one",)])


def test_write_report_writes_both_files(tmp_path):
    md, js = write_report(tmp_path / "out", "check", "# title", {"value": np.float32(0.5), "path": tmp_path})
    assert md.read_text() == "# title\n"
    assert json.loads(js.read_text()) == {"value": 0.5, "path": str(tmp_path)}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["check.json", "check.md"]  # no temp files left


def test_step_summary_is_appended(tmp_path):
    target = tmp_path / "summary.md"
    assert append_step_summary("ignored", environ={}) is None
    assert append_step_summary("first", environ={"GITHUB_STEP_SUMMARY": str(target)}) == target
    append_step_summary("second\n", environ={"GITHUB_STEP_SUMMARY": str(target)})
    assert target.read_text() == "first\n\nsecond\n\n"


def test_format_bytes():
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2**20) == "3.0 MiB"


def _assert_real_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(np.unique(pixels)) > 10  # something was drawn, not a blank canvas


def test_layer_channel_plot(tmp_path):
    layers = [LayerChange("conv1", "Conv", 16, 9), {"node": "conv2", "op_type": "Conv", "channels_before": 32,
                                                     "channels_after": 20}, ("fc", "Gemm", 10, 10)]
    _assert_real_png(plot_layer_channels(layers, tmp_path / "channels.png"))


def test_latency_plot_from_samples_and_report(tmp_path):
    from _validate_models import conv_net

    from onnxslim.validate.bench import BenchOptions, benchmark

    rng = np.random.default_rng(0)
    _assert_real_png(plot_latency({"a": rng.gamma(5, 1, 50), "b": rng.gamma(3, 1, 50)}, tmp_path / "lat.png"))
    report = benchmark([conv_net(4)], BenchOptions(warmup=0, repeat=5, session_repeats=1, measure_memory=False),
                       progress=False)
    _assert_real_png(plot_latency(report, tmp_path / "lat2.png"))


def test_accuracy_vs_macs_plot(tmp_path):
    runs = [{"method": "l1", "macs": 2e6, "accuracy": 0.98, "label": "50%"},
            {"method": "l1", "macs": 1e6, "accuracy": 0.97},
            {"method": "hard-concrete", "macs": 1.2e6, "accuracy": 0.975}]
    _assert_real_png(plot_accuracy_vs_macs(runs, tmp_path / "acc.png"))
