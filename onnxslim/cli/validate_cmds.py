"""``onnxslim bench`` and ``onnxslim check``: thin click wrappers over :mod:`onnxslim.validate`.

Exit codes: 0 success / every threshold holds; 1 ``check`` found a threshold that does not hold;
2 bad input (raised as :class:`OnnxSlimError`, printed by the command group) or a bad option (click).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import click

from onnxslim.cli.common import Command, input_path, input_spec, output_path
from onnxslim.errors import OnnxSlimError
from onnxslim.validate.equivalence import DEFAULT_ATOL, DEFAULT_RTOL


def _int_list(value: str | None, option: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=option) from None
    if not numbers:
        raise click.BadParameter("expected at least one integer", param_hint=option)
    return numbers


_input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
    help="Shape of an input with dynamic dimensions, e.g. input:1,3,224,224 (repeatable).")


@click.command(cls=Command)
@click.argument("models", nargs=-1, required=True, type=input_path(dir_okay=False))
@click.option("--threads", default="1", show_default=True, help="Intra-op thread counts, comma-separated (1,2,4; 0: onnxruntime's default).")
@click.option("--batch", "batch", default=None, help="Batch sizes, comma-separated (1,8); default: the model's.")
@_input_shape_option
@click.option("--opt-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              show_default=True, help="onnxruntime graph optimisation level.")
@click.option("--provider", "providers", multiple=True, default=("cpu",), show_default=True,
              help="Execution provider (cpu, xnnpack, ... or the full onnxruntime name); repeatable.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0), help="Warm-up runs per model.")
@click.option("--round-warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="Untimed runs of a model right before its timed run in every round, so it is timed with its "
                   "own weights in cache, as in deployment; 0: timed right after the other models' runs.")
@click.option("--repeat", "--rounds", "repeat", default=100, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds; each round runs every model once, in a random (seeded) order.")
@click.option("--session-repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Session creations per model for the session-time median.")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure peak memory in a child process per model.")
@click.option("--confidence", default=0.95, show_default=True, type=click.FloatRange(0.5, 0.999),
              help="Confidence level of the A/B ratio interval.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--order-seed", default=0, show_default=True,
              help="Seed of the per-round model order (recorded in the JSON as round_orders).")
@click.option("--mobile", is_flag=True,
              help="One thread, models converted to ORT format with onnxruntime's tools, plus its mobile-usability check.")
@click.option("--mobile-dir", type=output_path(file_okay=False), default=None,
              help="Keep the converted .ort files here (default: a temporary folder).")
@click.option("--json", "json_path", type=output_path(dir_okay=False), default=None, help="Write all figures as JSON.")
@click.option("--plot", "plot_path", type=output_path(dir_okay=False), default=None,
              help="Write a latency box plot (PNG).")
@click.option("--per-layer", is_flag=True,
              help="Also profile every model with onnxruntime's profiler: time per layer, before -> after.")
@click.option("--layer-plot", "layer_plot_path", type=output_path(dir_okay=False), default=None,
              help="With --per-layer: write a PNG bar chart of the slowest layers.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
def bench(models, threads, batch, input_shapes, opt_level, providers, warmup, round_warmup, repeat, session_repeats,
          memory, confidence, seed, order_seed, mobile, mobile_dir, json_path, plot_path, per_layer, layer_plot_path,
          progress):
    """Measure onnxruntime latency of MODELS; with several, interleaved A/B rounds against the first."""
    from onnxslim.graph.shapes import parse_input_shapes
    from onnxslim.io import write_json_atomic
    from onnxslim.validate.bench import BenchOptions, benchmark

    thread_counts = _int_list(threads, "--threads")
    batch_sizes = _int_list(batch, "--batch") or (None,)
    if mobile and thread_counts != (1,):
        raise OnnxSlimError("--mobile measures one thread (as on a phone); leave out --threads")
    options = BenchOptions(threads=thread_counts, batch_sizes=batch_sizes, input_shapes=parse_input_shapes(input_shapes),
                           opt_level=opt_level, providers=tuple(providers), warmup=warmup, repeat=repeat,
                           session_repeats=session_repeats, measure_memory=memory, confidence=confidence, seed=seed,
                           order_seed=order_seed, round_warmup=round_warmup)
    artifacts = []
    with tempfile.TemporaryDirectory(prefix="onnxslim-ort-") as tmp:
        targets = list(models)
        if mobile:
            from onnxslim.validate.mobile import prepare_mobile

            for model in models:
                if not Path(model).is_file():
                    raise OnnxSlimError(f"model not found: {model}")
            artifacts = prepare_mobile(targets, mobile_dir or tmp)
            targets = [Path(a.ort_path) for a in artifacts]
        report = benchmark(targets, options, progress=progress)
        profiles = _per_layer(targets, options, report) if per_layer or layer_plot_path else []
    click.echo(report.format_table())
    for note in _initializer_input_notes(models):
        click.echo(note)
    layer_macs = _layer_macs(targets if not mobile else [], profiles, options.input_shapes)
    for index, profile in enumerate(profiles[1:] or profiles, start=1):
        from onnxslim.validate.profile import format_comparison, format_profile

        click.echo("")
        click.echo(format_comparison(profiles[0], profile, macs=layer_macs and (layer_macs[0], layer_macs[index]))
                   if len(profiles) > 1 else format_profile(profile))
    if profiles:
        from onnxslim.validate.profile import profiler_overhead_note

        note = profiler_overhead_note(profiles, [timing.median_ms for timing in report.models])
        if note:
            click.echo(note)
    if artifacts:
        from onnxslim.validate.mobile import fixed_shape_advice, usability_summary

        click.echo("")
        click.echo("mobile (ORT format, converted with onnxruntime.tools.convert_onnx_models_to_ort):")
        for model, artifact in zip(models, artifacts):
            kept = f" -> {artifact.ort_path}" if mobile_dir else ""
            click.echo(f"  {artifact.source}: .onnx {artifact.onnx_size_bytes:,} B, .ort {artifact.ort_size_bytes:,} B{kept}")
            for line in usability_summary(artifact.usability_log):
                click.echo(f"    {line}")
            advice = fixed_shape_advice(model, artifact.usability_log)
            if advice:
                click.echo(f"    advice: {advice}")
    if json_path:
        payload = report.to_dict()
        payload["mobile"] = [
            {**dataclasses.asdict(a), "usability_summary": usability_summary(a.usability_log),
             "ort_path": a.ort_path if mobile_dir else None} for a in artifacts] if artifacts else None
        payload["per_layer"] = [p.to_dict() for p in profiles] or None
        payload["per_layer_macs"] = layer_macs
        write_json_atomic(json_path, payload)
        click.echo(f"wrote {json_path}")
    if plot_path:
        from onnxslim.plots import plot_latency

        plot_latency(report, plot_path)
        click.echo(f"wrote {plot_path}")
    if layer_plot_path:
        from onnxslim.validate.profile import plot_layer_latency

        plot_layer_latency(profiles, layer_plot_path)
        click.echo(f"wrote {layer_plot_path}")


def _initializer_input_notes(models) -> list[str]:
    """A note per model (IR >= 4) that also declares weights as graph inputs: onnxruntime treats those as
    overridable, so it neither folds nor fuses them, and a comparison with a model without them (what
    slim writes) measures that too."""
    import onnx

    notes = []
    for model in models:
        proto = onnx.load(str(model), load_external_data=False)
        weights = {t.name for t in proto.graph.initializer}
        listed = sum(value.name in weights for value in proto.graph.input)
        if listed and proto.ir_version >= 4:
            notes.append(f"note: {model} declares {listed} weight(s) as graph inputs: onnxruntime does not fold "
                         "or fuse them, which slows it; slim and prune write their results without them, so part "
                         "of a speedup against this model comes from that (docs/latency.md)")
    return notes


def _layer_macs(targets, profiles, input_shapes) -> list[dict[str, int]] | None:
    """Per profiled model, executed node -> MACs of the conv / GEMM it runs (for the per-layer MACs
    columns); None for ORT-format files, a single model, or a model whose MACs cannot be counted."""
    from onnxslim.validate.profile import layer_macs

    if len(profiles) < 2 or len(targets) != len(profiles):
        return None
    try:
        return [layer_macs(profile, target, input_shapes) for profile, target in zip(profiles, targets)]
    except OnnxSlimError:
        return None


def _per_layer(targets, options, report) -> list:
    """onnxruntime-profiler per-layer times of every model at the first thread count and batch size."""
    from onnxslim.validate.profile import profile_layers
    from onnxslim.validate.runtime import SessionOptions

    session_options = SessionOptions(threads=options.threads[0], opt_level=options.opt_level,
                                     providers=report.environment["providers"])
    return [profile_layers(target, session_options, runs=min(options.repeat, 50), warmup=min(options.warmup, 5),
                           batch_size=options.batch_sizes[0], input_shapes=options.input_shapes, seed=options.seed,
                           name=timing.name)
            for target, timing in zip(targets, report.models)]


@click.command(cls=Command)
@click.argument("reference", type=input_path(dir_okay=False))
@click.argument("candidate", type=input_path(dir_okay=False))
@click.option("--data", type=input_spec(), default=None,
              help="Labelled data: mnist, mnist:32, an ImageFolder directory or an .npz (default: random inputs).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N samples.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--samples", default=8, show_default=True, type=click.IntRange(min=1),
              help="Number of seeded random inputs when no --data is given.")
@_input_shape_option
@click.option("--max-accuracy-drop", type=float, default=None,
              help="Fail if accuracy drops by more, in percentage points (0.5 = half a point).")
@click.option("--atol", "--max-abs-diff", "max_abs_diff", type=click.FloatRange(min=0), default=None,
              help="Absolute tolerance on outputs (an element fails only if it also exceeds --rtol). "
                   f"Without any threshold: atol {DEFAULT_ATOL:g}, rtol {DEFAULT_RTOL:g} "
                   "(float16 outputs: 16 ulps of float16, 0.0156).")
@click.option("--rtol", "--max-rel-diff", "rtol", type=click.FloatRange(min=0), default=None,
              help="Relative tolerance on outputs.")
@click.option("--error-stat", type=click.Choice(["elemwise", "max", "mean", "median"]), default="elemwise",
              show_default=True, help="Which error statistic is compared with the tolerances.")
@click.option("--min-speedup", type=click.FloatRange(min=0), default=None,
              help="Fail if the candidate is not this many times faster (median of interleaved-round ratios).")
@click.option("--max-size-ratio", type=click.FloatRange(min=0), default=None,
              help="Fail if candidate bytes / reference bytes is larger.")
@click.option("--max-macs-ratio", type=click.FloatRange(min=0), default=None,
              help="Fail if candidate MACs / reference MACs is larger (e.g. 0.5: at least half the MACs gone).")
@click.option("--max-params-ratio", type=click.FloatRange(min=0), default=None,
              help="Fail if candidate parameters / reference parameters is larger.")
@click.option("--speed", is_flag=True, help="Measure the speedup even without --min-speedup.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=0), help="onnxruntime intra-op threads.")
@click.option("--rounds", default=50, show_default=True, type=click.IntRange(min=1), help="Timed A/B rounds.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0), help="Warm-up runs per model.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", type=output_path(dir_okay=False), default=None, help="Write the result as JSON.")
@click.option("--report-dir", type=output_path(file_okay=False, writes=("check.md", "check.json")), default=None,
              help="Write check.md and check.json here.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars on stderr.")
@click.pass_context
def check(ctx, reference, candidate, data, limit, batch_size, samples, input_shapes, max_accuracy_drop, max_abs_diff,
          rtol, error_stat, min_speedup, max_size_ratio, max_macs_ratio, max_params_ratio, speed, threads, rounds, warmup, seed, json_path, report_dir,
          progress):
    """CI gate: compare CANDIDATE with REFERENCE; exit 1 when a threshold fails, 2 on bad input.

    Without thresholds it checks equivalence (outputs within the default --atol/--rtol). Prints a Markdown summary (also appended to $GITHUB_STEP_SUMMARY when set).
    """
    from onnxslim.graph.shapes import parse_input_shapes
    from onnxslim.io import write_json_atomic
    from onnxslim.report import append_step_summary, write_report
    from onnxslim.validate.gate import CheckOptions, GateThresholds, run_check

    thresholds = GateThresholds(max_accuracy_drop=max_accuracy_drop, max_abs_diff=max_abs_diff, rtol=rtol,
                                error_stat=error_stat, min_speedup=min_speedup, max_size_ratio=max_size_ratio,
                                max_macs_ratio=max_macs_ratio, max_params_ratio=max_params_ratio)
    options = CheckOptions(data=data, limit=limit, batch_size=batch_size, random_samples=samples, seed=seed,
                           input_shapes=parse_input_shapes(input_shapes), threads=threads, measure_speed=speed,
                           bench_warmup=warmup, bench_repeat=rounds, progress=progress)
    result = run_check(reference, candidate, thresholds, options)
    markdown = result.to_markdown()
    click.echo(markdown)
    append_step_summary(markdown)
    payload = result.to_dict()
    if json_path:
        write_json_atomic(json_path, payload)
    if report_dir:
        write_report(report_dir, "check", markdown, payload)
    for failed in result.failures():
        click.echo(failed.message(), err=True)
    if not result.passed:
        ctx.exit(1)
