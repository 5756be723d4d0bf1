"""Issue 14: checkpoints of forks with their own blocks, heads and layouts, converted with ``--code``.

Every case is a fork-like source tree (``fork_trees.py``, code written for these tests) built and
saved the way ``train_dual.py`` saves (by the tree's own code, in a subprocess), converted through
the CLI (``fxrewrite convert IN.pt -o OUT.pt --code TREE --verify``), then loaded back with plain
``torch.load`` and the tree's own classes in another subprocess, where the converted model's
output is compared bitwise with the dual model's main output and its parameter count with the
count of parameters reachable from the main half of the head (walked over the layers' ``f``
there, independently of fxrewrite).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fork_trees import BUILD_SCRIPT, CHECK_SCRIPT, Fork, write_tree
from fxrewrite.cli import main

NC = 3
# A small PGI model: Silence at 0, the main path 1..21, the auxiliary branch 22..36 (CBLinear/CBFuse
# reading the main backbone, a second backbone from the image), a DualDDetect on aux + main levels.
BACKBONE = [
    [-1, 1, "Silence", []],  # 0
    [-1, 1, "Conv", [16, 3, 2]],  # 1 P1/2
    [-1, 1, "Conv", [32, 3, 2]],  # 2 P2/4
    [-1, 1, "CSP", [32]],  # 3
    [-1, 1, "Down", [64]],  # 4 P3/8
    [-1, 1, "CSP", [64]],  # 5
    [-1, 1, "Down", [64]],  # 6 P4/16
    [-1, 1, "CSP", [64]],  # 7
    [-1, 1, "Down", [64]],  # 8 P5/32
    [-1, 1, "CSP", [64]],  # 9
]
HEAD = [
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 10
    [[-1, 7], 1, "Concat", [1]],  # 11
    [-1, 1, "CSP", [64]],  # 12
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 13
    [[-1, 5], 1, "Concat", [1]],  # 14
    [-1, 1, "CSP", [32]],  # 15 P3 main
    [-1, 1, "Down", [32]],  # 16
    [[-1, 12], 1, "Concat", [1]],  # 17
    [-1, 1, "CSP", [64]],  # 18 P4 main
    [-1, 1, "Down", [64]],  # 19
    [[-1, 9], 1, "Concat", [1]],  # 20
    [-1, 1, "CSP", [64]],  # 21 P5 main
    [5, 1, "CBLinear", [[64]]],  # 22
    [7, 1, "CBLinear", [[64, 64]]],  # 23
    [9, 1, "CBLinear", [[64, 64, 64]]],  # 24
    [0, 1, "Conv", [16, 3, 2]],  # 25
    [-1, 1, "Conv", [32, 3, 2]],  # 26
    [-1, 1, "CSP", [32]],  # 27
    [-1, 1, "Down", [64]],  # 28
    [[22, 23, 24, -1], 1, "CBFuse", [[0, 0, 0]]],  # 29
    [-1, 1, "CSP", [64]],  # 30 P3 aux
    [-1, 1, "Down", [64]],  # 31
    [[23, 24, -1], 1, "CBFuse", [[1, 1]]],  # 32
    [-1, 1, "CSP", [64]],  # 33 P4 aux
    [-1, 1, "Down", [64]],  # 34
    [[24, -1], 1, "CBFuse", [[2]]],  # 35
    [-1, 1, "CSP", [64]],  # 36 P5 aux
    [[30, 33, 36, 15, 18, 21], 1, "DualDDetect", ["nc"]],  # 37
]


def config(backbone=BACKBONE, head=HEAD, **extra) -> dict:
    return {"nc": NC, **extra, "backbone": copy.deepcopy(backbone), "head": copy.deepcopy(head)}


FORKS: dict[str, Fork] = {
    "plain": Fork("plain", config()),
}


# -- session fixtures: build every tree once, convert each, check all in one subprocess --------------
@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("forks")
    jobs, found = [], {}
    for name, fork in FORKS.items():
        tree = write_tree(base / name, fork)
        cfg = tree / "model.yaml"
        cfg.write_text(yaml.safe_dump(fork.config, sort_keys=False))
        ckpt = base / f"{name}-best.pt"
        jobs.append([str(tree), str(cfg), str(ckpt), 0])
        found[name] = (tree, ckpt)
    run_script(BUILD_SCRIPT, jobs)
    return found


def run_script(script: str, jobs: list) -> str:
    done = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def converted(built) -> dict[str, dict]:
    """Each fork converted through the CLI, then checked with its own code (one subprocess for all)."""
    results, jobs = {}, []
    for name, (tree, ckpt) in built.items():
        fork = FORKS[name]
        out = ckpt.with_name(f"{name}-gelan.pt")
        rules = []
        if fork.rules is not None:
            rule_file = ckpt.with_name(f"{name}-rules.yaml")
            rule_file.write_text(fork.rules)
            rules = ["--rules", "yolov9", rule_file]
        code, stdout, stderr = cli("convert", ckpt, "-o", out, "--code", tree, "--verify", "--imgsz", fork.image,
                                   *rules)
        results[name] = {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "tree": tree, "ckpt": ckpt}
        if code == 0:
            jobs.append([name, str(tree), str(ckpt), str(out), list(fork.main_towers), fork.image, [0, 1]])
    if jobs:
        for name, report in json.loads(run_script(CHECK_SCRIPT, jobs)).items():
            results[name]["check"] = report
    return results


def converted_case(converted, name) -> dict:
    result = converted[name]
    assert result["code"] == 0, result["stderr"]
    assert "PASS" in result["stdout"]
    check = result["check"]
    assert "error" not in check, check
    assert check["equal"], f"{name}: converted output differs from the dual model's main output"
    assert check["params"] == check["expected_params"]
    assert all(c.startswith(("models.", "torch.nn.")) for c in check["classes"]), check["classes"]
    return result


def derived(result) -> dict:
    return yaml.safe_load(result["out"].with_suffix(".yaml").read_text())


# -- the cases -----------------------------------------------------------------------------------
def test_plain_fork_converts_with_its_own_classes(converted):
    result = converted_case(converted, "plain")
    check = result["check"]
    assert "models.yolo.DDetect" in check["classes"] and "models.yolo.DualDDetect" not in check["classes"]
    assert not any(c.startswith("fxrewrite") for c in check["classes"])
    rows = derived(result)
    assert rows["head"][-1] == [[14, 17, 20], 1, "DDetect", ["nc"]]  # Silence collapsed: one less
    assert len(rows["backbone"]) + len(rows["head"]) == 22  # Silence collapsed: 21 main layers + the head
