"""Progress of long steps: a tqdm bar on a terminal, plain lines in logs. Stdlib at import.

    with progress.bar("calibrating", total=16, unit="pass") as tick:
        for ...:
            tick()                    # or tick(n)

On a terminal (stderr is a tty) this is a tqdm bar. Elsewhere (CI logs, a file, a pipe) it prints
`[build] calibrating: 4/16 pass (25%)` about every tenth of the way (without a total: the count,
every PLAIN_EVERY seconds) and a last line with the time taken, so a log shows where a build is
without carriage-return noise. `NEMODIFF_PROGRESS=plain|bar|off`
forces one style.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator

Tick = Callable[..., None]
PLAIN_EVERY = 30.0          # seconds between plain lines when there is no total
QUIET_FOR = 2.0             # a step that ends sooner prints only its last line


def style() -> str:
    """"bar" (tqdm on a terminal), "plain" (lines) or "off"."""
    forced = os.environ.get("NEMODIFF_PROGRESS", "").lower()
    if forced in ("bar", "plain", "off"):
        return forced
    return "bar" if sys.stderr.isatty() else "plain"


@contextlib.contextmanager
def bar(desc: str, total: int | None = None, unit: str = "it", *, scale: float = 1.0,
        echo: Callable[[str], None] | None = None) -> Iterator[Tick]:
    """Yield tick(n=1). scale: shown units per tick unit (e.g. 1/2**30 to show GiB of bytes).
    echo: where plain lines go (default: stderr, prefixed "[build] ")."""
    mode = style()
    if mode == "bar":
        from tqdm.auto import tqdm

        with tqdm(total=None if total is None else total * scale, desc=desc, unit=unit,
                  file=sys.stderr, dynamic_ncols=True, leave=True) as t:
            yield lambda n=1: t.update(n * scale)
        return
    say = echo or (lambda msg: print(f"[build] {msg}", file=sys.stderr, flush=True))
    done, start, next_mark = 0, time.perf_counter(), 0.1
    last = start

    def tick(n: float = 1) -> None:
        nonlocal done, next_mark, last
        done += n
        if mode == "off":
            return
        if not total:
            now = time.perf_counter()
            if now - last >= PLAIN_EVERY:
                say(f"{desc}: {_fmt(done * scale)} {unit} ({(now - start) / 60:.1f} min)")
                last = now
            return
        if done / total >= next_mark and done < total and time.perf_counter() - start >= QUIET_FOR:
            say(f"{desc}: {_fmt(done * scale)}/{_fmt(total * scale)} {unit} ({done / total:.0%})")
            while next_mark <= done / total:
                next_mark += 0.1

    yield tick
    if mode != "off":
        of = f"/{_fmt(total * scale)}" if total else ""
        say(f"{desc}: {_fmt(done * scale)}{of} {unit} in {time.perf_counter() - start:.1f} s")


def _fmt(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() or x >= 100 else f"{x:.2f}"
