"""CLI commands of the PyTorch side: ``run`` (a whole recipe), ``train`` and ``export``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from onnxslim.cli.common import Command, input_path, model_output_path, output_path, single_output
from onnxslim.errors import OnnxSlimError

_threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                               help="PyTorch intra-op threads (default: PyTorch's choice).")
_recipe_argument = click.argument("recipe_path", metavar="RECIPE", type=input_path(dir_okay=False))


def _method_choices() -> list[str]:
    from onnxslim.training.methods import available_methods

    return available_methods()


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _default_out(recipe) -> Path:
    return Path("runs") / recipe.name


def _nproc_option(command):
    return click.option("--nproc", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Train in N local processes (DistributedDataParallel; gloo on CPU, NCCL on CUDA): "
                             "relaunches this command under `torchrun --standalone --nproc-per-node N`.")(command)


def _start_distributed(nproc: int | None, device: str) -> bool:
    """Relaunch under torchrun for ``--nproc N`` (exits with its code), else join torchrun's process group
    when launched by it; True on the process that prints and writes (rank 0)."""
    import os
    import sys

    from onnxslim.training.distributed import init_from_env, launch

    if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise SystemExit(launch(nproc, sys.argv[1:]))
    return init_from_env(device).is_main


@click.command(cls=Command, help="Run a recipe end to end: train, mask-train, export, slim, validate, report.")
@_recipe_argument
@click.option("--out", "out_dir", type=output_path(file_okay=False), default=None,
              help="Output folder (default: runs/<recipe name>).")
@click.option("--resume", is_flag=True, help="Continue training from the checkpoints in the output folder "
              "(refused when they were trained with another recipe).")
@click.option("--overwrite", is_flag=True, help="Start again in a folder that holds a run: its checkpoints, "
              "models and reports are deleted first (other files are kept).")
@click.option("--device", default=None, help="Override the recipe's device (cpu, cuda).")
@_threads_option
@click.option("--progress/--no-progress", default=True, help="Show progress bars on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print REPORT.json instead of the table.")
@_nproc_option
def run(recipe_path: Path, out_dir: Path | None, resume: bool, overwrite: bool, device: str | None,
        threads: int | None, progress: bool, as_json: bool, nproc: int | None) -> None:
    from onnxslim.pipeline import REPORT_FILE, run_recipe
    from onnxslim.recipes import load_recipe

    recipe = load_recipe(recipe_path)
    main_rank = _start_distributed(nproc, device or recipe.training.device)
    _set_threads(threads)
    out = out_dir or _default_out(recipe)
    report = run_recipe(recipe, out, resume=resume, overwrite=overwrite, progress=progress and main_rank,
                        device=device)
    if report is None:  # ranks > 0 under torchrun: they train; rank 0 exports, slims, validates, reports
        return
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format_table())
        click.echo(f"report: {out / REPORT_FILE}")
    if not report.targets_met:
        failed = ", ".join(check.name for check in report.targets if not check.ok)
        click.echo(f"targets not met: {failed}", err=True)
        raise SystemExit(1)


@click.command(cls=Command,
               help="Train a zoo model (or your own factory) with channel masks and a sparsity method (the training "
                    "steps of a recipe).")
@_recipe_argument
@click.option("--out", "out_dir", type=output_path(file_okay=False), default=None,
              help="Output folder for dense.pt, baseline.pt, masked.pt (default: runs/<recipe name>).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoints in the output folder "
              "(refused when they were trained with another recipe).")
@click.option("--overwrite", is_flag=True, help="Start again in a folder that holds a run (its run files are deleted).")
@click.option("--baseline/--no-baseline", default=False,
              help="Also train the dense baseline with the same epoch budget (baseline.pt).")
@click.option("--method", type=click.Choice(_method_choices()), default=None,
              help="Override the recipe's method (its params are then defaults).")
@click.option("--device", default=None, help="Override the recipe's device (cpu, cuda).")
@_threads_option
@click.option("--progress/--no-progress", default=True)
@_nproc_option
def train(recipe_path: Path, out_dir: Path | None, resume: bool, overwrite: bool, baseline: bool, method: str | None,
          device: str | None, threads: int | None, progress: bool, nproc: int | None) -> None:
    import dataclasses

    from onnxslim import pipeline
    from onnxslim.recipes import MethodSpec, load_recipe
    from onnxslim.training.masks import masked_summary

    recipe = load_recipe(recipe_path)
    if method is not None:
        recipe = dataclasses.replace(recipe, method=MethodSpec(method, {}))
    main_rank = _start_distributed(nproc, device or recipe.training.device)
    _set_threads(threads)
    out = out_dir or _default_out(recipe)
    run = pipeline.start_run(recipe, out, resume=resume, overwrite=overwrite, progress=progress and main_rank,
                             device=device)
    trained = pipeline.train(run, baseline=baseline)
    if not main_rank:
        return
    click.echo(masked_summary(trained.masked.cpu(), run.example).format_table())
    metric = trained.mask_result.metric_name
    if trained.dense_result is not None:
        click.echo(f"dense ({recipe.training.dense.epochs} epochs) {metric}: {trained.dense_result.test_metric:.4f}")
    if trained.baseline_result is not None:
        click.echo(f"dense baseline (same budget) {metric}: {trained.baseline_result.test_metric:.4f}")
    click.echo(f"masked {metric}: {trained.mask_result.test_metric:.4f}")
    click.echo(f"checkpoint: {out / 'masked.pt'}")


@click.command(cls=Command, help="Export a trained checkpoint to ONNX with masks as per-channel Mul nodes.")
@click.argument("checkpoint", type=input_path(dir_okay=False))
@click.argument("output_arg", metavar="[OUT]", required=False, type=model_output_path(dir_okay=False))
@click.option("-o", "--output", type=model_output_path(dir_okay=False), default=None,
              help="The .onnx file to write; or give it as OUT.")
@click.option("--model", "model_name", default=None,
              help="Zoo model name or a factory 'package.module:function' (default: the one recorded in the "
              "checkpoint, a factory included).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Model parameter (repeatable), e.g. --param width=0.5; values are parsed as JSON when possible.")
@click.option("--legacy", is_flag=True, help="Use the TorchScript exporter instead of torch.export (dynamo).")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch of the example input (the batch dimension stays dynamic unless --static-batch).")
@click.option("--static-batch", is_flag=True,
              help="Fix the batch dimension to --batch (static input shapes, e.g. for NNAPI/CoreML).")
@click.option("--check/--no-check", default=True, help="Compare onnxruntime with PyTorch after exporting.")
def export(checkpoint: Path, output_arg: Path | None, output: Path | None, model_name: str | None,
           params: tuple[str, ...], legacy: bool, opset: int, batch: int, static_batch: bool, check: bool) -> None:
    import torch

    from onnxslim.training.export import export as export_model
    from onnxslim.training.trainer import model_from_checkpoint
    from onnxslim.zoo import ModelSpec

    output = single_output(output_arg, output)
    model, state = model_from_checkpoint(checkpoint, model_name, _parse_params(params))
    spec = ModelSpec.from_dict(state["extra"]["model_spec"])
    example = torch.randn((batch, *spec.input_shape()), generator=torch.Generator().manual_seed(0))
    result = export_model(model, example, output, dynamo=not legacy, opset=opset, check=check,
                          dynamic_batch=not static_batch)
    diff = f", max |onnxruntime - PyTorch| {result.max_abs_diff:.3g}" if result.max_abs_diff is not None else ""
    asked = f" (asked for {opset})" if result.opset != opset else ""  # the dynamo exporter may raise it
    click.echo(f"wrote {result.path} ({result.exporter} exporter, opset {result.opset}{asked}, "
               f"{result.mask_nodes} mask Mul nodes{diff})")


def _parse_params(values: tuple[str, ...]) -> dict:
    parsed = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise OnnxSlimError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key] = raw
    return parsed
