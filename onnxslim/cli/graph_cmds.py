"""``onnxslim slim``, ``prune`` and ``inspect``: thin click wrappers over :mod:`onnxslim.graph`."""

from __future__ import annotations

from pathlib import Path

import click

from onnxslim.cli.common import Command, input_path, model_output_path, output_path, single_output
from onnxslim.errors import OnnxSlimError
from onnxslim.graph.rounding import TARGETS

_input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
    help="Static shape for an input with dynamic dims, e.g. input:1,3,224,224 (repeatable). "
         "Needed for Flatten of dynamic maps and for MACs.")
_json_option = click.option("--json", "json_path", type=output_path(dir_okay=False), default=None,
                            help="Write the report as JSON.")
_round_to_option = click.option(
    "--round-to", default="auto", show_default=True, metavar="auto|N",
    help="Channel counts as multiples of N; auto: onnxruntime's NCHWc block of this CPU (or of --target-device). "
         "slim keeps extra masked channels; prune rounds the kept count to the nearest multiple. 1: off.")
_target_option = click.option(
    "--target-device", type=click.Choice(list(TARGETS)), default=None,
    help="Round for this CPU instead of this machine (e.g. build on x86, ship to arm64).")
_verify_option = click.option(
    "--verify-speed/--no-verify-speed", default=True, show_default=True,
    help="After writing, a quick A/B (15 rounds, 1 thread) of input vs result; warns when it is not faster "
         "despite fewer MACs.")
_ensure_option = click.option(
    "--ensure-faster", is_flag=True,
    help="Build the result with round-to 1, the NCHWc block and twice it; keep the fastest (all exact).")
_rows_option = click.option("--all", "show_all", is_flag=True, help="Show every layer (default: the first 40).")


def _write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        from onnxslim.io import write_json_atomic

        write_json_atomic(path, payload)


@click.command(cls=Command)
@click.argument("model", type=input_path(dir_okay=False))
@click.argument("output_arg", metavar="[OUT]", required=False, type=model_output_path(dir_okay=False))
@click.option("-o", "--output", type=model_output_path(dir_okay=False), default=None,
              help="Where to write the slimmed model (atomically); or give it as OUT.")
@_input_shape_option
@_round_to_option
@_target_option
@click.option("--fold-masks/--keep-masks", default=True, show_default=True,
              help="Fold the remaining mask scales into neighbouring weights.")
@click.option("--check/--no-check", default=True, show_default=True, help="Run onnx.checker (full check) on the result.")
@_json_option
@click.option("--plot", "plot_path", type=output_path(dir_okay=False), default=None,
              help="Write a PNG of the channels per layer before and after.")
@_rows_option
@_verify_option
@_ensure_option
def slim(model, output_arg, output, input_shapes, round_to, target_device, fold_masks, check, json_path, plot_path,
         show_all, verify_speed, ensure_faster):
    """Delete every provably-zero channel of MODEL and write the result to OUT (or -o OUT); the result
    computes the same outputs.

    Prints the channels per layer before and after, params, MACs and file size, and any masked
    channels that had to be kept with the reason (a barrier op, a graph output, a coupled live channel).
    """
    from onnxslim.graph.shapes import parse_input_shapes
    from onnxslim.graph.slim import slim as slim_model

    output = single_output(output_arg, output)
    shapes = parse_input_shapes(input_shapes)

    def build(multiple):
        slimmed, report = slim_model(model, None, input_shapes=shapes, fold_masks=fold_masks, round_to=multiple,
                                     target_device=target_device, check=check)
        return slimmed, report, None

    report = _write_result(model, output, build, round_to, target_device, shapes, verify_speed, ensure_faster)
    click.echo(report.format_table(max_rows=None if show_all else 40))
    click.echo(f"wrote {output}")
    _write_json(json_path, report.to_dict())
    if plot_path is not None:
        from onnxslim.plots import plot_layer_channels

        plot_layer_channels(report.layers, plot_path, title=f"Channels per layer: {model.name}")


@click.command(cls=Command)
@click.argument("model", type=input_path(dir_okay=False))
@click.argument("output_arg", metavar="[OUT]", required=False, type=model_output_path(dir_okay=False))
@click.option("-o", "--output", type=model_output_path(dir_okay=False), default=None,
              help="Where to write the pruned, slimmed model; or give it as OUT.")
@click.option("--ratio", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Fraction of each layer's channels to remove, at most (with --scope global: of the prunable "
                   "cost, see --cost).")
@click.option("--criterion", type=click.Choice(["l1", "l2", "fpgm", "bn", "random"]), default="l1", show_default=True,
              help="Channel importance: filter L1/L2 norm, FPGM (distance to the geometric median), |BN gamma|, or random.")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True)
@click.option("--cost", type=click.Choice(["macs", "params"]), default="macs", show_default=True,
              help="With --scope global: rank channels by importance per unit of this cost.")
@click.option("--min-channels", default=1, show_default=True, type=click.IntRange(min=1),
              help="Channels every layer keeps at least.")
@click.option("--placement", type=click.Choice(["consumers", "after_bn"]), default="consumers", show_default=True,
              help="Where the zero masks go before slimming (see docs of onnxslim.graph.prune).")
@click.option("--save-masked", type=model_output_path(dir_okay=False), default=None,
              help="Also write the masked (unslimmed) model: the exact reference of the pruned one.")
@click.option("--seed", default=0, show_default=True)
@click.option("--target-macs", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Instead of --ratio: keep this fraction of the input's MACs (see --allocation).")
@click.option("--target-latency", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Instead of --ratio: keep this fraction of the input's measured onnxruntime latency (1 thread; "
                   "checked and corrected with quick A/B benchmarks; see --allocation).")
@click.option("--allocation", type=click.Choice(["greedy", "uniform"]), default="greedy", show_default=True,
              help="How a target is met. greedy: channels allocated per layer, least importance lost per MAC or "
                   "per millisecond saved (per-layer latency table measured on this machine, cached); uniform: "
                   "one --ratio for every layer, searched by bisection.")
@click.option("--max-layer-ratio", default=0.8, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="With --allocation greedy: the most of its output channels any layer may lose.")
@click.option("--latency-cache", type=click.Path(file_okay=False), default=None,
              help="Folder of the per-machine latency tables of --target-latency "
                   "[default: $ONNXSLIM_CACHE_DIR/latency or ~/.cache/onnxslim/latency].")
@_round_to_option
@_target_option
@_input_shape_option
@_json_option
@_rows_option
@_verify_option
@_ensure_option
def prune(model, output_arg, output, ratio, criterion, scope, cost, min_channels, placement, save_masked, seed,
          target_macs, target_latency, allocation, max_layer_ratio, latency_cache, round_to, target_device,
          input_shapes, json_path, show_all, verify_speed, ensure_faster):
    """Remove a fraction of MODEL's channels chosen by a criterion (any ONNX model), then slim.

    Coupled channels (residual groups) are chosen together; channels held by barriers are never chosen.
    The accuracy of the result is yours to check (e.g. with `onnxslim check`).
    """
    from onnxslim.graph.prune import prune as prune_model
    from onnxslim.graph.shapes import parse_input_shapes

    output = single_output(output_arg, output)
    shapes = parse_input_shapes(input_shapes)

    if target_macs is not None and target_latency is not None:
        raise OnnxSlimError("give one of --target-macs and --target-latency")
    given = click.get_current_context().get_parameter_source("ratio") == click.core.ParameterSource.COMMANDLINE
    if given and (target_macs is not None or target_latency is not None):  # a target replaces --ratio (was ignored)
        raise OnnxSlimError("--ratio and --target-macs / --target-latency exclude each other: give one")
    options = dict(criterion=criterion, scope=scope, cost=cost, min_channels=min_channels, input_shapes=shapes,
                   target_device=target_device, seed=seed, placement=placement)

    def build(multiple):
        if target_macs is None and target_latency is None:
            return prune_model(model, None, ratio=ratio, round_to=multiple, **options)
        from onnxslim.graph.allocate import prune_to_target

        metric, target = ("macs", target_macs) if target_macs is not None else ("latency", target_latency)
        return prune_to_target(model, metric, target, allocation=allocation, max_layer_ratio=max_layer_ratio,
                               cache_dir=latency_cache, progress=True, round_to=multiple, **options)[:3]

    report = _write_result(model, output, build, round_to, target_device, shapes, verify_speed, ensure_faster,
                           masked_path=save_masked)
    click.echo(report.format_table(max_rows=None if show_all else 40))
    click.echo(f"wrote {output}" + (f" (masked reference: {save_masked})" if save_masked else ""))
    _write_json(json_path, report.to_dict())


def _write_result(source, output, build, round_to, target_device, shapes, verify_speed: bool, ensure_faster: bool,
                  masked_path=None):
    """``build(round_to) -> (model, report, masked or None)``, with several roundings under ``ensure_faster``;
    write the model (and the masked reference) atomically, then the quick speed check; returns the report."""
    from onnxslim.graph.rounding import resolve_round_to
    from onnxslim.io import save_model_atomic
    from onnxslim.validate import speedcheck

    if ensure_faster:
        block = resolve_round_to("auto", target_device).multiple
        requested = resolve_round_to(round_to, target_device).multiple
        (model, report, masked), chosen, tried = speedcheck.ensure_faster(
            source, build, [requested, 1, block, 2 * block], input_shapes=shapes)
        report.notes.append("ensure-faster: " + ", ".join(f"round-to {m}: {s:.2f}x" for m, s in tried)
                            + f"; kept round-to {chosen}")
    else:
        model, report, masked = build(round_to)
    if masked_path is not None:
        save_model_atomic(masked, masked_path)
    report.size_after = save_model_atomic(model, output)
    if verify_speed:
        try:
            check = speedcheck.verify_speed(source, output, report.macs_before, report.macs_after, input_shapes=shapes)
            on_time = bool(report.target) and report.target["metric"] == "latency"
            report.notes.append(check.note(planned_on_time=on_time))
            if on_time:
                report.notes.append(f"verified: the written result runs at {1 / check.speedup:.3f} of the input's "
                                    f"latency (target {report.target['target']:.3f})")
        except OnnxSlimError as exc:
            report.notes.append(f"speed check skipped: {exc}")
    return report


@click.command(cls=Command)
@click.argument("model", type=input_path(dir_okay=False))
@_input_shape_option
@_json_option
@_rows_option
def inspect(model, input_shapes, json_path, show_all):
    """Show what slim would do to MODEL and why: per layer channels, zero and deletable channels,
    coupled groups, MACs and params; the barriers and the groups they hold."""
    from onnxslim.graph.inspect import inspect_model
    from onnxslim.graph.shapes import parse_input_shapes

    report = inspect_model(model, parse_input_shapes(input_shapes))
    click.echo(report.format_text(max_rows=None if show_all else 40))
    if json_path is not None:
        _write_json(json_path, report.to_dict())
