"""What a build may replace at its output path, checked before any work starts. Stdlib only.

A build puts its engine directory at `--output`, replacing what is there only when that is
  - nothing (the path does not exist) or an empty folder, or
  - an engine directory nemodiff-compile wrote: its manifest.json is one of ours (format_version,
    artifacts, checksum; an edited one counts, an unreadable one does not) and the folder holds no
    file its manifest does not list (a file put into an engine directory is never deleted).
Anything else is refused in one line naming `--output` and what was found: an existing file, a
symbolic link, any other folder, the source checkpoint folder or a folder holding it, the current
folder or a folder holding it, a path under a file, a location this process cannot write (the build
finds out again when it takes its lock: fsutil.atomic_dir).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InvalidArgument
from .manifest import MANIFEST_NAME

FLAG = "--output"
EXPECTED = "give a path that does not exist yet, or an engine directory built by nemodiff-compile"


def check_output(out: str | Path, *, source_folder: str | Path | None = None) -> None:
    """Raise InvalidArgument (one line) unless a build may put its engine directory at `out`."""
    out = Path(out)
    shown = f"{FLAG} {out}"
    where = Path(os.path.realpath(out))
    cwd = Path(os.path.realpath(Path.cwd()))
    if where == cwd or where in cwd.parents:
        what = "the current folder" if where == cwd else f"a folder holding the current folder ({cwd})"
        raise InvalidArgument(f"{shown}: {what} would be replaced by the engine directory; give a new path "
                              "such as engines/NAME")
    if source_folder is not None:
        src = Path(os.path.realpath(source_folder))
        if where == src or where in src.parents:
            what = "the source checkpoint folder" if where == src else f"a folder holding the source checkpoint ({src})"
            raise InvalidArgument(f"{shown}: {what} would be replaced by the engine directory; give another path "
                                  "for the engine")
    base = Path(os.path.abspath(out)).parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise InvalidArgument(f"{shown}: {base} is a file, not a folder; give a path in a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InvalidArgument(f"{shown}: cannot write in {base} (permission denied or read-only); "
                              "give a location you can write to")
    if out.is_symlink():
        raise InvalidArgument(f"{shown}: a symbolic link (to {os.readlink(out)}); give the folder it points to, "
                              "or a new path")
    if not out.exists():
        return
    if not out.is_dir():
        raise InvalidArgument(f"{shown}: an existing file, not an engine directory; {EXPECTED}")
    why = not_an_engine(out)
    if why is not None:
        raise InvalidArgument(f"{shown}: an existing folder that {why}, so a build would delete what is in it; "
                              f"{EXPECTED}")


def not_an_engine(folder: Path) -> str | None:
    """Why `folder` (an existing folder) may not be replaced by a build, or None when it may."""
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return None
    if MANIFEST_NAME not in entries:
        return f"is not an engine directory (no {MANIFEST_NAME}; it holds {_some(entries)})"
    try:
        raw = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    if not (isinstance(raw, dict) and {"format_version", "artifacts", "checksum"} <= raw.keys()
            and isinstance(raw["artifacts"], dict)):
        return f"has a {MANIFEST_NAME} that nemodiff-compile did not write"
    listed = set(raw["artifacts"]) | {MANIFEST_NAME}
    extra = [e for e in entries if e not in listed and not e.startswith(".manifest.")]
    if extra:
        return f"is an engine directory but also holds {_some(extra)}, which its manifest does not list"
    return None


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
