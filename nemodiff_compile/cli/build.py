"""`nemodiff-compile build`: checkpoint -> engine directory, then a short validation.

Its options are generated from build_config.BuildConfig's fields (flag, help, group), shown in
groups in --help; values are read and checked there, not here. `--config FILE.toml` loads a
configuration and the flags given on the command line override it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from ..build_config import BuildConfig, Leaf, iter_groups
from ._common import model_source, resolve_source, user_errors

CONFIG_GROUP = "Configuration"


class _Option(click.Option):
    """An option that knows its help section."""

    def __init__(self, *args, group: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.group = group


class _GroupedCommand(click.Command):
    """--help lists the options in sections (their `group`; --checkpoint/--size under Model)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for p in self.get_params(ctx):
            record = p.get_help_record(ctx)
            if record:
                group = getattr(p, "group", None) or ("Model" if p.name in ("checkpoint", "size") else "Other options")
                sections.setdefault(group, []).append(record)
        for name, records in sections.items():
            with formatter.section(name):
                formatter.write_dl(records)


def _option(leaf: Leaf):
    m = leaf.meta
    kw = dict(cls=_Option, group=m["group"], help=m["help"])
    if m["kind"] == "bool":
        if m["negate"]:
            return click.option(m["flag"], leaf.key, is_flag=True, flag_value=False, default=True, **kw)
        return click.option(m["flag"], leaf.key, is_flag=True, default=False, **kw)
    metavar = m["metavar"] or ("[" + "|".join(m["choices"]) + "]" if m["choices"] else "TEXT")
    default = leaf.cli_text(leaf.default)         # shown only: an option left out keeps BuildConfig's default
    return click.option(m["flag"], leaf.key, default=default, metavar=metavar, show_default=default is not None,
                        **kw)


def build_options(fn):
    """One click option per BuildConfig leaf, by group (the source leaf: --checkpoint / --size)."""
    ordered = [leaf for _, group in iter_groups() for leaf in group]
    for leaf in reversed(ordered):
        fn = model_source(fn) if leaf.meta["kind"] == "source" else _option(leaf)(fn)
    return fn


@click.command(cls=_GroupedCommand)
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, metavar="FILE.toml",
              cls=_Option, group=CONFIG_GROUP,
              help="Build configuration (TOML, the keys of the manifest's build_config); flags given here "
                   "override it.")
@click.option("--print-config", is_flag=True, cls=_Option, group=CONFIG_GROUP,
              help="Print the build configuration (JSON) and exit without building.")
@build_options
@user_errors
def build(config_file, print_config, checkpoint, size, **flags):
    """Build an engine directory from a checkpoint (default: the embedded tiny model)."""
    ctx = click.get_current_context()
    given = {k: v for k, v in flags.items() if _explicit(ctx, k)}
    if _explicit(ctx, "checkpoint") or _explicit(ctx, "size"):
        given["source"] = _source_text(resolve_source(checkpoint, size))
    config = BuildConfig.from_toml(config_file, given) if config_file else BuildConfig.of(**given)
    if print_config:
        click.echo(json.dumps(config.to_json(), indent=2))
        return
    from ..pipeline import build_engine

    out = build_engine(config, progress=lambda msg: click.echo(f"[build] {msg}", err=True))
    click.echo(str(out))


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _source_text(source: str | Path) -> str:
    """The config's source: a preset name, or a folder (./NAME when the folder is named like a preset)."""
    from ..config import PRESETS

    text = str(source)
    return f"./{text}" if isinstance(source, Path) and text.lower() in PRESETS else text
