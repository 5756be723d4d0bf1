"""fxrewrite.io, the library level of "writes never destroy, never mix" (the CLI level is test_hostile_writing.py).

Outputs that are devices, FIFOs or sockets are refused even with force; any number of inputs (files,
or folders standing for every file below them) are protected by path and by inode; two writers of the
same output set never leave a mixed set; temporary files of killed writers are cleaned by the next run,
never those of a live one; a failed write names the output and leaves nothing.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from fxrewrite import io as fio
from fxrewrite.io import LOCK_NAME, OutputError, OutputWriteError, atomic_writes, check_output, write_bytes


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------- not a regular file
def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def unix_socket(path: Path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return server


@pytest.mark.parametrize("force", [False, True])
def test_devices_fifos_and_sockets_are_never_replaced(tmp_path, force):
    pipe = fifo(tmp_path / "pipe.pt")
    server = unix_socket(tmp_path / "sock.pt")
    try:
        for path, kind in [(Path("/dev/null"), "a character device"), (pipe, "a FIFO (named pipe)"),
                           (tmp_path / "sock.pt", "a socket")]:
            with pytest.raises(OutputError) as err:
                write_bytes(path, lambda f: f.write(b"x"), force=force)
            assert str(err.value) == f"{path}: output exists and is {kind}, not a regular file; refusing to replace it"
        assert Path("/dev/null").is_char_device() and pipe.is_fifo() and (tmp_path / "sock.pt").is_socket()
        assert files(tmp_path) == ["pipe.pt", "sock.pt"]
    finally:
        server.close()


def test_a_symbolic_link_to_a_device_is_refused_too(tmp_path):
    link = tmp_path / "out.pt"
    link.symlink_to("/dev/null")
    with pytest.raises(OutputError) as err:
        write_bytes(link, lambda f: f.write(b"x"), force=True)
    assert str(err.value) == f"{link}: output exists and is a character device, not a regular file; refusing to replace it"
    assert link.is_symlink()


def test_a_fifo_appearing_while_writing_is_refused_at_the_commit(tmp_path):
    target = tmp_path / "a.pt"
    with pytest.raises(OutputError) as err:
        with atomic_writes([target], force=True) as (handle,):
            handle.write(b"new")
            os.mkfifo(target)
    assert str(err.value) == f"{target}: output exists and is a FIFO (named pipe), not a regular file; refusing to replace it"
    assert target.is_fifo() and files(tmp_path) == ["a.pt"]


# ---------------------------------------------------------------------------- inputs
def test_no_output_may_be_any_input(tmp_path):
    config, rules = tmp_path / "m.yaml", tmp_path / "r.yaml"
    config.write_text("nc: 1\n")
    rules.write_text("rules: []\n")
    code = tmp_path / "code"
    (code / "models").mkdir(parents=True)
    (code / "models" / "common.py").write_text("# the fork's code\n")
    (tmp_path / "hard.py").hardlink_to(code / "models" / "common.py")
    inputs = [tmp_path / "last.pt", config, None, rules, code]
    for output, given in [(config, config), (tmp_path / "r.yaml", rules), (code / "models" / "common.py", code),
                          (tmp_path / "hard.py", code)]:
        with pytest.raises(OutputError) as err:
            with atomic_writes([tmp_path / "out.pt", output], force=True, inputs=inputs) as handles:
                for handle in handles:
                    handle.write(b"x")
        assert str(err.value) == f"{output}: output is the same file as the input {given}; refusing to overwrite an input"
    assert config.read_text() == "nc: 1\n" and (code / "models" / "common.py").read_text() == "# the fork's code\n"
    # a new file inside an input folder destroys nothing
    assert check_output(code / "new.pt", inputs=inputs) == (code / "new.pt").resolve()


# ---------------------------------------------------------------------------- never mixed
def slow_first_commit(monkeypatch, pause: threading.Event, paused: threading.Event, writer: str):
    """Writer ``writer``'s first rename waits (at most 5 s) for ``pause`` -- another writer is trying meanwhile."""
    real = fio._commit

    def commit(temp, target, force, shown):
        real(temp, target, force, shown)
        if threading.current_thread().name == writer and not paused.is_set():
            paused.set()
            pause.wait(5)

    monkeypatch.setattr(fio, "_commit", commit)


def race(tmp_path, monkeypatch) -> tuple[dict[str, bytes], list[str]]:
    """Writers A and B replace the same three outputs; B starts while A is half-way through its renames."""
    targets = [tmp_path / f"out.{ext}" for ext in ("pt", "yaml", "json")]
    b_waits, a_paused, notices = threading.Event(), threading.Event(), []
    slow_first_commit(monkeypatch, b_waits, a_paused, "A")

    def write(content: bytes):
        def report(message):
            notices.append(message)
            b_waits.set()

        with atomic_writes(targets, force=True, report=report) as handles:
            for handle in handles:
                handle.write(content)

    a = threading.Thread(target=write, args=(b"A",), name="A")
    a.start()
    assert a_paused.wait(5)
    b = threading.Thread(target=write, args=(b"B",), name="B")
    b.start()
    b.join(10)
    a.join(10)
    return {p.name: p.read_bytes() for p in targets}, notices


def test_two_forced_writers_never_leave_a_mixed_set(tmp_path, monkeypatch):
    written, notices = race(tmp_path, monkeypatch)
    assert written == {"out.pt": b"B", "out.yaml": b"B", "out.json": b"B"}  # B waited for A's whole set
    assert notices == [f"waiting for another fxrewrite run that is writing into {tmp_path}"]
    assert files(tmp_path) == ["out.json", "out.pt", "out.yaml"]  # no lock file, no temporary file


def test_without_the_lock_the_same_race_mixes_the_set(tmp_path, monkeypatch):
    """The race above is real: with the lock taken away, B's files land between A's."""
    import contextlib

    monkeypatch.setattr(fio, "_output_lock", lambda folders, report: contextlib.nullcontext())
    written, _ = race(tmp_path, monkeypatch)
    assert written == {"out.pt": b"B", "out.yaml": b"A", "out.json": b"A"}


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fxrewrite import io as fio
    folder, content, signal = Path(sys.argv[1]), sys.argv[2].encode(), Path(sys.argv[3])
    real = fio._commit
    def commit(temp, target, force, shown):  # A: after its first rename, wait until B waits for the lock
        real(temp, target, force, shown)
        if content == b"A" and target.name == "out.pt":
            print("committing", flush=True)
            for _ in range(600):
                if signal.exists():
                    break
                time.sleep(0.05)
    fio._commit = commit
    def report(message):  # B: tell A that it waits
        print(message, file=sys.stderr, flush=True)
        signal.touch()
    with fio.atomic_writes([folder / "out.pt", folder / "out.yaml", folder / "out.json"], force=True,
                           report=report) as handles:
        for handle in handles:
            handle.write(content)
""")


def test_two_forced_processes_never_leave_a_mixed_set(tmp_path):
    out, signal = tmp_path / "out", tmp_path / "b-is-waiting"
    out.mkdir()
    a = subprocess.Popen([sys.executable, "-c", WRITER, str(out), "A", str(signal)], stdout=subprocess.PIPE, text=True)
    assert a.stdout.readline() == "committing\n"  # A renamed out.pt and holds the lock
    b = subprocess.run([sys.executable, "-c", WRITER, str(out), "B", str(signal)], capture_output=True, text=True,
                       timeout=120)
    a.wait(60)
    assert (a.returncode, b.returncode) == (0, 0)
    assert b.stderr == f"waiting for another fxrewrite run that is writing into {out}\n"
    names = ("out.pt", "out.yaml", "out.json")
    assert {name: (out / name).read_bytes() for name in names} == dict.fromkeys(names, b"B")
    assert files(out) == ["out.json", "out.pt", "out.yaml"]


# ---------------------------------------------------------------------------- stale temporary files
HANGING = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fxrewrite.io import atomic_writes
    folder = Path(sys.argv[1])
    with atomic_writes([folder / "out.pt", folder / "out.yaml"]) as handles:
        for handle in handles:
            handle.write(b"half")
            handle.flush()
        print("writing", flush=True)
        time.sleep(120)
""")


def hanging_writer(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HANGING, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    return process


def test_a_killed_writers_temporary_files_are_removed_by_the_next_run(tmp_path):
    process = hanging_writer(tmp_path)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    left = files(tmp_path)
    assert len(left) == 2 and all(name.startswith((f".out.pt.{process.pid}.", f".out.yaml.{process.pid}."))
                                  and name.endswith(".tmp") for name in left)
    notices = []
    write_bytes(tmp_path / "out.pt", lambda f: f.write(b"new"), report=notices.append)
    stale = tmp_path / next(n for n in left if n.startswith(".out.pt"))
    assert notices == [f"removed {stale}, a temporary file left by an interrupted run (process {process.pid} is gone)"]
    assert files(tmp_path) == sorted(["out.pt", next(n for n in left if n.startswith(".out.yaml"))])
    write_bytes(tmp_path / "out.yaml", lambda f: f.write(b"new"), report=notices.append)
    assert files(tmp_path) == ["out.pt", "out.yaml"]


def test_a_live_writers_temporary_files_are_left_alone(tmp_path):
    process = hanging_writer(tmp_path)
    try:
        before = set(files(tmp_path))
        notices = []
        write_bytes(tmp_path / "out.pt", lambda f: f.write(b"mine"), report=notices.append)
        assert notices == [] and before < set(files(tmp_path))
        assert (tmp_path / "out.pt").read_bytes() == b"mine"
    finally:
        process.kill()
        process.wait()


def test_a_temporary_file_whose_pid_was_reused_is_stale(tmp_path):
    """The name holds the writer's start time: a live process with the same pid but another start is not it."""
    me = os.getpid()
    stale = tmp_path / f".out.pt.{me}.1.0123abcd.tmp"  # this pid, started at tick 1 (it was not)
    stale.write_bytes(b"old")
    notices = []
    write_bytes(tmp_path / "out.pt", lambda f: f.write(b"x"), report=notices.append)
    assert notices == [f"removed {stale}, a temporary file left by an interrupted run (process {me} is gone)"]
    assert files(tmp_path) == ["out.pt"]


def test_files_that_merely_look_temporary_are_not_touched(tmp_path):
    for name in (".out.pt.abc.tmp", ".other.pt.1.1.0123abcd.tmp", "notes.tmp"):
        (tmp_path / name).write_bytes(b"keep")
    write_bytes(tmp_path / "out.pt", lambda f: f.write(b"x"))
    assert files(tmp_path) == [".other.pt.1.1.0123abcd.tmp", ".out.pt.abc.tmp", "notes.tmp", "out.pt"]


# ---------------------------------------------------------------------------- write errors
def test_a_failed_write_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    """Simulated: the second output's file object raises ENOSPC on write (as a full disk does)."""
    real = fio._open_temp

    class Full:
        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._handle, name)

    opened = []

    def open_temp(folder, name):
        temp, handle = real(folder, name)
        opened.append(name)
        return temp, Full(handle) if len(opened) == 2 else handle

    monkeypatch.setattr(fio, "_open_temp", open_temp)
    with pytest.raises(OutputWriteError) as err:
        with atomic_writes([tmp_path / "a.pt", tmp_path / "a.yaml"]) as (a, b):
            a.write(b"1")
            b.write(b"2")
    assert str(err.value) == (f"{tmp_path / 'a.yaml'}: cannot write it: [Errno 28] No space left on device; nothing "
                              "was written (no output, no temporary file left)")
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert files(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs); skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); the disk-full "
                    "handling is still tested with a simulated ENOSPC")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_names_the_output_and_leaves_nothing(small_disk):
    target = small_disk / "big.pt"
    with pytest.raises(OutputWriteError) as err:
        write_bytes(target, lambda f: f.write(b"\0" * (2 << 20)))
    assert str(err.value) == (f"{target}: cannot write it: [Errno 28] No space left on device; nothing was written "
                              "(no output, no temporary file left)")
    assert files(small_disk) == []
    write_bytes(target, lambda f: f.write(b"fits"))  # the space came back
    assert files(small_disk) == ["big.pt"]


def test_the_lock_file_is_an_output_folder_detail_not_an_output(tmp_path):
    write_bytes(tmp_path / "a.pt", lambda f: f.write(b"x"))
    assert LOCK_NAME not in files(tmp_path)
    (tmp_path / LOCK_NAME).write_bytes(b"")  # left by a run killed while renaming: taken and removed
    write_bytes(tmp_path / "a.pt", lambda f: f.write(b"y"), force=True)
    assert files(tmp_path) == ["a.pt"]
