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
    """--checkpoint DIR or --size PRESET (default: the embedded trained tiny model)."""
    fn = click.option("--size", default=None, metavar="PRESET",
                      help="tiny (the trained model shipped in the package, default), or 3b/8b/14b "
                           "(published geometry, seeded random weights: for timing only).")(fn)
    fn = click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                      help="Hugging Face checkpoint folder (config.json + safetensors).")(fn)
    return fn


def resolve_source(checkpoint: Path | None, size: str | None) -> str | Path:
    from ..config import preset

    if checkpoint is not None and size is not None:
        raise click.UsageError("give either --checkpoint or --size, not both")
    if checkpoint is not None:
        if not checkpoint.is_dir():
            raise NemodiffError(f"--checkpoint {checkpoint}: not a folder (expected a Hugging Face checkpoint folder)")
        return checkpoint
    preset(size or "tiny")          # one-line error for an unknown name
    return (size or "tiny").lower()
