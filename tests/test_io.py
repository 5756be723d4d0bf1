"""fxrewrite.io: atomic output writing and output-path checks."""
import os

import pytest

from fxrewrite import io as fio
from fxrewrite.io import OutputError, atomic_write, atomic_writes, check_output, write_bytes


def test_writes_complete_file(tmp_path):
    out = write_bytes(tmp_path / "a.bin", lambda f: f.write(b"hello"))
    assert out == (tmp_path / "a.bin").resolve()
    assert out.read_bytes() == b"hello"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_final_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_bytes(tmp_path / "a.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644


def test_failure_leaves_no_file_and_keeps_existing_target(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(tmp_path / "a.bin") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []

    (tmp_path / "a.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "a.bin", force=True) as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert (tmp_path / "a.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_refuses_existing_output_without_force(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputError) as err:
        write_bytes(target, lambda f: f.write(b"new"))
    assert str(err.value) == f"{target}: output already exists (use force=True / --force to overwrite)"
    assert isinstance(err.value, ValueError)
    write_bytes(target, lambda f: f.write(b"new"), force=True)
    assert target.read_bytes() == b"new"


def test_target_appearing_during_the_write_is_not_clobbered(tmp_path):
    target = tmp_path / "a.bin"
    with pytest.raises(OutputError) as err:
        with atomic_write(target) as f:
            f.write(b"new")
            target.write_bytes(b"someone else")
    assert str(err.value) == f"{target}: output already exists (use force=True / --force to overwrite)"
    assert target.read_bytes() == b"someone else"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_refuses_output_equal_to_an_input_even_with_force(tmp_path, monkeypatch):
    source = tmp_path / "in.bin"
    source.write_bytes(b"data")
    (tmp_path / "hard.bin").hardlink_to(source)
    (tmp_path / "soft.bin").symlink_to(source)
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    for output in (source, "in.bin", tmp_path / "d" / ".." / "in.bin", tmp_path / "hard.bin", tmp_path / "soft.bin"):
        with pytest.raises(OutputError) as err:
            check_output(output, force=True, inputs=[source])
        assert str(err.value) == f"{output}: output is the same file as the input {source}; refusing to overwrite an input"
    assert source.read_bytes() == b"data"


def test_bad_output_locations(tmp_path):
    with pytest.raises(OutputError) as err:
        check_output(tmp_path)
    assert str(err.value) == f"{tmp_path}: output is a directory"
    missing = tmp_path / "nope" / "a.bin"
    with pytest.raises(OutputError) as err:
        check_output(missing)
    assert str(err.value) == f"{missing}: output folder {tmp_path / 'nope'} does not exist"


def test_several_outputs_appear_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.txt"
    with pytest.raises(RuntimeError):
        with atomic_writes([a, b]) as (fa, fb):
            fa.write(b"1")
            raise RuntimeError
    assert os.listdir(tmp_path) == []
    with atomic_writes([a, b]) as (fa, fb):
        fa.write(b"1")
        fb.write(b"2")
    assert (a.read_bytes(), b.read_bytes()) == (b"1", b"2")


def test_publishing_failure_rolls_back_new_outputs(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "b.txt"
    real_commit = fio._commit
    calls = []

    def flaky(temp, target, force, shown):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("device gone")
        real_commit(temp, target, force, shown)

    monkeypatch.setattr(fio, "_commit", flaky)
    with pytest.raises(OSError, match="device gone"):
        with atomic_writes([a, b]) as (fa, fb):
            fa.write(b"1")
            fb.write(b"2")
    assert os.listdir(tmp_path) == []
