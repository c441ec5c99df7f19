"""Options and error handling shared by the commands."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

import click

from ..errors import NemodiffError


def user_errors(fn: Callable) -> Callable:
    """Turn a NemodiffError into one line on stderr and exit status 2 (no traceback); Ctrl-C, and
    SIGTERM during a build (fsutil.atomic_dir), into one line and 128 + the signal's number."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NemodiffError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            import signal

            signum = getattr(e, "signum", signal.SIGINT)
            click.echo(f"error: interrupted ({signal.Signals(signum).name}); nothing was left half-written",
                       err=True)
            sys.exit(128 + signum)

    return wrapper


def model_source(fn: Callable) -> Callable:
    """--size NAME | --model ID_OR_DIR (alias --checkpoint) [--random-weights]; default: the embedded
    tiny model. Resolution: nemodiff_compile/model/hub.py."""
    fn = click.option("--random-weights", is_flag=True,
                      help="With --size 3b|8b|14b: the published geometry with seeded random weights "
                           "(timing builds; nothing is downloaded).")(fn)
    fn = click.option("--size", default=None, metavar="NAME",
                      help="tiny (the trained model shipped in the package, default), or a published "
                           "checkpoint: 3b, 8b, 14b (instruct) or 3b-base, 8b-base, 14b-base "
                           "(nvidia/Nemotron-Labs-Diffusion-<size>[-Base], from the Hugging Face cache "
                           "or downloaded).")(fn)
    fn = click.option("--model", "--checkpoint", "model", default=None, metavar="ID_OR_DIR",
                      help="A Hugging Face model id (org/name) or a checkpoint folder "
                           "(config.json + safetensors).")(fn)
    return fn


def model_ref(model: str | None, size: str | None, random_weights: bool = False):
    """The ModelRef of --model/--size/--random-weights (no download yet)."""
    from ..hub import model_ref as ref

    return ref(size=size, model=model, random_weights=random_weights)


def resolve_source(model: str | None, size: str | None, random_weights: bool = False) -> str | Path:
    """What the model loaders take: a checkpoint folder (fetched into the Hugging Face cache when
    needed) or a preset name ("tiny", or "3b"/"8b"/"14b" with --random-weights)."""
    return model_ref(model, size, random_weights).fetch(echo=lambda msg: click.echo(f"[model] {msg}", err=True))
