"""The options `bench --sweep` and `bench-gpu --sweep` share, and how a sweep is printed and saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import click

from ..errors import InvalidArgument

SWEEP_ONLY = ("--tasks", "--prompts", "--plot", "--plot-size")


def sweep_options(fn: Callable) -> Callable:
    opts = [
        click.option("--sweep", "sweep", multiple=True, metavar="AXIS=V1,V2,...",
                     help="Measure a grid of decode settings instead of one: mode=ar,dlm,linear-spec, "
                          "threshold=0.3,0.9,1.0, steps=2,4,8 (dlm) or block-length=8,16,32; repeat --sweep "
                          "for a grid. AR greedy is always measured as the reference point."),
        click.option("--tasks", "tasks_file", type=click.Path(path_type=Path), default=None,
                     help="With --sweep: prompts with checkable answers, a .jsonl file of {\"text\", \"task\", "
                          "\"answer\"[, \"chat\"]} lines (e.g. docs/prompts/tiny-tasks.jsonl); adds task accuracy."),
        click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
                     help="With --sweep: prompts without answers (as validate --prompts) instead of the built-in ones."),
        click.option("--plot", type=click.Path(path_type=Path), default=None,
                     help="With --sweep: write a PNG of tokens/s and tokens per forward against quality "
                          "(needs matplotlib: the 'plot' extra)."),
        click.option("--plot-size", default=None, metavar="WxH", help="Pixels of the --plot figure [default: 1200x800]."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def check_outputs(plot: Path | None, plot_size: str | None, json_out: Path | None) -> tuple[int, int]:
    """Check --plot / --plot-size / --json-out before any work; the figure's size in pixels."""
    from ..bench.plot import parse_size, require_matplotlib

    size = parse_size(plot_size or "1200x800")
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise InvalidArgument(f"--plot {plot}: expected a .png file name")
        require_matplotlib()
    for flag, path in (("--plot", plot), ("--json-out", json_out)):
        if path is not None and not path.parent.is_dir():
            raise InvalidArgument(f"{flag} {path}: folder {path.parent} not found")
    return size


def no_sweep_flags(**given) -> None:
    """One-line error when a sweep-only flag comes without --sweep."""
    used = [f"--{k.replace('_file', '').replace('_', '-')}" for k, v in given.items() if v not in (None, ())]
    if used:
        raise InvalidArgument(f"{', '.join(used)}: only with --sweep")


def emit(report, *, as_json: bool, json_out: Path | None, plot: Path | None, size: tuple[int, int]) -> None:
    """Table (or JSON lines) on stdout; JSON lines to --json-out and the figure to --plot, each via a temp file."""
    lines = report.to_json_lines()
    if json_out is not None:
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text("".join(json.dumps(d) + "\n" for d in lines))
        tmp.replace(json_out)
    if plot is not None:
        from ..bench.plot import plot_sweep

        i = report.info
        plot_sweep(lines, plot, size=size, title=f"{i['engine']}: {i['prompts']} prompts ({i['prompt_source']}), "
                                                  f"{i['max_new_tokens']} new tokens, batch {i['batch']}")
    if as_json:
        for d in lines:
            click.echo(json.dumps(d))
    else:
        click.echo(report.to_table())
