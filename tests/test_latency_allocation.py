"""Per-layer latency table (measured once per machine, cached) and the greedy per-layer allocation."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import GraphBuilder, assert_equivalent, run
from test_allocate import wide_net as plain_net

from onnxslim.cli import main
from onnxslim.graph.allocate import prune_to_target
from onnxslim.graph.greedy import greedy_trace, macs_cost
from onnxslim.graph.prune import channel_scores
from onnxslim.graph.slim import analyse
from onnxslim.validate.latency_table import LatencyTable, grid_levels, layer_signature, probe_model


def residual_depthwise_net() -> onnx.ModelProto:
    """stem -> [1x1 expand -> depthwise 3x3 -> 1x1 project] + stem (Add) -> 1x1 head, twice the same block."""
    g = GraphBuilder(seed=7)
    x = g.input([1, 3, 12, 12])
    y = g.op("Relu", [g.conv(x, 3, 32)])
    for _ in range(2):
        e = g.op("Relu", [g.conv(y, 32, 64, k=1)])
        d = g.op("Relu", [g.conv(e, 64, 64, groups=64)])
        y = g.op("Add", [g.conv(d, 64, 32, k=1), y])
    g.output(g.conv(y, 32, 4, k=1))
    return g.model()


class FakeMeasure:
    """Counts calls; milliseconds proportional to the probe's weight elements plus a fixed cost."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model: onnx.ModelProto, threads: int) -> float:
        self.calls += 1
        weight = next(t for t in model.graph.initializer if t.name == "w")
        return 1e-4 * float(np.prod(weight.dims)) + 0.01


def signatures(model, batch=1):
    analysis = analyse(model)
    return [layer_signature(node, analysis.index, batch) for node in analysis.creators.values()]


def test_table_is_cached_reused_and_keyed_by_threads_and_batch(tmp_path):
    sigs = signatures(residual_depthwise_net())
    assert len({s.key() for s in sigs}) < len(sigs)  # the repeated block shares its tables
    fake = FakeMeasure()
    first = LatencyTable(1, 1, 4, tmp_path, fake)
    first.ensure(sigs, progress=False)
    assert first.measured == fake.calls > 0 and first.cached == 0
    stored = json.loads(first.path.read_text())
    assert first.path.parent == tmp_path and stored["threads"] == 1 and stored["batch"] == 1
    assert sum(len(points) for points in stored["points"].values()) == fake.calls
    again = LatencyTable(1, 1, 4, tmp_path, fake)
    calls = fake.calls
    again.ensure(sigs, progress=False)
    assert fake.calls == calls and again.measured == 0 and again.cached == calls  # nothing measured again
    for sig in sigs:
        assert again.estimate(sig, sig.cin, sig.cout) == first.estimate(sig, sig.cin, sig.cout)
    other = [LatencyTable(2, 1, 4, tmp_path, fake), LatencyTable(1, 8, 4, tmp_path, fake)]
    assert len({first.path, *(table.path for table in other)}) == 3
    for table in other:
        table.ensure(signatures(residual_depthwise_net(), table.batch), progress=False)
        assert table.measured > 0 and table.path.is_file()


def test_interpolation_is_exact_for_a_bilinear_cost(tmp_path):
    (_, sig, *_) = signatures(plain_net())  # Conv 64 -> 96, 3x3
    table = LatencyTable(1, 1, 4, tmp_path, FakeMeasure())
    table.ensure([sig], progress=False)
    assert grid_levels(64, 4) == [4, 16, 32, 48, 64]
    for cin, cout in [(64, 96), (40, 50), (17, 93), (5, 30)]:  # weights cout*cin*9 elements: bilinear
        assert table.estimate(sig, cin, cout) == pytest.approx(1e-4 * cout * cin * 9 + 0.01)


def test_depthwise_probe_keeps_group_equal_to_channels():
    dw = [s for s in signatures(residual_depthwise_net()) if s.tied]
    assert dw and all(s.cin == s.cout == 64 for s in dw) and len({s.key() for s in dw}) == 1
    assert dw[0].points(4) == [(c, c) for c in grid_levels(64, 4)]
    model = probe_model(dw[0], 24, 24)
    (node,) = model.graph.node
    assert next(a.i for a in node.attribute if a.name == "group") == 24
    (out,) = run(model, {"x": np.ones((1, 24, 12, 12), np.float32)})
    assert out.shape == (1, 24, 12, 12)


def kept(slimmed: onnx.ModelProto) -> dict[str, int]:
    weights = {t.name: t.dims for t in slimmed.graph.initializer}
    return {node.name: weights[node.input[1]][0] for node in slimmed.graph.node if node.op_type == "Conv"}


def test_greedy_respects_residual_and_depthwise_coupling_and_min_channels():
    model = residual_depthwise_net()
    slimmed, report, masked, result = prune_to_target(model, "macs", 0.15, min_channels=3, max_layer_ratio=1.0,
                                                      round_to=1)
    assert_equivalent(masked, slimmed)
    counts = kept(slimmed)
    convs = [n for n in slimmed.graph.node if n.op_type == "Conv"]
    stem, *blocks, head = convs
    for expand, depthwise, project in zip(blocks[0::3], blocks[1::3], blocks[2::3]):
        assert counts[project.name] == counts[stem.name]  # residual Add: one class across the block
        assert counts[depthwise.name] == counts[expand.name]  # depthwise: its inputs are its outputs
        assert next(a.i for a in depthwise.attribute if a.name == "group") == counts[depthwise.name]
    assert min(counts.values()) >= 3 and counts[head.name] == 4  # graph output untouched
    assert result.achieved < 0.5  # it did prune hard
    capped = prune_to_target(model, "macs", 0.15, max_layer_ratio=0.5, round_to=1)[0]
    assert all(count >= size / 2 for count, size in zip(kept(capped).values(), [32, 64, 64, 32, 64, 64, 32, 4]))


def test_target_macs_met_on_a_small_conv_net():
    model = plain_net()
    slimmed, report, masked, result = prune_to_target(model, "macs", 0.5, round_to=1)
    assert_equivalent(masked, slimmed)
    # one step removes 3 of 96 channels of the middle layers, 3 % of the MACs: half a step from the target
    assert abs(result.achieved - 0.5) <= 0.02 * 0.5 + 1e-9
    assert result.achieved == pytest.approx(report.macs_after / report.macs_before)
    assert result.allocation == "greedy" and sum(v[0] for v in result.details["kept"].values()) < 64 + 96 + 64 + 8


def test_greedy_trace_spends_least_importance_per_cost():
    analysis = analyse(plain_net())
    scores = channel_scores(analysis, "l1")
    from onnxslim.graph.stats import count_macs

    _, _, per_node = count_macs(analysis.index.model, analysis.index.shapes, analysis.rules)
    layer_macs = {name: float(per_node[analysis.index.node_name(node)]) for name, node in analysis.creators.items()}
    trace = greedy_trace(analysis, scores, macs_cost(analysis, layer_macs), multiple=4)
    totals = [step.total for step in trace.steps]
    assert trace.full == pytest.approx(sum(layer_macs.values()))
    assert totals == sorted(totals, reverse=True) and totals[-1] <= 0.05 * trace.full + max(layer_macs.values())
    chosen, estimate = trace.cut(0.5)
    assert estimate <= 0.5 and chosen and len(chosen) < len(trace.cut(0.25)[0])


def test_latency_target_end_to_end_with_a_fake_measure(tmp_path):
    model = residual_depthwise_net()
    fake = FakeMeasure()
    slimmed, report, masked, result = prune_to_target(model, "latency", 0.6, rounds=3, max_steps=2, round_to=4,
                                                      cache_dir=tmp_path, measure=fake)
    assert_equivalent(masked, slimmed)
    details = result.details
    assert details["points_measured"] == fake.calls > 0 and details["table"].startswith(str(tmp_path))
    assert 1 <= len(result.steps) <= 2 and result.achieved > 0 and "latency table:" in report.notes[-2]
    calls = fake.calls
    result = prune_to_target(model, "latency", 0.6, rounds=3, max_steps=1, round_to=4, cache_dir=tmp_path,
                             measure=fake)[3]
    assert fake.calls == calls and result.details["points_cached"] == calls


def test_prune_cli_target_latency_greedy_and_bad_values(tmp_path):
    source, out = tmp_path / "net.onnx", tmp_path / "pruned.onnx"
    onnx.save(plain_net(), str(source))
    cache = tmp_path / "cache"
    result = CliRunner().invoke(main, ["prune", str(source), str(out), "--target-latency", "0.7", "--latency-cache",
                                       str(cache), "--no-verify-speed", "--round-to", "4"])
    assert result.exit_code == 0, result.output
    assert "latency table: " + str(cache) in result.output and "target latency: keep 0.700" in result.output
    assert len(list(cache.glob("*.json"))) == 1
    bad = CliRunner().invoke(main, ["prune", str(source), str(out), "--target-latency", "0.7", "--allocation", "best"])
    assert bad.exit_code == 2 and "error:" in bad.stderr
    zero = CliRunner().invoke(main, ["prune", str(source), str(out), "--target-latency", "0"])
    assert zero.exit_code == 2 and "error:" in zero.stderr


def test_correction_converges_when_the_table_misses_a_fixed_share():
    from onnxslim.graph.allocate import correct_target

    def estimate_of(internal):  # a trace cut in steps of 0.01
        return round(internal, 2)

    def evaluate(internal):  # the whole model: 30 % of its time is not in the table and does not shrink
        achieved = 0.3 + 0.7 * estimate_of(internal)
        return achieved, internal

    result, payload = correct_target(estimate_of, evaluate, 0.5, tolerance=0.02, max_steps=6)
    assert abs(result.achieved - 0.5) <= 0.02 * 0.5 + 1e-9 and payload == result.ratio and 2 <= len(result.steps) <= 6
    assert result.steps[0].ratio == 0.5 and result.steps[0].value == pytest.approx(0.65)


def test_target_latency_of_a_model_without_timed_layers_is_refused(tmp_path):
    """A QOperator int8 model (QLinearConv, QGemm): the latency table times none of its layers, so the
    greedy allocation removed nothing and said `not within 10 %`, and every layer was noted as lacking static
    shapes (the wrong reason). Now `--target-latency` says which layers it times, exit 2, nothing written."""
    from rules.test_qoperator import _conv_chain

    source, out = tmp_path / "q.onnx", tmp_path / "out.onnx"
    onnx.save(_conv_chain(1), source)
    result = CliRunner().invoke(main, ["prune", str(source), str(out), "--target-latency", "0.7", "--latency-cache",
                                       str(tmp_path / "cache"), "--no-verify-speed"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: --target-latency times Conv, ConvTranspose, Gemm, MatMul layers alone; "
                                     "this model's layers are QGemm, QLinearConv: give --target-macs or --ratio instead")
    assert not out.exists()
