"""Never silently slower: the quick A/B note after slim/prune, and --ensure-faster keeping the fastest exact result."""

import onnx
from click.testing import CliRunner
from graphs import GraphBuilder, assert_equivalent

from onnxslim.cli import main
from onnxslim.validate.speedcheck import SpeedCheck, ensure_faster


def masked_net(width=24, zeros=9, size=12) -> onnx.ModelProto:
    g = GraphBuilder(seed=2)
    x = g.input([1, 3, size, size])
    y = g.op("Relu", [g.mask(g.conv(x, 3, width), width, zeros=range(zeros))])
    g.output(g.conv(y, width, 4))
    return g.model()


def test_note_warns_only_when_fewer_macs_are_not_faster():
    slower = SpeedCheck(0.93, 0.88, 0.99, 15, 1, macs_ratio=1.6)
    assert slower.slower and slower.note().startswith("WARNING") and "--ensure-faster" in slower.note()
    assert "38% fewer MACs" in slower.note()
    faster = SpeedCheck(1.4, 1.3, 1.5, 15, 1, macs_ratio=1.6)
    assert not faster.slower and faster.note().startswith("speed check: 1.40x")
    same_macs = SpeedCheck(0.99, 0.95, 1.02, 15, 1, macs_ratio=1.0)
    assert not same_macs.slower  # nothing was removed: no promise to keep


def test_note_explains_a_speedup_clearly_short_of_the_macs_ratio():
    short = SpeedCheck(4.25, 4.1, 4.4, 15, 1, macs_ratio=8.05)  # MobileNetV2 at ratio 0.7, docs/latency.md
    assert short.short_of_macs and "53% of its MACs ratio 8.05" in short.note()
    assert "--target-latency" in short.note() and not short.note().startswith("WARNING")
    assert "--target-latency" not in short.note(planned_on_time=True)
    noisy = SpeedCheck(1.9, 1.5, 2.2, 15, 1, macs_ratio=2.6)  # 0.73 at the median, but the CI reaches 0.85
    assert not noisy.short_of_macs and "of its MACs ratio" not in noisy.note()


def test_ensure_faster_keeps_the_fastest_build():
    small, large = masked_net(size=8), masked_net(width=96, zeros=0, size=96)  # ~100x the MACs

    def build(multiple):
        return (large if multiple == 1 else small), f"report {multiple}", None

    (model, report, _), chosen, tried = ensure_faster(masked_net(size=8), build, [1, 4], rounds=6)
    assert chosen == 4 and model is small and report == "report 4"
    assert [m for m, _ in tried] == [1, 4] and tried[1][1] > tried[0][1]


def test_slim_cli_ensure_faster_and_speed_note(tmp_path):
    source, out = tmp_path / "masked.onnx", tmp_path / "slim.onnx"
    masked = masked_net()
    onnx.save(masked, str(source))
    result = CliRunner().invoke(main, ["slim", str(source), str(out), "--ensure-faster"])
    assert result.exit_code == 0, result.output
    assert "note: ensure-faster: round-to" in result.output and "kept round-to" in result.output
    assert "speed check:" in result.output or "WARNING: the result is not faster" in result.output
    assert_equivalent(masked, onnx.load(str(out)))
    quiet = CliRunner().invoke(main, ["slim", str(source), str(out), "--no-verify-speed", "--round-to", "1"])
    assert quiet.exit_code == 0, quiet.output
    assert "speed check" not in quiet.output and "WARNING" not in quiet.output
    assert "24 -> 15" in quiet.output


def test_prune_cli_ensure_faster_writes_the_chosen_masked_reference(tmp_path):
    g = GraphBuilder(seed=4)
    x = g.input([1, 3, 12, 12])
    y = g.op("Relu", [g.conv(x, 3, 30)])
    g.output(g.conv(y, 30, 4))
    source, out, masked_path = tmp_path / "net.onnx", tmp_path / "pruned.onnx", tmp_path / "masked.onnx"
    onnx.save(g.model(), str(source))
    result = CliRunner().invoke(main, ["prune", str(source), str(out), "--ratio", "0.3", "--ensure-faster",
                                       "--save-masked", str(masked_path), "--no-verify-speed"])
    assert result.exit_code == 0, result.output
    assert "ensure-faster" in result.output
    assert_equivalent(onnx.load(str(masked_path)), onnx.load(str(out)))
