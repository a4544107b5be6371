"""`--round-to auto`: onnxruntime's NCHWc block, named targets, kept-count rounding in prune, extra channels in slim."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import GraphBuilder, assert_equivalent

from onnxslim.cli import main
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.prune import prune
from onnxslim.graph.rounding import (
    TARGETS,
    cpu_flags,
    detect_target,
    parse_round_to,
    probe_nchwc_block,
    resolve_round_to,
    rounded_kept,
)
from onnxslim.graph.slim import slim


def conv_outputs(model: onnx.ModelProto) -> list[int]:
    inits = {t.name: t for t in model.graph.initializer}
    return [int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv"]


def residual_net(widths=(22, 30, 46)) -> onnx.ModelProto:
    """conv -> relu -> [conv -> relu -> conv] + skip -> conv -> relu -> conv head: plain and coupled layers."""
    g = GraphBuilder(seed=3)
    x = g.input([1, 3, 12, 12])
    a = g.op("Relu", [g.conv(x, 3, widths[0])])
    b = g.op("Relu", [g.conv(a, widths[0], widths[1])])
    c = g.conv(b, widths[1], widths[0])
    s = g.op("Relu", [g.op("Add", [c, a])])
    d = g.op("Relu", [g.conv(s, widths[0], widths[2])])
    g.output(g.conv(d, widths[2], 5))
    return g.model()


def test_round_to_values_and_targets():
    assert parse_round_to("auto") == "auto" and parse_round_to(None) == "auto"
    assert parse_round_to(8) == 8 and parse_round_to("16") == 16
    for bad in (0, -4, "eight", 2.5, True):
        with pytest.raises(OnnxSlimError, match="round_to must be 'auto' or an integer >= 1"):
            parse_round_to(bad)
    with pytest.raises(OnnxSlimError, match="unknown target device 'riscv'"):
        resolve_round_to("auto", "riscv")
    arm = resolve_round_to("auto", "arm64")
    assert arm.multiple == 16 and arm.target == "arm64" and "named target" in arm.describe()
    assert resolve_round_to(1).describe() == "round-to 1 (off)" and resolve_round_to("4").multiple == 4


def test_detect_target_from_flags_and_by_probing():
    flags = cpu_flags("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert {"avx2", "fma"} <= flags
    assert detect_target("x86_64", flags).block == 8
    assert detect_target("x86_64", flags | {"avx512f"}).name == "x86-avx512"
    assert detect_target("aarch64", {"asimd"}).block == 16
    assert detect_target("riscv64", set()).name == "generic"
    probed = probe_nchwc_block()  # what the installed onnxruntime does here
    assert probed in (4, 8, 16, None)
    auto = resolve_round_to("auto")
    if probed is not None:  # the block, or the measured multiple of a 4-wide machine
        assert auto.multiple == (8 if probed == 4 else probed) and "probed" in auto.reason
    assert auto.multiple in {t.round_to for t in TARGETS.values()}
    assert TARGETS["x86-sse"].block == 4 and TARGETS["x86-sse"].round_to == 8


def test_rounded_kept_is_torch_pruning_nearest_multiple():
    assert [rounded_kept(k, 64, 8) for k in (35, 36, 37, 3, 64, 61)] == [32, 40, 40, 8, 64, 64]
    assert rounded_kept(70, 70, 16) == 70  # nothing removed: unchanged
    assert rounded_kept(66, 70, 16) == 64  # 66 -> 64 (nearest), never above the layer
    assert rounded_kept(5, 6, 8) == 5  # a layer narrower than the multiple is left alone
    assert rounded_kept(35, 64, 1) == 35


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_rounds_kept_counts_and_stays_exact(scope):
    from onnxslim.graph.prune import analyse, choose_classes
    from onnxslim.graph.rounding import removed_channels

    model = residual_net()
    _, plain, _ = prune(model, ratio=0.4, scope=scope, round_to=1)
    slimmed, report, masked = prune(model, ratio=0.4, scope=scope, round_to=4)
    assert_equivalent(masked, slimmed)
    counts, dense = conv_outputs(slimmed), conv_outputs(model)
    assert counts[-1] == 5  # the graph output keeps its channels
    assert all(c % 4 == 0 for c, d in zip(counts[:-1], dense) if c != d), counts  # unpruned layers stay as they are
    assert counts != dense
    # the choice before rounding (--scope global sizes it so that the rounded one meets the ratio; per
    # layer it is the choice of round-to 1)
    analysis = analyse(residual_net())  # the analysis normalises the model it reads
    selection = choose_classes(analysis, 0.4, scope=scope, multiple=4)
    unrounded = {analysis.index.node_name(node): analysis.info[name].size
                 - removed_channels(analysis, selection.roots, [name]) for name, node in analysis.creators.items()}
    if scope == "layer":
        assert unrounded == {layer.node: layer.channels_after for layer in plain.layers}
    for layer in report.layers:
        if layer.op_type == "Conv" and layer.channels_before != 5:
            assert abs(layer.channels_after - unrounded[layer.node]) <= 2  # the nearest multiple of 4
    assert report.rounding["multiple"] == 4 and report.macs_after < report.macs_before
    # the report says when rounding changed how many channels go (the unrounded choice's own count)
    chosen = sum(layer.channels_before - unrounded[layer.node] for layer in report.layers)
    rounded = sum(layer.channels_before - layer.channels_after for layer in report.layers)
    notes = [note for note in report.notes if note.startswith("round-to 4:")]
    assert not any(note.startswith("round-to") for note in plain.notes)
    if rounded != chosen:
        assert notes == [f"round-to 4: the kept counts rounded to multiples of 4 remove {rounded} layer output "
                         f"channels where the choice removed {chosen} (--round-to 1 removes exactly the choice)"]
    else:
        assert notes == []


def test_slim_auto_keeps_extra_masked_channels_up_to_the_block():
    g = GraphBuilder(seed=1)
    x = g.input([1, 3, 10, 10])
    y = g.op("Relu", [g.mask(g.conv(x, 3, 32), 32, zeros=range(13))])  # 19 live
    g.output(g.conv(y, 32, 4))
    model = g.model()
    slimmed, report = slim(model, round_to="auto", target_device="x86-avx2")
    assert_equivalent(model, slimmed)
    assert conv_outputs(slimmed) == [24, 4]  # 19 -> 24, the next multiple of 8
    assert "round-to auto = 8 for x86-avx2" in report.rounding["description"]
    assert "round-to auto = 8" in report.format_table()


def test_a_dead_layer_keeps_one_placeholder_channel_unrounded():
    """A ConvNeXt-style block whose 4x expansion layer lost every mask (x + pw2(gelu(pw1 x)), pw1 all zero): slim
    keeps one zero channel so the tensor is not empty; --round-to 8 used to round it up to 8 zero channels (a
    trained ConvNeXt-lite ran 1.27x against 1.34x unrounded)."""
    g = GraphBuilder(seed=2)
    x = g.input([1, 8, 10, 10])
    stem = g.op("Relu", [g.conv(x, 8, 24)])
    hidden = g.op("Relu", [g.mask(g.conv(stem, 24, 32, k=1), 32, zeros=range(32))])  # every channel masked
    g.output(g.conv(g.op("Add", [stem, g.conv(hidden, 32, 24, k=1)]), 24, 4))
    model = g.model()
    slimmed, report = slim(model, round_to=8)
    assert_equivalent(model, slimmed)
    assert conv_outputs(slimmed) == [24, 1, 24, 4]  # the dead layer: 32 -> 1, not 8
    assert report.deleted_masked_channels == 31
    assert [k.reason for k in report.kept] == [f"kept so that '{hidden}' does not become empty"]


def test_cli_prune_and_slim_default_to_auto_and_name_the_choice(tmp_path):
    source = tmp_path / "net.onnx"
    onnx.save(residual_net(), str(source))
    out, report_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["prune", str(source), "-o", str(out), "--ratio", "0.4",
                                       "--target-device", "arm64", "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "round-to auto = 16 for arm64" in result.output
    data = json.loads(report_path.read_text())
    assert data["rounding"]["multiple"] == 16
    assert all(c % 16 == 0 for c in conv_outputs(onnx.load(str(out)))[:-1])
    bad = CliRunner().invoke(main, ["slim", str(source), "-o", str(tmp_path / "s.onnx"), "--round-to", "x"])
    assert bad.exit_code == 2 and "round_to must be 'auto'" in bad.output
    default = CliRunner().invoke(main, ["slim", str(source), "-o", str(tmp_path / "s.onnx")])
    assert default.exit_code == 0, default.output
    assert "no channels were removed" in default.output  # nothing masked: auto changes nothing


def widened_stream(pads=(4, 4, 4), masks=None) -> onnx.ModelProto:
    """BlazeFace's backbone: a residual stream of 16 channels that each block widens by zero-padding the
    skip (``F.pad`` of the channel axis): 16, 20, 24, 28. ``masks`` (per stream conv, zero channels)
    make a masked model."""
    masks = masks or {}
    g = GraphBuilder(seed=2)
    width = 16
    stream = g.op("Relu", [g.mask(g.conv(g.input([1, 3, 8, 8]), 3, width), width, zeros=masks.get(0, ()))])
    for block, pad in enumerate(pads, 1):
        branch = g.conv(g.conv(stream, width, width, groups=width), width, width + pad, k=1, pad=0)
        branch = g.mask(branch, width + pad, zeros=masks.get(block, ()))
        skip = g.op("Pad", [stream, g.const(np.array([0, 0, 0, 0, 0, pad, 0, 0], np.int64))])
        stream, width = g.op("Relu", [g.op("Add", [branch, skip])]), width + pad
    g.output(g.conv(stream, width, 4))
    return g.model()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_rounds_a_stream_widened_by_padded_channels(scope):
    """Each layer of the stream keeps a multiple of 8: the classes a block adds change first, towards the
    nearest multiple they reach (before, per layer: the layers gave back one another's channels until
    nothing was pruned)."""
    model = widened_stream()
    slimmed, report, masked = prune(model, ratio=0.5, round_to=8, scope=scope)
    assert_equivalent(masked, slimmed)
    counts = conv_outputs(slimmed)
    assert counts[-1] == 4
    assert all(c % 8 == 0 for c in counts[:-1]), counts
    if scope == "layer":
        assert counts[0] == 8 and report.macs_after < 0.5 * report.macs_before, counts
    else:  # sized for the rounding: every layer keeping 16 removes 36 % of the MACs, keeping 8 removes 74 %
        assert counts != conv_outputs(model) and abs(1 - report.macs_after / report.macs_before - 0.5) < 0.15, counts


@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_global_scope_removes_the_ratio_of_the_macs_once_rounded(multiple):
    """BlazeFace's stream (16 widened to 72 by zero-padded skips, a depthwise and a 1x1 conv per block):
    ``--scope global --ratio r`` removes ``r`` of the MACs, rounded or not. Before, the cost model took a
    residual class read and written by a 1x1 conv for a depthwise unit (``1 - max(a, b)`` of its MACs
    left instead of ``(1 - a)(1 - b)``: 0.5 asked removed 0.65 unrounded), and rounding the kept counts
    of the blocks' layers moved every one the same way (0.70 at round-to 8; the real BlazeFace: 0.76)."""
    model = widened_stream(pads=(4, 4, 4, 6, 6, 8, 8, 8, 8, 8))
    for ratio in (0.3, 0.5, 0.7):
        slimmed, report, masked = prune(model, ratio=ratio, scope="global", round_to=multiple)
        assert_equivalent(masked, slimmed)
        removed = 1 - report.macs_after / report.macs_before
        assert abs(removed - ratio) <= 0.08, (ratio, removed, conv_outputs(slimmed))  # a rounding step or less
        if multiple > 1:
            counts = conv_outputs(slimmed)  # pruned layers keep multiples; the others stay as they are
            assert all(c % multiple == 0 for c, d in zip(counts[:-1], conv_outputs(model)) if c != d), counts
            assert any(note.startswith("--scope global with rounding: the choice is sized so that the rounded "
                                       f"kept counts remove {100 * removed:.1f}% of the macs") for note in report.notes)


def test_slim_rounds_a_widened_stream_with_the_classes_each_layer_adds():
    """Stream 16 -> 24 -> 28 -> 32 (pads 8, 4, 4). Masks: 8 of the 16 stream channels in every layer, and
    2 of the 8 that the first block adds (in every later layer too). Rounding up to 8 restores those 2
    (the first block's layer: 14 -> 16) and leaves the 8 stream channels deleted; the second block's layer
    (20) could only be rounded with channels of earlier layers and stays. 32 of 38 masked channels
    deleted (before: 0, every layer gave back the channels of the others)."""
    stream = list(range(8))
    model = widened_stream((8, 4, 4), masks={0: stream, 1: [*stream, 16, 17], 2: [*stream, 16, 17],
                                             3: [*stream, 16, 17]})
    slimmed, report = slim(model, round_to=8)
    assert_equivalent(model, slimmed)
    assert report.masked_channels == 38 and report.deleted_masked_channels == 32, report.format_table()
    assert conv_outputs(slimmed) == [8, 8, 16, 16, 20, 20, 24, 4]


def test_round_choice_reaches_a_multiple_with_the_classes_a_block_adds():
    """A choice (as ``--scope global`` makes on BlazeFace) that takes 10 of the 16 stream channels and
    none that the blocks add: the first layer keeps 6 -> 8; a block's layer then keeps 8 + 4 = 12, whose
    nearest multiples 8 and 16 are both 4 away: 8 is reached by dropping the block's own 4 channels,
    16 only by giving back stream channels (which undid every earlier layer, until nothing was pruned)."""
    from onnxslim.graph.prune import analyse, channel_scores
    from onnxslim.graph.rounding import round_choice
    from onnxslim.graph.values import BARRIER

    analysis = analyse(widened_stream())
    scores = channel_scores(analysis, "l1")
    roots = analysis.uf.roots()
    first = next(iter(scores))
    chosen = np.unique(roots[analysis.info[first].ids[np.argsort(scores[first])[:10]]])
    rounded = {int(r) for r in round_choice(analysis, chosen, scores, 8, analysis.kept_by(BARRIER))}
    kept = [sum(int(r) not in rounded for r in roots[analysis.info[name].ids]) for name in scores]
    assert all(k % 8 == 0 for k in kept[:-1]) and kept[0] == 8, kept


def test_layers_narrower_than_the_multiple_keep_what_prune_chose():
    """SCI (low-light enhancement, three 3-channel convs then ``x / clip(sigmoid(.) + x)``): prune leaves a
    layer narrower than the multiple unrounded (``rounded_kept``), but slim's rounding took it up to the
    whole layer and gave every mask back: 0 of 2 masked channels deleted at round-to 8. Now slim leaves
    it as masked too."""
    g = GraphBuilder(seed=5)
    x = g.input([1, 3, 12, 12])
    y = g.op("Relu", [g.conv(x, 3, 3)])
    y = g.op("Relu", [g.conv(y, 3, 3)])
    y = g.op("Add", [g.op("Sigmoid", [g.conv(y, 3, 3)]), x])
    g.output(g.op("Div", [x, g.op("Clip", [y, g.const(np.array(1e-4, np.float32)), g.const(np.array(1, np.float32))])]))
    slimmed, report, masked = prune(g.model(), ratio=0.5, round_to=8)
    assert_equivalent(masked, slimmed)
    assert report.masked_channels == report.deleted_masked_channels == 2
    assert conv_outputs(slimmed) == [2, 2, 3]
    again, second = slim(slimmed, round_to=8)
    assert second.deleted_masked_channels == 0 and conv_outputs(again) == [2, 2, 3]
