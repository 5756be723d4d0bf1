"""Safe, atomic writing of output files: a run writes its whole output set or nothing, and never an input.

A conversion either produces its complete output file(s) or leaves the disk as
it was. Every output is first written to a temporary file *in the target
folder* (so the final rename never crosses a file system), flushed and
fsync'ed, and only then renamed over the target with :func:`os.replace`, which
is atomic on POSIX and Windows. If anything fails before that rename, the
temporary files are removed and the targets are untouched.

Refused before anything is written (:class:`OutputError`), with or without ``force``
where it says so:

* overwriting an existing file, unless ``force=True``;
* an output that exists and is not a regular file -- a device (``/dev/null``),
  a FIFO, a socket, a directory -- even with ``force``: replacing it with a
  regular file would break whatever uses it;
* an output that is one of the ``inputs`` (any number of them: checkpoint,
  config, rule files; a folder stands for every file below it), compared by
  resolved path and by device and inode (symbolic and hard links), even with
  ``force``: a failed conversion must never destroy its own source.

Writing a *set* of outputs (:func:`atomic_writes`) is one transaction:

* **never mixed**: the renames of a set happen under an exclusive ``flock`` on a
  lock file in each output folder (``.fxrewrite.lock``, taken in a fixed order),
  and the targets are checked again under it. Two ``--force`` runs into the same
  outputs therefore leave all of one run's files, never ``OUT.pt`` of one beside
  ``OUT.yaml`` of the other. The lock file exists only while a set is renamed
  into place and is removed by its holder (a run killed in that instant leaves
  an empty one, which the next run takes and removes); it is not an output;
* **no litter**: temporary files are named ``.<output name>.<pid>.<start>.<random>.tmp``,
  where pid and start time identify the process that writes them, and each is
  ``flock``-ed while its writer lives. A later run writing the same output
  removes the ones whose process is gone (it says so, on stderr); the files of a
  run that is still alive are never touched;
* **errors name the file**: a failed write (a full disk, an I/O error) is
  reported as :class:`OutputWriteError` naming the output being written, after
  every temporary file was removed -- and the message says that nothing was left.

Nothing here knows about models; see :mod:`fxrewrite.yolov9.checkpoint` for a user.

>>> import os, tempfile
>>> folder = tempfile.mkdtemp()
>>> with atomic_writes([os.path.join(folder, "a.txt"), os.path.join(folder, "b.txt")]) as (a, b):
...     _ = a.write(b"one"), b.write(b"two")
>>> sorted(os.listdir(folder))
['a.txt', 'b.txt']
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, Union

from .errors import FxRewriteError, OutputError, OutputWriteError
from .output_files import LOCK_NAME, _open_temp, _output_lock, _owner_tag, _remove_stale

__all__ = ["OutputError", "OutputWriteError", "check_output", "atomic_write", "atomic_writes", "write_bytes",
           "ErrorRecordingFile", "LOCK_NAME"]

PathLike = Union[str, "os.PathLike[str]"]
Reporter = Callable[[str], None]

def _say(message: str) -> None:
    print(f"fxrewrite: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- checks
def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): cannot be the same file
        return False


_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO (named pipe)",
          stat.S_IFSOCK: "a socket"}


def _input_clash(target: Path, given: PathLike) -> bool:
    """Is ``target`` the input ``given`` (or, for a folder, a file below it)?"""
    source = Path(os.fspath(given)).expanduser().resolve()
    if _same_file(target, source):
        return True
    if not source.is_dir():
        return False
    try:
        info = os.stat(target)
    except OSError:
        return False  # a new file inside an input folder destroys nothing
    if source in target.parents:
        return True
    if info.st_nlink > 1:  # a hard link elsewhere to one of the folder's files
        for folder, _, files in os.walk(source):
            for name in files:
                try:
                    other = os.stat(os.path.join(folder, name))
                except OSError:
                    continue
                if (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino):
                    return True
    return False


def check_output(path: PathLike, *, force: bool = False, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Validate an output path before any work is done; return it resolved.

    Raises :class:`OutputError` naming the path when the output is one of
    ``inputs`` (files, or folders standing for every file below them; ``None``
    entries are skipped), exists and is not a regular file, already exists and
    ``force`` is false, or its folder does not exist.
    """
    target = Path(os.fspath(path)).expanduser().resolve()
    for given in inputs:
        if given is not None and _input_clash(target, given):
            raise OutputError(f"{path}: output is the same file as the input {given}; refusing to overwrite an input")
    if target.is_dir():
        raise OutputError(f"{path}: output is a directory")
    if not target.parent.is_dir():
        raise OutputError(f"{path}: output folder {target.parent} does not exist")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise OutputError(f"{path}: output cannot be examined ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise OutputError(f"{path}: output exists and is {kind}, not a regular file; refusing to replace it")
    if not force:
        raise OutputError(f"{path}: output already exists (use force=True / --force to overwrite)")
    return target


class ErrorRecordingFile:
    """A binary file that remembers the first exception its ``write`` raised (``error``) and names its output.

    Writers that wrap a file in their own machinery (``torch.save``'s zip writer
    fails again while closing and raises a RuntimeError of its own) can still
    report the real cause: a full disk, naming the file.
    """

    def __init__(self, handle: BinaryIO, shown: PathLike):
        self._handle = handle
        self.shown = shown
        self.error: BaseException | None = None

    def write(self, data) -> int:
        try:
            return self._handle.write(data)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


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


# ---------------------------------------------------------------------------- publishing
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
    owner = _owner_tag()
    for _ in range(100):
        backup = target.parent / f".{target.name}.{owner}.{secrets.token_hex(4)}.bak"
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


def _publish(temps: list[Path], targets: list[Path], paths: Sequence[PathLike], force: bool) -> None:
    """Rename every temporary file over its target; on failure take back what was published."""
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


def _write_error(recorders: list[ErrorRecordingFile], exc: BaseException) -> tuple[ErrorRecordingFile, OSError] | None:
    """The output whose write failed and the OS error, if ``exc`` comes from writing one (disk full ...)."""
    if isinstance(exc, OSError) and not isinstance(exc, FxRewriteError):
        for recorder in recorders:
            if recorder.error is exc:
                return recorder, exc
    if not isinstance(exc, (KeyboardInterrupt, SystemExit)):  # wrapped by a writer (torch.save: RuntimeError)
        for recorder in recorders:
            if isinstance(recorder.error, OSError) and not isinstance(recorder.error, FxRewriteError):
                return recorder, recorder.error
    return None


def _failed_write(shown: PathLike, error: OSError, temps: list[Path]) -> OutputWriteError:
    left = [str(t) for t in temps if os.path.lexists(t)]
    reason = f"[Errno {error.errno}] {error.strerror}" if error.errno and error.strerror else str(error) or type(error).__name__
    if left:
        outcome = f"no output was written, but the temporary file(s) {', '.join(left)} could not be removed"
    else:
        outcome = "nothing was written (no output, no temporary file left)"
    return OutputWriteError(f"{shown}: cannot write it: {reason}; {outcome}", error, shown)


@contextlib.contextmanager
def atomic_writes(paths: Sequence[PathLike], *, force: bool = False, inputs: Iterable[PathLike | None] = (),
                  report: Reporter | None = None) -> Iterator[list[BinaryIO]]:
    """Write several outputs as one unit; yields one binary file object per path.

    All targets are validated first (:func:`check_output`: existing files need
    ``force``; devices, FIFOs, sockets and ``inputs`` are always refused). They
    are published only after the ``with`` body finished without an exception
    and every temporary file was fsync'ed, all under the output folders' lock, so
    another run's set is never mixed in. On failure every temporary file is
    removed and no target is touched; a failed write raises
    :class:`OutputWriteError` naming the output. (If publishing itself fails
    half-way -- e.g. the disk disappears -- the outputs already published are
    taken back: new ones removed, and with ``force`` the files they replaced
    restored from hard-linked backups.) ``report`` receives notices (stale
    temporary files removed, waiting for another run); default: stderr.
    """
    report = report or _say
    inputs = list(inputs)
    targets = [check_output(p, force=force, inputs=inputs) for p in paths]
    if len(set(targets)) != len(targets):
        raise OutputError(f"{', '.join(map(str, paths))}: the same output path is given twice")
    for target in targets:
        _remove_stale(target, report)
    temps: list[Path] = []
    recorders: list[ErrorRecordingFile] = []
    try:
        for target, shown in zip(targets, paths):
            temp, handle = _open_temp(target.parent, target.name)
            temps.append(temp)
            recorders.append(ErrorRecordingFile(handle, shown))
        try:
            yield recorders  # type: ignore[misc]
            for recorder in recorders:
                try:
                    recorder.flush()
                    os.fsync(recorder.fileno())
                except OSError as exc:
                    recorder.error = recorder.error or exc
                    raise
        except BaseException as exc:
            failed = _write_error(recorders, exc)
            if failed is None:
                raise
            _close_and_remove(recorders, temps)
            raise _failed_write(failed[0].shown, failed[1], temps) from exc
        with _output_lock([t.parent for t in targets], report):
            for target, shown in zip(targets, paths):  # again, under the lock: another run may have published
                check_output(shown, force=force, inputs=inputs)
            _publish(temps, targets, paths, force)
            for folder in {t.parent for t in targets}:
                _fsync_folder(folder)
    finally:
        _close_and_remove(recorders, temps)


def _close_and_remove(recorders: list[ErrorRecordingFile], temps: list[Path]) -> None:
    for recorder in recorders:
        with contextlib.suppress(Exception):
            recorder.close()
    for temp in temps:
        with contextlib.suppress(OSError):
            _remove_quietly(temp)


@contextlib.contextmanager
def atomic_write(path: PathLike, *, force: bool = False, inputs: Iterable[PathLike | None] = (),
                 report: Reporter | None = None) -> Iterator[BinaryIO]:
    """Single-output form of :func:`atomic_writes`: ``with atomic_write(p) as f: f.write(...)``."""
    with atomic_writes([path], force=force, inputs=inputs, report=report) as (handle,):
        yield handle


def write_bytes(
    path: PathLike,
    writer: Callable[[BinaryIO], object],
    *,
    force: bool = False,
    inputs: Iterable[PathLike | None] = (),
    report: Reporter | None = None,
) -> Path:
    """Call ``writer(file)`` inside :func:`atomic_write`; return the resolved output path."""
    with atomic_write(path, force=force, inputs=inputs, report=report) as handle:
        writer(handle)
    return Path(os.fspath(path)).expanduser().resolve()
