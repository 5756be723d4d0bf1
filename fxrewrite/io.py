"""Safe, atomic writing of output files.

A conversion either produces its complete output file(s) or leaves the disk as
it was. Every output is first written to a temporary file *in the target
folder* (so the final rename never crosses a file system), flushed and
fsync'ed, and only then renamed over the target with :func:`os.replace`, which
is atomic on POSIX and Windows. If anything fails before that rename, the
temporary file is removed and the target is untouched.

Two mistakes are refused before anything is written:

* overwriting an existing file, unless ``force=True``;
* writing onto one of the inputs (checked on resolved paths and, for files
  that exist, with :func:`os.path.samefile`, which also catches hard links) --
  even with ``force=True``, because a failed conversion must never destroy
  its own source.

Nothing here knows about models; see :mod:`fxrewrite.yolov9.checkpoint` for a user.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence, Union

from .errors import FxRewriteError

__all__ = ["OutputError", "check_output", "atomic_write", "atomic_writes", "write_bytes"]

PathLike = Union[str, "os.PathLike[str]"]


class OutputError(FxRewriteError, ValueError):
    """An output path is unusable (exists, is an input, folder missing ...); nothing was written."""


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): cannot be the same file
        return False


def check_output(path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    """Validate an output path before any work is done; return it resolved.

    Raises :class:`OutputError` naming the path when the output is one of
    ``inputs``, already exists and ``force`` is false, is a directory, or its
    folder does not exist.
    """
    target = Path(os.fspath(path)).expanduser().resolve()
    for given in inputs:
        source = Path(os.fspath(given)).expanduser().resolve()
        if _same_file(target, source):
            raise OutputError(f"{path}: output is the same file as the input {given}; refusing to overwrite an input")
    if target.is_dir():
        raise OutputError(f"{path}: output is a directory")
    if not target.parent.is_dir():
        raise OutputError(f"{path}: output folder {target.parent} does not exist")
    if target.exists() and not force:
        raise OutputError(f"{path}: output already exists (use force=True / --force to overwrite)")
    return target


def _open_temp(folder: Path, name: str) -> tuple[Path, BinaryIO]:
    """Create a fresh, hidden temporary file next to the target.

    ``O_EXCL`` guarantees we never reuse someone else's file; mode 0o666 lets the
    process umask decide the final permissions, as for a normally created file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temp, flags, 0o666)
        except FileExistsError:
            continue
        return temp, os.fdopen(fd, "wb")
    raise OutputError(f"{folder / name}: could not create a temporary file in {folder}")


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (best effort: not every platform can open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(temp: Path, target: Path, force: bool, shown: PathLike) -> None:
    if force:
        os.replace(temp, target)
        return
    # Without force, publish with a hard link: it fails if the target appeared
    # since check_output() (no silent clobbering in that window).
    try:
        os.link(temp, target)
    except FileExistsError:
        raise OutputError(f"{shown}: output already exists (use force=True / --force to overwrite)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # File system without hard links: fall back to a checked replace.
        if target.exists():
            raise OutputError(f"{shown}: output already exists (use force=True / --force to overwrite)") from None
        os.replace(temp, target)
        return
    os.unlink(temp)


def _backup(target: Path) -> Path | None:
    """A hard link to ``target`` under a fresh hidden name (None where hard links are not possible)."""
    for _ in range(100):
        backup = target.parent / f".{target.name}.{secrets.token_hex(4)}.bak"
        try:
            os.link(target, backup)
        except FileExistsError:
            continue
        except OSError:
            return None
        return backup
    return None


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_writes(
    paths: Sequence[PathLike], *, force: bool = False, inputs: Iterable[PathLike] = ()
) -> Iterator[list[BinaryIO]]:
    """Write several outputs as one unit; yields one binary file object per path.

    All targets are validated first; they are published only after the
    ``with`` body finished without an exception and every temp file was
    fsync'ed. On failure every temp file is removed and no target is touched.
    (If publishing itself fails half-way -- e.g. the disk disappears -- the
    outputs already published are taken back: new ones removed, and with
    ``force`` the files they replaced restored from hard-linked backups.)
    """
    inputs = list(inputs)
    targets = [check_output(p, force=force, inputs=inputs) for p in paths]
    if len(set(targets)) != len(targets):
        raise OutputError(f"{', '.join(map(str, paths))}: the same output path is given twice")
    temps: list[Path] = []
    handles: list[BinaryIO] = []
    try:
        for target in targets:
            temp, handle = _open_temp(target.parent, target.name)
            temps.append(temp)
            handles.append(handle)
        yield handles
        for handle in handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        published: list[Path] = []
        replaced: set[Path] = set()  # published over an existing file (force)
        backups: dict[Path, Path] = {}  # replaced target -> a hard link to its previous content
        try:
            for temp, target, shown in zip(temps, targets, paths):
                if target.exists():
                    replaced.add(target)
                    backup = _backup(target) if force and len(targets) > 1 else None
                    if backup is not None:
                        backups[target] = backup
                _commit(temp, target, force, shown)
                published.append(target)
        except BaseException:
            for target in published:
                if target in backups:  # put the previous content back
                    with contextlib.suppress(OSError):
                        os.replace(backups.pop(target), target)
                elif target not in replaced:  # a new file: remove it
                    _remove_quietly(target)
            raise
        finally:
            for backup in backups.values():
                _remove_quietly(backup)
        for folder in {t.parent for t in targets}:
            _fsync_folder(folder)
    finally:
        for handle in handles:
            with contextlib.suppress(Exception):
                handle.close()
        for temp in temps:
            _remove_quietly(temp)


@contextlib.contextmanager
def atomic_write(path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[BinaryIO]:
    """Single-output form of :func:`atomic_writes`: ``with atomic_write(p) as f: f.write(...)``."""
    with atomic_writes([path], force=force, inputs=inputs) as (handle,):
        yield handle


def write_bytes(
    path: PathLike,
    writer: Callable[[BinaryIO], object],
    *,
    force: bool = False,
    inputs: Iterable[PathLike] = (),
) -> Path:
    """Call ``writer(file)`` inside :func:`atomic_write`; return the resolved output path."""
    with atomic_write(path, force=force, inputs=inputs) as handle:
        writer(handle)
    return Path(os.fspath(path)).expanduser().resolve()
