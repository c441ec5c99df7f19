"""`nemodiff-compile bench-gpu`: the fast CUDA engine against the eager reference, per pass and mode."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._common import model_source, resolve_source, user_errors


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
@click.option("--precision", default="bf16,fp8", show_default=True,
              help="Comma-separated: bf16, bf16-sdpa (torch attention), fp8 (per-channel weights, "
                   "per-row activations), fp8-tensor (per-tensor scales).")
@click.option("--batch", default="1,4,8", show_default=True, callback=_ints, help="Batch sizes.")
@click.option("--block", default="16,32,64", show_default=True, callback=_ints, help="Block lengths.")
@click.option("--context", type=click.IntRange(min=1), default=512, show_default=True,
              help="Cached positions per row during the timed passes.")
@click.option("--iters", type=click.IntRange(min=3), default=20, show_default=True)
@click.option("--no-modes", is_flag=True, help="Skip whole generations (passes only).")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the report here.")
@user_errors
def bench_gpu(model, size, random_weights, precision, batch, block, context, iters, no_modes, json_out):
    """Time refinement passes (CUDA graph + fused remask) and generations against the eager reference.

    Defaults to the 8B geometry with seeded random weights (timing only, nothing downloaded)."""
    from ..bench.gpu import gpu_report, report_table

    if model is None and size is None:          # the timing default: 8B geometry, random weights
        size, random_weights = "8b", True
    source = resolve_source(model, size, random_weights)
    report = gpu_report(source, precisions=tuple(precision.split(",")), batches=batch, blocks=block,
                        context=context, iters=iters, modes=not no_modes, log=click.echo)
    click.echo(report_table(report))
    line = json.dumps(report)
    if json_out is not None:
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(json_out)
    click.echo(line)
