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

from helpers.fork_trees import BUILD_SCRIPT, CHECK_SCRIPT, EXTRA_COMMON, EXTRA_YOLO, Fork, write_tree
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


def edited(rows: list, **changes) -> list:
    """``rows`` with the rows at the given indices (``_12=[...]``) replaced."""
    rows = copy.deepcopy(rows)
    for key, row in changes.items():
        rows[int(key[1:])] = row
    return rows


UP = [None, 2, "nearest"]
# Case 1: custom blocks on the main path and in the auxiliary branch.
CUSTOM = config(
    backbone=[
        [-1, 1, "Silence", []],  # 0
        [-1, 1, "Conv", [16, 3, 2]],  # 1
        [-1, 1, "Conv", [32, 3, 2]],  # 2
        [-1, 1, "RepBlock", [32]],  # 3 multi-branch
        [-1, 1, "Down", [64]],  # 4 P3
        [-1, 1, "Attention", [64]],  # 5 attention
        [-1, 1, "Pyramid", [[64, 64]]],  # 6 returns [P4, P5]
        [6, 1, "Index", [0]],  # 7 P4
        [6, 1, "Index", [1]],  # 8 P5
    ],
    head=[
        [5, 1, "nn.MaxPool2d", [2, 2]],  # 9 P3 -> P4
        [8, 1, "nn.Upsample", UP],  # 10 P5 -> P4
        [7, 1, "nn.AvgPool2d", [1, 1]],  # 11
        [[9, 10, 11, 7, -2], 1, "Concat", [1]],  # 12 five-way concatenation
        [-1, 1, "HyperConv", [64]],  # 13
        [-1, 1, "nn.Upsample", UP],  # 14
        [[-1, 5], 1, "Concat", [1]],  # 15
        [-1, 1, "CSP", [32]],  # 16 P3 main
        [-1, 1, "Down", [64]],  # 17
        [[-1, 13], 1, "Concat", [1]],  # 18
        [-1, 1, "Attention", [64]],  # 19 P4 main
        [-1, 1, "Down", [64]],  # 20
        [[-1, 8], 1, "Concat", [1]],  # 21
        [-1, 1, "RepBlock", [64]],  # 22 P5 main
        [0, 1, "Conv", [16, 3, 2]],  # 23 auxiliary
        [-1, 1, "Conv", [32, 3, 2]],  # 24
        [-1, 1, "Down", [64]],  # 25
        [-1, 1, "Attention", [64]],  # 26 P3 aux
        [-1, 1, "Pyramid", [[64, 64]]],  # 27
        [27, 1, "Index", [0]],  # 28 P4 aux
        [27, 1, "Index", [1]],  # 29 P5 aux
        [[26, 28, 29, 16, 19, 22], 1, "DualDDetect", ["nc"]],  # 30
    ])
# Case 4: main-path layers after auxiliary ones, and dead layers that feed nothing.
INTERLEAVED = config(head=[
    [5, 1, "CBLinear", [[64]]],  # 10 aux
    [7, 1, "CBLinear", [[64, 64]]],  # 11 aux
    [9, 1, "CBLinear", [[64, 64, 64]]],  # 12 aux
    [0, 1, "Conv", [16, 3, 2]],  # 13 aux
    [-1, 1, "Conv", [32, 3, 2]],  # 14
    [-1, 1, "CSP", [32]],  # 15
    [-1, 1, "Down", [64]],  # 16
    [[10, 11, 12, -1], 1, "CBFuse", [[0, 0, 0]]],  # 17
    [-1, 1, "CSP", [64]],  # 18 P3 aux
    [9, 1, "nn.Upsample", UP],  # 19 main
    [[-1, 7], 1, "Concat", [1]],  # 20 main
    [-1, 1, "CSP", [64]],  # 21 main
    [18, 1, "Down", [64]],  # 22 aux
    [[11, 12, -1], 1, "CBFuse", [[1, 1]]],  # 23
    [-1, 1, "CSP", [64]],  # 24 P4 aux
    [9, 1, "Conv", [32, 1, 1]],  # 25 dead
    [21, 1, "nn.Upsample", UP],  # 26 main
    [[-1, 5], 1, "Concat", [1]],  # 27
    [-1, 1, "CSP", [32]],  # 28 P3 main
    [24, 1, "Down", [64]],  # 29 aux
    [[12, -1], 1, "CBFuse", [[2]]],  # 30
    [-1, 1, "CSP", [64]],  # 31 P5 aux
    [28, 1, "Down", [32]],  # 32 main
    [[-1, 21], 1, "Concat", [1]],  # 33
    [-1, 1, "CSP", [64]],  # 34 P4 main
    [-1, 1, "Down", [64]],  # 35
    [[-1, 9], 1, "Concat", [1]],  # 36
    [-1, 1, "CSP", [64]],  # 37 P5 main
    [37, 1, "Conv", [16, 1, 1]],  # 38 dead
    [[18, 24, 31, 28, 34, 37], 1, "DualDDetect", ["nc"]],  # 39
])
# Case 7: four levels P2-P5 (strides 4..32): the dual head has 8 inputs.
P2P5 = config(head=HEAD[:12] + [
    [15, 1, "nn.Upsample", UP],  # 22
    [[-1, 3], 1, "Concat", [1]],  # 23
    [-1, 1, "CSP", [32]],  # 24 P2 main
    [5, 1, "CBLinear", [[64]]],  # 25
    [7, 1, "CBLinear", [[64, 64]]],  # 26
    [9, 1, "CBLinear", [[64, 64, 64]]],  # 27
    [0, 1, "Conv", [16, 3, 2]],  # 28
    [-1, 1, "Conv", [32, 3, 2]],  # 29
    [-1, 1, "CSP", [32]],  # 30 P2 aux
    [-1, 1, "Down", [64]],  # 31
    [[25, 26, 27, -1], 1, "CBFuse", [[0, 0, 0]]],  # 32
    [-1, 1, "CSP", [64]],  # 33 P3 aux
    [-1, 1, "Down", [64]],  # 34
    [[26, 27, -1], 1, "CBFuse", [[1, 1]]],  # 35
    [-1, 1, "CSP", [64]],  # 36 P4 aux
    [-1, 1, "Down", [64]],  # 37
    [[27, -1], 1, "CBFuse", [[2]]],  # 38
    [-1, 1, "CSP", [64]],  # 39 P5 aux
    [[30, 33, 36, 39, 24, 15, 18, 21], 1, "DualDDetect", ["nc"]],  # 40
])
SIDE_FORWARD = '''
_plain_init = DetectionModel.__init__


def _init(self, *args, **kwargs):
    self.return_side = False
    _plain_init(self, *args, **kwargs)
    self.return_side = True


def _forward_once(self, x):
    y, side = [], []
    for m in self.model:
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        x = m(x)
        if isinstance(m, DomainClassifier):
            side.append(x)
        y.append(x if m.i in self.save else None)
    return (x, side) if self.training and self.return_side else x


DetectionModel.__init__ = _init
DetectionModel._forward_once = _forward_once
'''
PER_LAYER_EPS = '''
_plain_initialize = initialize_weights


def initialize_weights(model):
    _plain_initialize(model)
    for i, layer in enumerate(getattr(model, "model", [])):
        for m in layer.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3 * (1 + i % 3)
'''
RENAMED_HEADS = '''
class SingleHead(DDetect):
    pass


class DualHead(DualDDetect):
    pass


HEADS = (DDetect, DualDDetect, SingleHead, DualHead)
'''
# Case 6: two images (RGB and infrared): layer 0 passes the list on, layers pick x[0] and x[1]; the
# auxiliary branch reads only the infrared image, the main path both.
TWO_INPUTS = config(ch=[3, 3], backbone=[
    [-1, 1, "Silence", []],  # 0: the list of images
    [0, 1, "Index", [0]],  # 1 RGB
    [0, 1, "Index", [1]],  # 2 infrared
    [1, 1, "Conv", [16, 3, 2]],  # 3
    [2, 1, "Conv", [16, 3, 2]],  # 4
    [[3, 4], 1, "Concat", [1]],  # 5
    [-1, 1, "Conv", [32, 3, 2]],  # 6 P2
    [-1, 1, "CSP", [32]],  # 7
    [-1, 1, "Down", [64]],  # 8 P3
    [-1, 1, "CSP", [64]],  # 9
    [-1, 1, "Down", [64]],  # 10 P4
    [-1, 1, "CSP", [64]],  # 11
    [-1, 1, "Down", [64]],  # 12 P5
    [-1, 1, "CSP", [64]],  # 13
], head=[
    [-1, 1, "nn.Upsample", UP],  # 14
    [[-1, 11], 1, "Concat", [1]],  # 15
    [-1, 1, "CSP", [64]],  # 16
    [-1, 1, "nn.Upsample", UP],  # 17
    [[-1, 9], 1, "Concat", [1]],  # 18
    [-1, 1, "CSP", [32]],  # 19 P3 main
    [-1, 1, "Down", [32]],  # 20
    [[-1, 16], 1, "Concat", [1]],  # 21
    [-1, 1, "CSP", [64]],  # 22 P4 main
    [-1, 1, "Down", [64]],  # 23
    [[-1, 13], 1, "Concat", [1]],  # 24
    [-1, 1, "CSP", [64]],  # 25 P5 main
    [4, 1, "Conv", [32, 3, 2]],  # 26 aux, infrared only
    [-1, 1, "Down", [64]],  # 27 P3 aux
    [-1, 1, "Down", [64]],  # 28 P4 aux
    [-1, 1, "Down", [64]],  # 29 P5 aux
    [[27, 28, 29, 19, 22, 25], 1, "DualDDetect", ["nc"]],  # 30
])
TWO_IMAGES = '''
def _example_input(self, ch, s):
    return [torch.zeros(1, c, s, s) for c in ch] if isinstance(ch, list) else torch.zeros(1, ch, s, s)


DetectionModel.example_input = _example_input
'''
COOKBOOK = Path(__file__).resolve().parents[2] / "rules" / "examples" / "fork-renamed-head.yaml"

FORKS: dict[str, Fork] = {fork.name: fork for fork in [
    Fork("plain", config()),
    Fork("custom-blocks", CUSTOM, EXTRA_COMMON, EXTRA_YOLO),
    # Case 2: the main path itself fuses with CBLinear/CBFuse (P5 into P4).
    Fork("cblinear-main", config(head=edited(HEAD, _0=[9, 1, "CBLinear", [[64]]], _1=[[10, 7], 1, "CBFuse", [[0]]]))),
    # Case 3: no Silence: layer 0 is a convolution reading the image, and both branches read it.
    Fork("no-silence", config(backbone=edited(BACKBONE, _0=[-1, 1, "Conv", [16, 3, 1]]))),
    Fork("interleaved", INTERLEAVED),
    # Case 5: a domain classifier behind a gradient-reversal layer on an auxiliary map; training returns it too.
    Fork("side-branch", config(head=HEAD[:-1] + [[30, 1, "DomainClassifier", [2]],
                                                 [[30, 33, 36, 15, 18, 21], 1, "DualDDetect", ["nc"]]]),
         EXTRA_COMMON, EXTRA_YOLO + SIDE_FORWARD),
    Fork("two-inputs", TWO_INPUTS, EXTRA_COMMON, EXTRA_YOLO + TWO_IMAGES),
    Fork("p2-p5", P2P5),
    # Case 8: the heads edited in place: an angle channel per class (2 * nc class-tower outputs).
    Fork("angle-head", config(), yolo="\ndef CLS_OUT(nc):\n    return 2 * nc\n"),
    # Case 8: heads under other names: the cookbook rule converts them.
    Fork("renamed-head", config(head=edited(HEAD, _27=[[30, 33, 36, 15, 18, 21], 1, "DualHead", ["nc"]])),
         yolo=RENAMED_HEADS, rules=COOKBOOK.read_text()),
    # Case 8: no single-head class at all: refused, naming the head and the cookbook.
    Fork("no-single-head", config(), yolo="\ndel DDetect\nHEADS = (DualDDetect,)\n"),
    # Case 9: BatchNorm eps set per layer by the fork's initialisation code.
    Fork("bn-eps", config(), yolo=PER_LAYER_EPS),
    # Case 10: a block comparing distances with a threshold, stored in fp16.
    Fork("fp16-threshold", config(backbone=edited(BACKBONE, _3=[-1, 1, "Shrink", []])), EXTRA_COMMON, EXTRA_YOLO),
    # Case 11: a block whose config arguments only the fork understands.
    Fork("unknown-args", config(head=edited(HEAD, _2=[-1, 1, "Mixer", [{"mode": "mix", "k": [3, 5]}, "gelu", 0.5]])),
         EXTRA_COMMON, EXTRA_YOLO),
]}


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
            rules = ["--rules", rule_file, "yolov9"]  # the fork's head rule, then the shipped pruning
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


def stored_layer_map(result) -> dict[int, int]:
    """new -> old layer index, as the converted checkpoint records it (read with the safe loader)."""
    from fxrewrite.yolov9.checkpoint import load_checkpoint

    loaded = load_checkpoint(result["out"], code=result["tree"])
    return {int(k): v for k, v in loaded.entries["fxrewrite"]["layer_map"].items()}


def main_rows(result) -> list:
    rows = derived(result)
    return rows["backbone"] + rows["head"]


def test_custom_blocks_on_both_branches(converted):
    result = converted_case(converted, "custom-blocks")
    rows = main_rows(result)
    assert [row[2] for row in rows] == [
        "Conv", "Conv", "RepBlock", "Down", "Attention", "Pyramid", "Index", "Index", "nn.MaxPool2d", "nn.Upsample",
        "nn.AvgPool2d", "Concat", "HyperConv", "nn.Upsample", "Concat", "CSP", "Down", "Concat", "Attention", "Down",
        "Concat", "RepBlock", "DDetect"]
    assert rows[11] == [[8, 9, 10, 6, -2], 1, "Concat", [1]]  # the five-way concatenation, renumbered (-2 kept)
    assert rows[5:8] == [[-1, 1, "Pyramid", [[64, 64]]], [5, 1, "Index", [0]], [5, 1, "Index", [1]]]
    assert {"models.common.Attention", "models.common.RepBlock", "models.common.HyperConv",
            "models.common.Pyramid"} <= set(result["check"]["classes"])


def test_cblinear_and_cbfuse_on_the_main_path_are_kept(converted):
    result = converted_case(converted, "cblinear-main")
    rows = main_rows(result)
    assert rows[9:11] == [[8, 1, "CBLinear", [[64]]], [[9, 6], 1, "CBFuse", [[0]]]]
    assert [row[2] for row in rows].count("CBLinear") == 1  # the auxiliary ones are gone


def test_layer_zero_reads_the_image_without_a_silence_layer(converted):
    result = converted_case(converted, "no-silence")
    rows = main_rows(result)
    assert rows[0] == [-1, 1, "Conv", [16, 3, 1]]
    assert len(rows) == 23 and rows[1] == [-1, 1, "Conv", [16, 3, 2]]


def test_interleaved_and_dead_layers_are_renumbered(converted):
    result = converted_case(converted, "interleaved")
    rows = main_rows(result)
    assert rows[9:] == [  # old 19.., after auxiliary rows; the dead layers 25 and 38 are gone
        [8, 1, "nn.Upsample", UP], [[-1, 6], 1, "Concat", [1]], [-1, 1, "CSP", [64]],
        [11, 1, "nn.Upsample", UP], [[-1, 4], 1, "Concat", [1]], [-1, 1, "CSP", [32]],
        [14, 1, "Down", [32]], [[-1, 11], 1, "Concat", [1]], [-1, 1, "CSP", [64]],
        [-1, 1, "Down", [64]], [[-1, 8], 1, "Concat", [1]], [-1, 1, "CSP", [64]],
        [[14, 17, 20], 1, "DDetect", ["nc"]]]
    layer_map = stored_layer_map(result)
    assert layer_map == {**{k: k + 1 for k in range(9)}, 9: 19, 10: 20, 11: 21, 12: 26, 13: 27, 14: 28, 15: 32,
                         16: 33, 17: 34, 18: 35, 19: 36, 20: 37, 21: 39}


def test_side_branch_classifier_is_pruned(converted):
    result = converted_case(converted, "side-branch")
    assert "models.common.DomainClassifier" not in result["check"]["classes"]
    assert "DomainClassifier" not in [row[2] for row in main_rows(result)]


def test_two_image_inputs(converted):
    result = converted_case(converted, "two-inputs")
    rows = main_rows(result)
    assert rows[:3] == [[-1, 1, "Silence", []], [0, 1, "Index", [0]], [0, 1, "Index", [1]]]  # two readers: kept
    assert derived(result)["ch"] == [3, 3] and len(rows) == 27


def test_four_detection_levels(converted):
    result = converted_case(converted, "p2-p5")
    rows = main_rows(result)
    assert rows[-1] == [[23, 14, 17, 20], 1, "DDetect", ["nc"]]
    assert result["check"]["shape"][1] == 4 + NC


def test_head_edited_in_place_converts_with_no_rule(converted):
    result = converted_case(converted, "angle-head")
    assert result["check"]["shape"][1] == 4 + 2 * NC  # the fork's own DDetect: an angle channel per class


def test_renamed_head_converts_with_the_cookbook_rule(converted):
    result = converted_case(converted, "renamed-head")
    assert main_rows(result)[-1] == [[14, 17, 20], 1, "SingleHead", ["nc"]]
    assert "models.yolo.SingleHead" in result["check"]["classes"]


def test_fork_without_a_single_head_class_is_refused(converted):
    result = converted["no-single-head"]
    assert result["code"] == 1
    assert result["stderr"].startswith(f"fxrewrite: error: {result['ckpt']}: ")
    assert "DualDDetect" in result["stderr"] and "rules/examples/fork-renamed-head.yaml" in result["stderr"]
    assert not result["out"].exists()


def test_per_layer_batchnorm_settings_are_kept(converted):
    result = converted_case(converted, "bn-eps")
    check = result["check"]
    assert "verify: note:" in result["stdout"]  # the derived config would build other eps values
    layer_map = stored_layer_map(result)
    assert [check["eps"][str(new)] for new in range(21)] == [check["dual_eps"][str(layer_map[new])] for new in range(21)]
    assert set(check["eps"]["21"]) == set(check["dual_eps"]["37"])  # the new head's towers: the main towers' BNs
    assert len({eps for new in range(22) for eps in check["eps"][str(new)]}) == 3  # 1e-3, 2e-3, 3e-3: all kept


def test_fp16_threshold_block(converted):
    result = converted_case(converted, "fp16-threshold")
    assert main_rows(result)[2] == [-1, 1, "Shrink", []]


def test_unknown_config_arguments_are_kept_verbatim(converted):
    result = converted_case(converted, "unknown-args")
    assert main_rows(result)[11] == [-1, 1, "Mixer", [{"mode": "mix", "k": [3, 5]}, "gelu", 0.5]]


# -- without --code, the Python interface, what the tree may and may not provide --------------------
def test_without_code_one_message_names_the_unknown_classes(built, tmp_path):
    _, ckpt = built["plain"]
    code, out, err = cli("convert", ckpt, "-o", tmp_path / "out.pt")
    assert code == 1 and out == ""
    assert err == (
        f"fxrewrite: error: {ckpt}: the model uses block classes unknown to fxrewrite: models.common.Bottleneck, "
        "models.common.CSP, models.common.Down; if you trust the code they come from, rerun with --code "
        "PATH_TO_THAT_REPO (the folder that holds models/; from Python: load_checkpoint(path, code=PATH)); library "
        "users may instead implement each as an nn.Module and register it before loading, e.g. "
        "fxrewrite.yolov9.register_block(Bottleneck, 'models.common.Bottleneck')\n")
    assert list(tmp_path.iterdir()) == []


def tree_modules() -> dict:
    return {name: m for name, m in sys.modules.items() if name.split(".")[0] in ("models", "utils")}


def test_python_interface_leaves_the_callers_modules_alone(built):
    from fxrewrite.yolov9 import convert
    from fxrewrite.yolov9.checkpoint import load_checkpoint

    tree, ckpt = built["custom-blocks"]
    before_modules, before_path = tree_modules(), list(sys.path)
    loaded = load_checkpoint(ckpt, code=tree)
    assert tree_modules() == before_modules and sys.path == before_path
    assert type(loaded.model).__module__ == "models.yolo" and loaded.weights == "ema"
    conversion = convert(loaded.model)  # the model's own classes: it came from that tree
    assert tree_modules() == before_modules and sys.path == before_path
    head = conversion.model.model[-1]
    assert type(head) is loaded.code.find_class("models.yolo.DDetect")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(conversion.model(x)[0], loaded.model.eval()(x)[0][1])


def test_model_built_in_memory_by_the_forks_code(built):
    from fxrewrite.yolov9 import convert

    tree, _ = built["unknown-args"]
    saved, saved_path = tree_modules(), list(sys.path)
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        from models.yolo import DetectionModel

        torch.manual_seed(0)
        model = DetectionModel(str(tree / "model.yaml")).eval()
        conversion = convert(model)
        assert type(conversion.model) is DetectionModel
        assert conversion.config["head"][2] == [-1, 1, "Mixer", [{"mode": "mix", "k": [3, 5]}, "gelu", 0.5]]
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(conversion.model(x)[0], model(x)[0][1])
        assert conversion.check_config() == []
    finally:
        for name in tree_modules():
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path[:] = saved_path


def pickled_model_of(path: Path, module: str, name: str) -> Path:
    """A checkpoint whose model is an instance of ``module.name`` (built by hand: nothing is imported)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/data.pkl", b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01c" + module.encode() + b"\n"
                   + name.encode() + b"\nq\x02)\x81q\x03s.")
        z.writestr("x/version", b"3\n")
    return path


@pytest.mark.parametrize("module, name, problem", [
    ("models.yolo", "decode", "which is not a block class of the model's code but something reached through it"),
    ("models.common", "F", "that the source tree {tree} does not define: models.common.F"),  # a module imported there
    ("models.yolo", "Conv", "that the source tree {tree} does not define: models.yolo.Conv"),  # imported there
    ("models.common", "Nothing", "that the source tree {tree} does not define: models.common.Nothing"),
    ("models.elsewhere", "Block", "that the source tree {tree} does not define: models.elsewhere.Block"),
    ("os", "system", "refused to load: the pickle references os.system"),
])
def test_the_tree_provides_only_the_classes_it_defines(built, tmp_path, module, name, problem):
    from fxrewrite.yolov9.checkpoint import CheckpointError, load_checkpoint

    tree, _ = built["plain"]
    path = pickled_model_of(tmp_path / "hostile.pt", module, name)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, code=tree)
    assert problem.format(tree=tree) in str(info.value)
    assert "nothing from the file was executed" in str(info.value) or "does not define" in str(info.value)
    assert "models.elsewhere" not in sys.modules


def test_code_must_be_a_source_tree(built, tmp_path):
    _, ckpt = built["plain"]
    code, _, err = cli("convert", ckpt, "-o", tmp_path / "out.pt", "--code", tmp_path)
    assert (code, err) == (1, f"fxrewrite: error: --code {tmp_path}: has no models/ folder; give the root of the "
                              "source tree the checkpoint was trained with (the folder that holds models/)\n")


def test_no_output_inside_the_code_tree(built):
    tree, ckpt = built["plain"]
    code, _, err = cli("convert", ckpt, "-o", tree / "models" / "common.py", "--code", tree, "--force")
    assert code == 1 and "common.py" in err
    assert "class CBFuse" in (tree / "models" / "common.py").read_text()


def test_fuse_with_code_is_refused_before_any_work(built, tmp_path):
    tree, ckpt = built["plain"]
    code, out, err = cli("convert", ckpt, "-o", tmp_path / "out.pt", "--code", tree, "--fuse")
    assert (code, out) == (1, "")
    assert err == ("fxrewrite: error: --fuse with --code: fusion would put fxrewrite's own layers into the fork's "
                   "model; convert without --fuse, then fuse with the fork's code (model.fuse())\n")


def test_a_tree_never_takes_over_torch_or_the_standard_library(tmp_path):
    from fxrewrite.yolov9.fork import CodeTree

    for name in ("models/common.py", "utils/general.py", "torch/__init__.py", "json.py", "export.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "data").mkdir()  # no Python files: not a package of the tree
    tree = CodeTree(tmp_path)
    assert tree.packages == {"models", "utils", "export"}
    with tree.imported():
        import torch as inside

    assert inside is torch
