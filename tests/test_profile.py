"""Per-layer latency from onnxruntime's profiler: trace parsing, node naming, before/after, `bench --per-layer`."""

import json

import numpy as np
import onnx
import pytest
from _validate_models import conv_net
from click.testing import CliRunner

from onnxslim.cli import main
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.slim import slim
from onnxslim.validate.profile import (
    LayerProfile,
    LayerTime,
    compare_profiles,
    dense_rate_kernels_ms,
    format_comparison,
    layer_macs,
    parse_trace,
    profile_layers,
)
from onnxslim.validate.runtime import SessionOptions


def _event(cat, name, ts, dur, op="Conv"):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"op_name": op,
                                                                     "output_type_shape": [{"float": [1, 4, 2, 2]}]}}


def test_parse_trace_drops_warmup_runs_and_takes_medians():
    events = []
    for run, (conv_us, relu_us) in enumerate([(900, 900), (100, 10), (300, 30), (200, 20)]):
        start = 10_000 * run
        events.append(_event("Session", "model_run", start, 2_000))
        events.append(_event("Node", "c_kernel_time", start + 5, conv_us))
        events.append(_event("Node", "c_fence_before", start + 4, 0))
        events.append(_event("Node", "r_kernel_time", start + 1_000, relu_us, op="Relu"))
    layers, run_ms = parse_trace(events, skip_runs=1)
    assert [(layer.node, layer.op_type) for layer in layers] == [("c", "Conv"), ("r", "Relu")]
    assert layers[0].median_ms == pytest.approx(0.2) and layers[1].median_ms == pytest.approx(0.02)
    assert layers[0].output_shape == (1, 4, 2, 2) and run_ms == pytest.approx(2.0)
    with pytest.raises(OnnxSlimError, match="no timed run"):
        parse_trace(events, skip_runs=4)


def test_profile_names_nodes_and_pairs_before_with_after():
    mask = np.ones(16)
    mask[:6] = 0
    masked = conv_net(16, size=16, mask=mask)
    assert not any(node.name for node in masked.graph.node)  # onnxruntime would number them
    slimmed, _ = slim(masked)
    plain = SessionOptions(opt_level="disable")
    before = profile_layers(masked, plain, runs=5, warmup=1, name="masked")
    after = profile_layers(slimmed, plain, runs=5, warmup=1, name="slim")
    # without graph optimisations the executed nodes are the model's own, named after their outputs
    assert [layer.node for layer in before.layers] == [node.output[0] for node in masked.graph.node]
    assert [layer.op_type for layer in before.layers] == [node.op_type for node in masked.graph.node]
    conv = next(layer for layer in after.layers if layer.op_type == "Conv")
    assert conv.output_shape == (1, 10, 16, 16)  # 6 of 16 channels deleted
    assert 0 < before.kernels_ms <= before.run_ms and before.overhead_ms >= 0
    rows = compare_profiles(before, after)
    paired = {r.node for r in rows if r.before_ms is not None and r.after_ms is not None}
    assert {"c", "r", "g", "f"} <= paired  # conv, relu, pool, flatten keep their names
    assert any(r.op_type == "Mul" and r.after_ms is None for r in rows)  # the mask is gone after slimming
    text = format_comparison(before, after)
    assert "before ms" in text and "Conv" in text


def test_dense_rate_kernel_time_scales_each_layer_by_its_own_work():
    """Each dense layer's time scaled by its MACs (conv, GEMM, resolved through onnxruntime's fused and
    NCHWc names) or its partner's output size (others)."""
    dense, pruned = conv_net(16, size=16), conv_net(8, size=16)  # half the channels: conv and Gemm MACs / 2
    before = LayerProfile("dense", (
        LayerTime("r_nchwc", "Conv", 1.0, (1, 16, 16, 16)),  # NCHWc Conv + Relu, named after Relu's output
        LayerTime("ReorderOutput_token_1", "ReorderOutput", 0.05, (1, 16, 16, 16)),  # numbered per session
        LayerTime("ReorderInput", "ReorderInput", 0.04, (1, 16, 16, 16)),  # the first one is not numbered
        LayerTime("g", "GlobalAveragePool", 0.2, (1, 16, 1, 1)),
        LayerTime("logits", "Gemm", 0.1, (1, 10))), run_ms=2.0, runs=5, threads=1)
    # onnxruntime's own nodes count at their time after pruning (0.01 + 0.02 ms), whatever their names
    after = LayerProfile("pruned", (LayerTime("g", "GlobalAveragePool", 0.15, (1, 8, 1, 1)),
                                    LayerTime("ReorderOutput_token_7", "ReorderOutput", 0.01, (1, 8, 16, 16)),
                                    LayerTime("ReorderInput", "ReorderInput", 0.02, (1, 1, 16, 16))),
                         run_ms=1.0, runs=5, threads=1)
    estimate = dense_rate_kernels_ms(before, after, dense, pruned, {"x": [1, 1, 16, 16]})
    assert estimate == pytest.approx(1.0 * 0.5 + 0.2 * 0.5 + 0.1 * 0.5 + 0.01 + 0.02)


def test_layer_macs_pair_fused_nodes_with_their_macs_and_explain_the_shortfall():
    """With onnxruntime's optimisations on, the conv runs fused with its Relu under another name; its MACs
    are still found, and halving the channels halves the conv's and the Gemm's MACs."""
    dense, pruned = conv_net(16, size=16), conv_net(8, size=16)
    shapes = {"x": [1, 1, 16, 16]}
    profiles = [profile_layers(m, SessionOptions(), runs=5, warmup=1, input_shapes=shapes) for m in (dense, pruned)]
    macs = tuple(layer_macs(p, m, shapes) for p, m in zip(profiles, (dense, pruned)))
    assert sorted(macs[0].values()) == [16 * 10, 16 * 9 * 16 * 16]  # Gemm 16x10, conv 16 filters of 1x3x3 per pixel
    assert sorted(macs[1].values()) == [8 * 10, 8 * 9 * 16 * 16]
    rows = compare_profiles(*profiles, macs=macs)
    assert sorted(r.macs_ratio for r in rows if r.macs_ratio) == [2.0, 2.0]
    assert all(r.macs_ratio is None for r in rows if r.op_type not in ("Conv", "FusedConv", "Gemm", "FusedGemm"))
    text = format_comparison(*profiles, macs=macs)
    assert "speedup / MACs" in text and "for a MACs ratio of 2.00x; other nodes:" in text
    assert "MACs ratio" not in format_comparison(*profiles)


def test_layer_macs_of_quantized_layers():
    """QLinearConv and QGemm count MACs (slim's report counts them) and onnxruntime runs QLinearConv under
    ``<node>_token_<n>`` after its layout pass: `bench --per-layer` gave them no MACs ratio ("-"). Each of
    the QOperator chain's layers now has its MACs, those of onnxslim.graph.stats."""
    from rules.test_qoperator import _conv_chain

    from onnxslim.graph.stats import model_stats

    model = _conv_chain(1)
    profile = profile_layers(model, SessionOptions(), runs=3, warmup=1)
    macs = layer_macs(profile, model)
    ops = {layer.node: layer.op_type for layer in profile.layers}
    assert sorted(ops[node] for node in macs) == ["QGemm", "QLinearConv", "QLinearConv"], ops
    assert sorted(macs.values()) == sorted(v for v in model_stats(model).layer_macs.values() if v)


def test_bench_per_layer_cli_writes_table_json_and_plot(tmp_path):
    mask = np.ones(16)
    mask[:6] = 0
    masked = conv_net(16, size=16, mask=mask)
    a, b = tmp_path / "masked.onnx", tmp_path / "slim.onnx"
    onnx.save(masked, str(a))
    slim(masked, b)
    out, plot = tmp_path / "bench.json", tmp_path / "layers.png"
    result = CliRunner().invoke(main, ["bench", str(a), str(b), "--warmup", "1", "--repeat", "5",
                                       "--session-repeats", "1", "--no-memory", "--per-layer", "--json", str(out),
                                       "--layer-plot", str(plot), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "per-layer latency" in result.output and "masked.onnx -> slim.onnx" in result.output
    data = json.loads(out.read_text())
    assert [p["name"] for p in data["per_layer"]] == ["masked.onnx", "slim.onnx"]
    assert all(p["layers"] and p["run_ms"] > 0 for p in data["per_layer"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speedup / MACs" in result.output and "conv/GEMM nodes:" in result.output
    dense_macs, slim_macs = (sorted(macs.values()) for macs in data["per_layer_macs"])
    assert dense_macs == [16 * 10, 16 * 9 * 16 * 16] and slim_macs == [10 * 10, 10 * 9 * 16 * 16]  # 6 of 16 deleted


def test_profiler_overhead_note_when_profiling_inflates_a_fast_model():
    """bench --per-layer on a 0.2 ms RegNet-style model said 0.815 -> 0.821 ms (no gain) beside an A/B speedup
    of 1.14x: the profiler's own per-node cost dominated. The note says so when a profiled run exceeds 1.5x the
    timed median, and stays silent otherwise. Profiles of a real masked / slimmed pair (6 of 16 filters gone)."""
    from onnxslim.validate.profile import profiler_overhead_note

    mask = np.ones(16)
    mask[:6] = 0
    masked = conv_net(16, size=16, mask=mask)
    slimmed, report = slim(masked)
    assert report.deleted_masked_channels == 6
    before = profile_layers(masked, runs=5, warmup=1, name="masked.onnx")
    after = profile_layers(slimmed, runs=5, warmup=1, name="slim.onnx")
    assert profiler_overhead_note([before, after], [before.run_ms, after.run_ms]) is None
    note = profiler_overhead_note([before, after], [before.run_ms, after.run_ms / 4])
    assert note.startswith("note: profiling inflates these runs (slim.onnx: ") and "4.0x" in note
    assert profiler_overhead_note([before], [0.0]) is None  # no timing: nothing to compare
