"""Temporary files and locks of an output set (used by :mod:`fxrewrite.io`).

* temporary files are named ``.<output name>.<pid>.<start>.<random>.tmp`` and ``flock``-ed by
  their writer for as long as it lives, so a later run can tell a file left by a killed run
  (its process is gone, its lock is free) from a live run's, and remove only the former;
* the renames of one output set happen under an exclusive ``flock`` on ``.fxrewrite.lock`` in
  each output folder (taken in sorted order: two runs cannot deadlock).

Where ``fcntl`` or ``/proc`` is missing (Windows), renames go unlocked and stale-file cleanup
leans towards leaving files in place.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from .errors import OutputError

try:  # POSIX: locks on the output set and on temporary files
    import fcntl
except ImportError:  # pragma: no cover - Windows: the renames still happen, unlocked
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME"]

Reporter = Callable[[str], None]

#: The lock file that exists in an output folder while a set of outputs is renamed into place.
LOCK_NAME = ".fxrewrite.lock"


# ---------------------------------------------------------------------------- temporary files
def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None if unknown / no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of the line; the command name (which may hold spaces) is cut off
    except (OSError, IndexError, ValueError):
        return None


def _owner_tag() -> str:
    """``pid.start``: names this process among all that ever ran since boot (start 0 where /proc is missing)."""
    pid = os.getpid()
    return f"{pid}.{_start_time(pid) or 0}"


def _owner_alive(pid: int, start: int) -> bool:
    """Is the process that named a temporary file ``pid.start`` still running? (If unsure: yes.)"""
    now = _start_time(pid)
    if now is not None:
        return start == 0 or now == start  # another start time: the pid was reused, the writer is gone
    if _start_time(os.getpid()) is not None:
        return False  # /proc works here and lists no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _temp_pattern(name: str, suffix: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)\.(\d+)\.[0-9a-f]{{8}}\.{suffix}$")


def _unlocked(path: Path) -> bool:
    """True if nobody holds the writer's lock on ``path`` (always True without fcntl)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _remove_stale(target: Path, report: Reporter) -> None:
    """Remove temporary files and backups of ``target`` left by runs that were killed (never a live run's)."""
    patterns = [_temp_pattern(target.name, "tmp"), _temp_pattern(target.name, "bak")]
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for entry in names:
        match = next((m for m in (p.match(entry) for p in patterns) if m), None)
        if match is None:
            continue
        pid, start = int(match.group(1)), int(match.group(2))
        path = target.parent / entry
        if _owner_alive(pid, start) or not _unlocked(path):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            report(f"could not remove {path}, left by an interrupted run (process {pid}): {exc.strerror}")
            continue
        report(f"removed {path}, a temporary file left by an interrupted run (process {pid} is gone)")


def _open_temp(folder: Path, name: str) -> tuple[Path, BinaryIO]:
    """Create a fresh, hidden temporary file next to the target, named after (and locked by) this process.

    ``O_EXCL`` guarantees we never reuse someone else's file; mode 0o666 lets the
    process umask decide the final permissions, as for a normally created file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    owner = _owner_tag()
    for _ in range(100):
        temp = folder / f".{name}.{owner}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temp, flags, 0o666)
        except FileExistsError:
            continue
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process lives: a live run's file is never removed
        return temp, os.fdopen(fd, "wb")
    raise OutputError(f"{folder / name}: could not create a temporary file in {folder}")


@contextlib.contextmanager
def _output_lock(folders: Iterable[Path], report: Reporter) -> Iterator[None]:
    """Hold an exclusive lock on every output folder (sorted: two runs cannot deadlock)."""
    held: list[tuple[int, Path]] = []
    try:
        for folder in sorted(set(folders)):
            if fcntl is not None:
                held.append(_lock_folder(folder, report))
        yield
    finally:
        for fd, path in reversed(held):
            with contextlib.suppress(OSError):
                os.unlink(path)  # removed while held: a waiter notices and locks the next file instead
            os.close(fd)


def _lock_folder(folder: Path, report: Reporter) -> tuple[int, Path]:
    path = folder / LOCK_NAME
    said = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said:
                report(f"waiting for another fxrewrite run that is writing into {folder}")
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder removes the file before it lets go: lock only the one at `path`
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            return fd, path
        os.close(fd)
