"""`nemodiff-compile bench-gpu`: the fast CUDA engine against the eager reference, per pass and mode."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InvalidArgument
from ._common import model_source, resolve_source, user_errors
from ._sweep import check_outputs, emit, no_sweep_flags, sweep_options


def _ints(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if any(v < 1 for v in out):
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


@click.command("bench-gpu")
@model_source
@click.option("--precision", default=None,
              help="Comma-separated: bf16, bf16-sdpa (torch attention), fp8 (per-channel weights, "
                   "per-row activations), fp8-tensor (per-tensor scales), fp8-static; a -gemv suffix (bf16-gemv, "
                   "fp8-gemv, fp8-static-gemv) puts the projections through the split-K small-M kernel; "
                   "bf16-sampled / fp8-sampled time a temperature-1 pass [default: bf16,fp8; with --sweep "
                   "one of bf16, fp8, fp8-tensor, fp8-static, default bf16].")
@click.option("--batch", default="1,4,8", show_default=True, callback=_ints,
              help="Batch sizes (with --sweep: the first is the rows per generation).")
@click.option("--block", default="16,32,64", show_default=True, callback=_ints, help="Block lengths.")
@click.option("--context", type=click.IntRange(min=1), default=512, show_default=True,
              help="Cached positions per row during the timed passes.")
@click.option("--iters", type=click.IntRange(min=3), default=20, show_default=True)
@click.option("--no-modes", is_flag=True, help="Skip whole generations (passes only).")
@sweep_options
@click.option("--mode", type=click.Choice(["ar", "dlm", "linear-spec"]), default="dlm", show_default=True,
              help="With --sweep: the mode swept when the spec has no mode= axis.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="With --sweep.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="With --sweep.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None,
              help="Also write the report here (with --sweep: its JSON lines).")
@user_errors
def bench_gpu(model, size, random_weights, precision, batch, block, context, iters, no_modes, sweep, tasks_file,
              prompts_file, plot, plot_size, mode, max_new_tokens, repeats, json_out):
    """Time refinement passes (CUDA graph + fused remask) and generations against the eager reference.

    Defaults to the 8B geometry with seeded random weights (timing only, nothing downloaded). With
    --sweep: the fast engine over a grid of decode settings, as `bench --sweep` (use --size tiny or
    --model for meaningful quality figures)."""
    if model is None and size is None:          # the timing default: 8B geometry, random weights
        size, random_weights = "8b", True
    if sweep:
        _sweep(model, size, random_weights, precision, batch[0], sweep, tasks_file, prompts_file, plot, plot_size,
               mode, max_new_tokens, repeats, json_out)
        return
    no_sweep_flags(tasks_file=tasks_file, prompts_file=prompts_file, plot=plot, plot_size=plot_size)
    from ..bench.gpu import gpu_report, report_table

    source = resolve_source(model, size, random_weights)
    report = gpu_report(source, precisions=tuple((precision or "bf16,fp8").split(",")), batches=batch, blocks=block,
                        context=context, iters=iters, modes=not no_modes, log=click.echo)
    click.echo(report_table(report))
    line = json.dumps(report)
    if json_out is not None:
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(json_out)
    click.echo(line)


def _sweep(model, size, random_weights, precision, batch, sweep, tasks_file, prompts_file, plot, plot_size, mode,
           max_new_tokens, repeats, json_out) -> None:
    import torch

    from ..validate.fast import sweep_fast

    precision = precision or "bf16"
    if "," in precision:
        raise InvalidArgument(f"--precision {precision}: --sweep measures one precision at a time")
    if not torch.cuda.is_available():
        raise InvalidArgument("bench-gpu needs a CUDA GPU (torch.cuda.is_available() is False); "
                              "`bench ENGINE_DIR --sweep` runs on the CPU")
    size_px = check_outputs(plot, plot_size, json_out)
    report = sweep_fast(resolve_source(model, size, random_weights), sweep, precision=precision, device="cuda",
                        mode=mode, max_new_tokens=max_new_tokens, batch=batch, repeats=repeats,
                        tasks_file=tasks_file, prompts_file=prompts_file, log=lambda m: click.echo(m, err=True))
    emit(report, as_json=False, json_out=json_out, plot=plot, size=size_px)
    for d in report.to_json_lines():
        click.echo(json.dumps(d))
