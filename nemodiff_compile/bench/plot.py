"""`bench --sweep --plot FILE.png`: speed against quality, one labelled point per setting.

Panels: tokens/s (top) and tokens per forward (bottom) against the mean NLL per token (left; lower
is better) and, when the prompts carry answers, task accuracy (right; higher is better). Reads the
sweep's JSON lines, so a saved `--json-out` file can be plotted again. matplotlib (the `plot` extra)
is imported here only, through its object API (no pyplot, no global backend change).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument

STYLE = {"ar": ("*", "black", 140), "dlm": ("o", "tab:blue", 40), "linear-spec": ("^", "tab:orange", 50)}
DPI = 100


def require_matplotlib() -> None:
    """One-line error, before any work, when the plot extra is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise InvalidArgument("--plot needs matplotlib: pip install 'nemodiff-compile[plot]'")


def parse_size(text: str) -> tuple[int, int]:
    """'1200x800' -> (1200, 800) pixels."""
    w, x, h = text.lower().partition("x")
    if not x or not w.strip().isdigit() or not h.strip().isdigit():
        raise InvalidArgument(f"--plot-size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1200x800")
    size = int(w), int(h)
    if not all(200 <= v <= 8000 for v in size):
        raise InvalidArgument(f"--plot-size {text!r}: width and height must be 200 to 8000 pixels")
    return size


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, *, size: tuple[int, int] = (1200, 800),
               title: str = "") -> Path:
    """Write the figure (PNG, exactly size[0] x size[1] pixels) to path via a temporary file."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    xs = [("nll", "mean NLL per generated token (nats), lower is better")]
    if any(r.get("accuracy") is not None for r in rows):
        xs.append(("accuracy", "task accuracy, higher is better"))
    ys = [("tokens_per_s", "tokens / s"), ("tokens_per_forward", "tokens per forward")]
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ys), len(xs), squeeze=False)
    for i, (yk, ylabel) in enumerate(ys):
        for j, (xk, xlabel) in enumerate(xs):
            ax = axes[i][j]
            for mode in dict.fromkeys(r["mode"] for r in rows):
                pts = [r for r in rows if r["mode"] == mode]
                marker, color, s = STYLE.get(mode, ("s", "tab:green", 40))
                x, y = [r[xk] for r in pts], [r[yk] for r in pts]
                if len(pts) > 1:
                    ax.plot(x, y, color=color, alpha=0.35, linewidth=1)
                ax.scatter(x, y, marker=marker, color=color, s=s, label=mode, zorder=3)
                for r in pts:
                    ax.annotate(r["setting"], (r[xk], r[yk]), textcoords="offset points", xytext=(5, 4),
                                fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.margins(x=0.12, y=0.1)                  # room for the labels at the edges
            if i == 0 and j == 0:
                ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
