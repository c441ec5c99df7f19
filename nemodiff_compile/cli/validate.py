"""`nemodiff-compile validate DIR` and `nemodiff-compile bench DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import InvalidArgument
from ._common import model_source, resolve_source, user_errors
from ._sweep import check_outputs, emit, no_sweep_flags, sweep_options


@click.command()
@click.argument("engine_dir", type=click.Path(path_type=Path), required=False)
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Checkpoint folder of the reference (default: the one the engine was built from).")
@click.option("--fast", is_flag=True,
              help="Validate the fast torch engine (CUDA graphs on a GPU) built from --size/--model "
                   "instead of an engine directory.")
@model_source
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp8", "fp8-tensor", "fp8-static"]), default=None,
              help="With --fast: default bf16 on a GPU, fp32 on the CPU.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--mode", "modes", type=click.Choice(["ar", "dlm", "linear-spec"]), multiple=True,
              help="Modes to compare (default: all three).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Prompts to compare on instead of the built-in ones: a .jsonl file ({\"text\": ...} or "
                   "{\"ids\": [...]} per line) or a text file, one prompt per line.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="dlm commit threshold (default: the one the engine's remask stage was built for, else 0.9).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="dlm fixed-steps policy instead of the threshold (engines with a remask stage run it in the graph).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def validate(engine_dir, reference, fast, model, size, random_weights, precision, max_new_tokens, modes, prompts_file,
             threshold, steps, as_json):
    """Compare an engine with the PyTorch reference pass by pass; exit 1 when it fails its tolerances.
    The engine's files are re-hashed against its manifest first (exit 2 naming an altered file)."""
    modes = modes or ("ar", "dlm", "linear-spec")
    if fast:
        if engine_dir is not None:
            raise click.UsageError("--fast validates a model (--size/--model), not ENGINE_DIR")
        if prompts_file is not None:
            raise click.UsageError("--prompts goes with ENGINE_DIR (validate --fast uses the built-in prompts)")
        import torch

        from ..validate.fast import validate_fast

        precision = precision or ("bf16" if torch.cuda.is_available() else "fp32")
        report = validate_fast(resolve_source(model, size, random_weights), precision=precision,
                               max_new_tokens=max_new_tokens, modes=modes)
        click.echo(json.dumps(report.to_json()) if as_json else report.to_table())
        sys.exit(0 if report.passed else 1)
    if engine_dir is None:
        raise click.UsageError("give ENGINE_DIR, or --fast with --size/--model")
    if model is not None or size is not None or random_weights or precision is not None:
        raise click.UsageError("--size/--model/--random-weights/--precision go with --fast")
    from ..artifact.manifest import read_manifest
    from ..validate.engine import validate_engine

    if threshold is not None and steps is not None:
        raise click.UsageError("give --threshold or --steps, not both")
    read_manifest(engine_dir, deep=True)     # re-hash every artifact first: an altered file is named, not run
    report = validate_engine(engine_dir, reference_source=reference, max_new_tokens=max_new_tokens,
                             modes=modes, prompts_file=prompts_file, threshold=threshold, steps=steps)
    if getattr(report, "not_recorded", None):
        click.echo(f"note: the result is not recorded in the manifest: {report.not_recorded}", err=True)
    click.echo(json.dumps(report.to_json()) if as_json else report.to_table())
    sys.exit(0 if report.passed else 1)


@click.command()
@click.argument("engine_dirs", metavar="ENGINE_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(["ar", "dlm", "linear-spec"]), default=None,
              help="Mode to time [default: dlm]; with --sweep, the mode swept when the spec has no mode= axis.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows per generation (with --sweep: the prompts are run this many at a time).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@sweep_options
@click.option("--json-out", type=click.Path(path_type=Path), default=None,
              help="With --sweep: also write its JSON lines to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with --sweep: one line per setting).")
@user_errors
def bench(engine_dirs, mode, batch, max_new_tokens, repeats, threads, sweep, tasks_file, prompts_file, plot,
          plot_size, json_out, as_json):
    """Time engines (one, or several builds of the same model, e.g. --remask none / onnx / plugin) and the
    PyTorch reference side by side on the same prompts; with --sweep, one engine over a grid of decode
    settings: tokens per forward, NFE, tokens/s and quality per setting."""
    engine_dir = engine_dirs[0]
    if sweep:
        if len(engine_dirs) > 1:
            raise InvalidArgument("--sweep takes one ENGINE_DIR")
        from ..validate.engine import sweep_engine

        if mode is not None and any(s.strip().lower().startswith("mode=") for s in sweep):
            raise InvalidArgument("give the modes in --sweep mode=..., or --mode, not both")
        size = check_outputs(plot, plot_size, json_out)
        report = sweep_engine(engine_dir, sweep, mode=mode or "dlm", max_new_tokens=max_new_tokens, batch=batch,
                              repeats=repeats, threads=threads, tasks_file=tasks_file, prompts_file=prompts_file,
                              log=lambda msg: click.echo(msg, err=True))
        emit(report, as_json=as_json, json_out=json_out, plot=plot, size=size)
        return
    no_sweep_flags(tasks_file=tasks_file, prompts_file=prompts_file, plot=plot, plot_size=plot_size, json_out=json_out)
    from ..validate.engine import bench_engine

    report = bench_engine(list(engine_dirs), batch=batch, mode=mode or "dlm", max_new_tokens=max_new_tokens,
                          repeats=repeats, threads=threads)
    click.echo(json.dumps(report.to_json()) if as_json else report.to_table())
