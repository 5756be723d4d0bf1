"""The command line: ``fxrewrite demo`` and ``fxrewrite rules``."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from fxrewrite import registry
from fxrewrite.cli import main


def test_demo(capsys):
    assert main(["demo"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines() == [
        "fxrewrite demo: an example model with an auxiliary branch -> its main output only",
        "keep-main-output (prune_unreachable): 0 matched, 1 rewritten, 14 tensors dropped",
        "drop-identity (collapse): 1 matched, 1 rewritten",
        "nodes: 13 kept, 8 pruned, 1 collapsed",
        "parameters: 19,588 -> 14,746",
        "verification against the main output: 1 output tensor(s): bitwise equal",
    ]


def test_rules_with_a_bad_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - name: a\n    action: colapse\n")
    assert main(["rules", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"fxrewrite: error: {path}:3: rule 'a': unknown action 'colapse'; "
                            f"known actions: {', '.join(registry.action_names())}\n")


def test_rules_with_a_missing_file(tmp_path, capsys):
    path = tmp_path / "missing.yaml"
    assert main(["rules", str(path)]) == 1
    assert capsys.readouterr().err == f"fxrewrite: error: {path}: no such rule file\n"


def test_rules_with_several_errors_prints_one_line_each(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - name: a\n    action: prune_unreachable\n    args: {outputs: 0}\n"
                    "  - name: b\n    action: prune_unreachable\n    colour: red\n")
    assert main(["rules", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"fxrewrite: error: {path}:4: rule 'a': argument 'outputs' of action 'prune_unreachable' must be a list, "
        f"not an integer (0)",
        f"{path}:7: rule 'b': unknown key 'colour'; expected action, args, checks, description, mode, name, pattern, table",
    ]


def test_rules_with_a_good_file(tmp_path, capsys):
    path = tmp_path / "good.yaml"
    path.write_text("rules:\n  - {name: keep, action: prune_unreachable, args: {outputs: [0]}}\n"
                    "  - {name: flat, pattern: {module_class: Identity}, action: collapse}\n")
    assert main(["rules", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: 2 rule(s) OK: keep, flat\n"


def test_rules_without_files_lists_actions_and_checks(capsys):
    assert main(["rules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "actions: " + ", ".join(registry.action_names())
    assert lines[1] == "checks: " + ", ".join(registry.check_names())
    assert lines[2].startswith("shipped rule sets:")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: fxrewrite" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def _program(*args: str, unbuffered: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """The installed ``fxrewrite`` program (its console script), as users run it: with its standard
    output buffered (PYTHONUNBUFFERED removed), so that output lost at exit would show; or unbuffered."""
    script = shutil.which("fxrewrite", path=os.path.dirname(sys.executable))
    assert script, "the fxrewrite console script is not installed next to this Python (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    kwargs.setdefault("capture_output", "stdout" not in kwargs)
    return subprocess.run([script, *args], text=True, timeout=300, env=env, **kwargs)


def test_the_program_ends_with_mains_status_and_all_its_output(tmp_path):
    # fxrewrite.cli.run ends the process with os._exit after main: the status and every line
    # printed (buffered: stdout is a pipe here) must still arrive.
    done = _program("rules")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("actions: ") and lines[1].startswith("checks: ") and done.stdout.endswith("\n")
    assert done.stdout == subprocess.run([sys.executable, "-c", "import sys; from fxrewrite.cli import main; "
                                          "sys.exit(main(['rules']))"], capture_output=True, text=True).stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [1]\n")
    done = _program("rules", str(bad))
    assert done.returncode == 1
    assert done.stderr == f"fxrewrite: error: {bad}:1: each rule must be a mapping with at least 'name' and 'action'\n"
    done = _program("no-such-command")
    assert done.returncode == 2 and "invalid choice: 'no-such-command'" in done.stderr
    done = _program()
    assert done.returncode == 2 and done.stdout.startswith("usage: fxrewrite")


def test_the_program_fails_when_its_output_cannot_be_written():
    # /dev/full: every write fails with ENOSPC (Linux, which fxrewrite needs: flock, preadv)
    with open("/dev/full", "w") as full:
        done = _program("rules", stdout=full, stderr=subprocess.PIPE)
    assert done.returncode == 120
    assert done.stderr == "fxrewrite: error: cannot write its output: [Errno 28] No space left on device\n"


def test_a_reader_that_went_away_is_not_an_error():
    # `fxrewrite rules | head -c 1`, with head already gone: writing the buffered output fails with EPIPE
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = _program("rules", stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_reader_that_goes_away_while_the_command_prints_ends_it_quietly_as_sigpipe_would():
    # `fxrewrite rules | head -1` with unbuffered output: the first line written after head is gone fails
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = _program("rules", stdout=write_end, stderr=subprocess.PIPE, unbuffered=True)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_broken_pipe_that_is_not_the_output_is_an_error():
    # A command failing with EPIPE on another pipe (a drawing's `dot` that died) while its own output
    # is a healthy pipe, a regular file, or a pipe nobody reads any more (then: quiet, 141)
    program = ("import sys, fxrewrite.cli as cli\n"
               "def dot_died(args):\n"
               "    raise BrokenPipeError(32, 'Broken pipe')\n"
               "cli._rules = dot_died\n"
               "cli.run(['rules'])\n")
    run = functools.partial(subprocess.run, [sys.executable, "-c", program], stderr=subprocess.PIPE, text=True,
                            timeout=120)
    healthy = run(stdout=subprocess.PIPE)
    assert (healthy.returncode, healthy.stderr) == (1, "fxrewrite: error: [Errno 32] Broken pipe\n")
    with tempfile.TemporaryFile("w") as file:
        filed = run(stdout=file)
    assert (filed.returncode, filed.stderr) == (1, "fxrewrite: error: [Errno 32] Broken pipe\n")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        gone = run(stdout=write_end)
    finally:
        os.close(write_end)
    assert (gone.returncode, gone.stderr) == (141, "")
