"""Atomic folders: write beside, swap in one step, one writer per folder at a time. Stdlib only.

    with atomic_dir("engines/x", label="--output") as tmp:   # waits for another writer of engines/x
        ...fill tmp...                                        # an error or a signal: tmp is removed
    # engines/x now holds what was written in tmp; the folder it held before is removed

Beside `out` (in its parent) while a writer runs:
    .NAME.lock                  the writers' lock (fcntl.flock); removed by the writer that releases it
    .NAME.partial-PID-XXXXXXXX  the folder being filled, by process PID
    .NAME.old-PID-XXXXXXXX      the folder being replaced (fallback swap only, for one rename)
A writer that was killed (SIGKILL, power loss) leaves its partial folder behind: the next writer of
the same folder removes it, once it holds the lock and has checked that PID is not running.

The swap: on Linux, renameat2(RENAME_EXCHANGE) exchanges the filled folder and the existing one in
one step, so the path always names a complete folder. Where that call is missing (other systems, or
a file system without it), the old folder is renamed aside and the new one renamed in: the path is
then missing for the time between two renames. Either way the old folder is removed after the swap.
Signals (SIGINT, SIGTERM) are held back during the swap, and inside `atomic_dir` SIGTERM raises
KeyboardInterrupt (as Ctrl-C does) when the process has no handler of its own, so a terminated
writer removes its partial folder too.

Readers that read several files of a folder that may be swapped under them use `read_stable`: it reads
again when the folder was swapped while it read (a reader never keeps a mix of two builds).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import NemodiffError

T = TypeVar("T")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class Interrupted(KeyboardInterrupt):
    """SIGTERM received inside `atomic_dir` (handled like Ctrl-C: partial output is removed)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, label: str = "", check: Callable[[Path], None] | None = None,
               on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Fill a temporary folder beside `out`; on success it replaces `out` in one swap, on any error
    (or KeyboardInterrupt / SIGTERM) it is removed, and so are the parent folders this call created.
    label: how messages name `out` (e.g. "--output"); check(out): called once the lock is held and
    again just before the swap, raises to refuse replacing what is at `out`; on_wait(message): told
    when another writer holds the lock."""
    out = Path(out)
    shown = f"{label} {out}" if label else str(out)
    path = Path(os.path.abspath(out))
    created = _make_parents(path.parent, shown)
    ok = False
    try:
        with _sigterm_as_interrupt(), _lock(path, shown, on_wait):
            sweep_partials(path)
            if check is not None:
                check(out)
            tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                tmp.mkdir()
                os.chmod(tmp, 0o777 & ~_umask())      # like any folder made here; artifacts are shared
                yield tmp
                if check is not None:
                    check(out)
                _publish(tmp, path)
            finally:
                if tmp.exists():                      # an error or signal before (or during) the swap
                    shutil.rmtree(tmp, ignore_errors=True)
        ok = True
    finally:
        if not ok:
            for d in reversed(created):               # only folders this call made, only when empty
                with contextlib.suppress(OSError):
                    d.rmdir()


def read_stable(path: str | Path, read: Callable[[], T], *, attempts: int = 50, pause: float = 0.02) -> T:
    """read() (which reads files of folder `path`) again until `path` named the same folder before
    and after it, so its result never mixes two versions of the folder swapped in by `atomic_dir`.
    An error raised while the folder was being swapped also reads again; any other error is raised."""
    return read_stable_at(path, read, attempts=attempts, pause=pause)[0]


def read_stable_at(path: str | Path, read: Callable[[], T], *, attempts: int = 50,
                   pause: float = 0.02) -> tuple[T, tuple | None]:
    """read_stable, and the identity of the folder it read (for `update_if_same`)."""
    path = Path(path)
    for attempt in range(attempts):
        before = _identity(path)
        try:
            value = read()
        except Exception:
            if attempt + 1 < attempts and (_identity(path) != before or _swapping(path)):
                time.sleep(pause)
                continue
            raise
        if _identity(path) == before:
            return value, before
        time.sleep(pause)
    raise NemodiffError(f"{path}: replaced {attempts} times while it was read (builds keep publishing to it); "
                        "try again")


def update_if_same(path: str | Path, identity: tuple | None, write: Callable[[], None]) -> bool:
    """write() (an in-place update of a file in folder `path`, e.g. its manifest's validation result)
    only while `path` is still the folder of `identity` (read_stable_at), under the writers' lock so no
    build swaps it meanwhile. False (nothing written) when a build has replaced it since."""
    path = Path(os.path.abspath(path))
    with _lock(path, str(path), None):
        now = _identity(path)
        if identity is None or now is None or now[:2] != identity[:2]:
            return False
        write()
        return True


def sweep_partials(out: str | Path) -> list[Path]:
    """Remove the partial / old folders of writers of `out` that are no longer running (caller holds
    the lock, so no running writer of `out` can own one unless its process id was reused: then it
    stays). Returns what was removed."""
    path = Path(os.path.abspath(out))
    removed = []
    for p in path.parent.glob(f".{_glob_escape(path.name)}.*-*-*"):
        kind, pid = _owner(path.name, p.name)
        if kind is None or (pid != os.getpid() and _running(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def partials(out: str | Path) -> list[Path]:
    """The partial / old folders and the lock file beside `out` (what a writer leaves while it runs)."""
    path = Path(os.path.abspath(out))
    return sorted(p for p in path.parent.glob(f".{_glob_escape(path.name)}.*")
                  if _owner(path.name, p.name)[0] is not None or p.name == f".{path.name}.lock")


def can_exchange() -> bool:
    """Whether this system has renameat2 (the one-step swap); the file system may still refuse it."""
    return _renameat2() is not None


# ---- the swap -------------------------------------------------------------------------------------


def _publish(tmp: Path, path: Path) -> None:
    """Put tmp at path (replacing what is there), signals held back until done."""
    with _signals_blocked():
        if not path.exists() and not path.is_symlink():
            os.rename(tmp, path)                      # a new folder (an empty one there is replaced)
            return
        if not _exchange(tmp, path):
            old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(path, old)                      # the path is missing from here ...
            try:
                os.rename(tmp, path)                  # ... to here
            except BaseException:
                os.rename(old, path)
                raise
            os.rename(old, tmp)                       # the old folder is removed below, under tmp's name
        if tmp.is_symlink():                          # tmp now holds what was replaced
            tmp.unlink()
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Exchange two paths in one step (Linux renameat2); False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_RENAMEAT2: list = []


def _renameat2():
    if not _RENAMEAT2:
        fn = None
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


# ---- the lock -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(path: Path, shown: str, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    """Hold .NAME.lock beside `path` (fcntl.flock), waiting for another writer when there is one.
    The file is removed on release (re-checked after each acquire, so a lock on a removed file
    never counts)."""
    import fcntl

    lock_path = path.parent / f".{path.name}.lock"
    told = False
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            raise NemodiffError(f"{shown}: cannot write in {path.parent} ({e.strerror}); "
                                "give a location you can write to") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not told:
                    on_wait(f"waiting for another build of {path} to finish (lock {lock_path})")
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)                                  # the holder removed that file: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


# ---- signals ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread of a process with no SIGTERM handler of its own: SIGTERM raises
    Interrupted (a KeyboardInterrupt) until the block ends."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Interrupted()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM wait (pending) until the block ends: a swap is never left half-done."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


# ---- helpers ----------------------------------------------------------------------------------------


def _make_parents(parent: Path, shown: str) -> list[Path]:
    """mkdir -p parent; the folders it created, outermost first. One line when it cannot."""
    missing = []
    p = parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                _undo(created)
                raise NemodiffError(f"{shown}: {d} is a file, not a folder; give a path in a folder") from None
            continue
        except OSError as e:
            _undo(created)
            raise NemodiffError(f"{shown}: cannot create {d} ({e.strerror}); give a location you can write to") \
                from None
        created.append(d)
    if not parent.is_dir():
        raise NemodiffError(f"{shown}: {_first_file(parent)} is a file, not a folder; give a path in a folder")
    return created


def _undo(created: list[Path]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def _first_file(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _owner(name: str, entry: str) -> tuple[str | None, int]:
    """('partial' | 'old', pid) for an entry named like a writer's folder of `name`, else (None, 0)."""
    prefix = f".{name}."
    if not entry.startswith(prefix):
        return None, 0
    parts = entry[len(prefix):].split("-")
    if len(parts) != 3 or parts[0] not in ("partial", "old") or not parts[1].isdigit() \
            or len(parts[2]) != 8 or not all(c in "0123456789abcdef" for c in parts[2]):
        return None, 0
    return parts[0], int(parts[1])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                           # another user's process
        return True
    return True


def _identity(path: Path) -> tuple | None:
    """(device, folder inode, manifest inode) of `path`, None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        inner = os.stat(path / "manifest.json").st_ino
    except OSError:
        inner = None
    return st.st_dev, st.st_ino, inner


def _swapping(path: Path) -> bool:
    """A fallback swap of `path` is between its two renames (its old folder is aside)."""
    p = Path(os.path.abspath(path))
    return any(_owner(p.name, e.name)[0] == "old" for e in p.parent.glob(f".{_glob_escape(p.name)}.old-*"))


def _glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
