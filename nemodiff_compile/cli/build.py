"""`nemodiff-compile build`: checkpoint -> engine directory, then a short validation.

Its options are generated from build_config.BuildConfig's fields (flag, help, group), shown in
groups in --help; values are read and checked there, not here. `--config FILE.toml` loads a
configuration and the flags given on the command line override it.

The model (--size / --model / --random-weights, resolved by hub.py) is fetched only after the
options are checked and the resource plan (resources.py) is stated and found to fit this machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from ..build_config import BuildConfig, Leaf, iter_groups
from ._common import model_ref, model_source, user_errors

CONFIG_GROUP = "Configuration"


class _Option(click.Option):
    """An option that knows its help section."""

    def __init__(self, *args, group: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.group = group


class _GroupedCommand(click.Command):
    """--help lists the options in sections (their `group`; --size/--model/--random-weights under Model)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for p in self.get_params(ctx):
            record = p.get_help_record(ctx)
            if record:
                group = getattr(p, "group", None) or ("Model" if p.name in ("model", "size", "random_weights")
                                                      else "Other options")
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
    """One click option per BuildConfig leaf, by group (the source leaf: --size / --model / --random-weights)."""
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
@click.option("--no-resource-check", is_flag=True, cls=_Option, group=CONFIG_GROUP,
              help="Build even when the resource plan says this machine cannot hold the build.")
@build_options
@user_errors
def build(config_file, print_config, no_resource_check, model, size, random_weights, **flags):
    """Build an engine directory from a checkpoint (default: the embedded tiny model)."""
    from dataclasses import replace

    ctx = click.get_current_context()
    given = {k: v for k, v in flags.items() if _explicit(ctx, k)}
    ref = None
    if model is not None or size is not None or random_weights:
        ref = model_ref(model, size, random_weights)
        given["source"] = _config_source(ref)
    config = BuildConfig.from_toml(config_file, given) if config_file else BuildConfig.of(**given)
    if print_config:
        click.echo(json.dumps(config.to_json(), indent=2))
        return
    ref = ref or _ref_of(config.source)
    from ..pipeline import build_engine, check_output_path, check_shapes, default_output, prepare

    choice, quant = prepare(config, load=False, check_source=False)     # bad options: one line, first
    if config.output is None:
        config = replace(config, output=str(default_output(ref.name, config.precision, choice["chosen"])))
    check_output_path(config, choice["chosen"])      # what --output would replace: before any download
    check_shapes(config, ref.config()[0])
    _check_resources(ref, config, backend=choice["chosen"], quant=quant, enforce=not no_resource_check)
    source = ref.fetch(echo=_say)
    config = replace(config, source=_source_text(source))
    out = build_engine(config, progress=_say)
    click.echo(str(out))


def _say(msg: str) -> None:
    click.echo(f"[build] {msg}", err=True)


def _config_source(ref) -> str:
    """What the configuration records before the model is fetched: the preset, folder or Hugging Face id."""
    if ref.kind == "folder":
        return _source_text(ref.folder)
    return ref.repo_id or ref.size or "tiny"


def _ref_of(source: str):
    """The ModelRef of a configuration's source (a --config file's): "tiny", a preset name (the
    random-weight geometry, as load_reference reads it), a folder or a Hugging Face id."""
    from ..config import PRESETS

    key = source.lower()
    if key == "tiny":
        return model_ref(None, "tiny")
    if key in PRESETS:
        return model_ref(None, key, True)
    return model_ref(source, None)


def _check_resources(ref, config, *, backend: str, quant, enforce: bool) -> None:
    """State the resource plan, then refuse (one line, exit 2) when this machine cannot hold it; a
    checkpoint neither cached nor downloadable now is the one line naming the download command."""
    from ..errors import NemodiffError
    from ..hub import cache_dir
    from ..resources import plan_build, probe, refusal

    cfg, real = ref.config()
    cached = ref.cached()
    cache = cache_dir() if ref.kind == "hub" else None
    output = Path(config.output)
    machine = probe(output, cache)
    shapes, gpus = config.shapes, config.tensorrt.gpus
    plan = plan_build(cfg, precision=config.precision, backend=backend,
                      calib_device=quant.device if quant else "cpu", batch_sizes=shapes.batch_sizes,
                      max_context=shapes.max_context, validate=config.validate,
                      random_weights=ref.kind == "random", download=not cached, output=output, cache=cache,
                      recipe=quant.recipe if quant else None, gpu_targets=len(gpus or ()) or 1,
                      tensorrt_on_gpu=machine.gpu_name is not None)
    _say(f"model {ref.repo_id or ref.folder or ref.flag}"
         + ("" if real else f" (not downloaded: planned from the published {ref.size} geometry)"))
    for line in plan.lines():
        _say(line)
    _say(f"machine: {machine.describe()}")
    why = refusal(plan, machine, cfg=cfg, batch_sizes=shapes.batch_sizes, max_context=shapes.max_context,
                  validate=config.validate, quantized=quant is not None)
    _say(f"plan: {'does not fit: ' + why.removeprefix('resource plan: ') if why else 'fits this machine'}")
    if not cached and not real:            # neither cached nor reachable: the download command
        raise ref.missing()
    if why and enforce:
        raise NemodiffError(why + " (or --no-resource-check to try anyway)")


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _source_text(source: str | Path) -> str:
    """The config's source: a preset name, or a folder (./NAME when the folder is named like a preset)."""
    from ..config import PRESETS

    text = str(source)
    return f"./{text}" if isinstance(source, Path) and text.lower() in PRESETS else text
