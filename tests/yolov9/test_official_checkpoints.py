"""The independent oracle through the real entry point.

Checkpoints written by the official code itself, as ``train_dual.py`` saves them
(tests/helpers/official_checkpoints.py), are converted by ``fxrewrite convert FILE -o OUT
--verify`` (in-process, through :func:`fxrewrite.cli.main`), loaded back by the official
code (``torch.load(weights_only=False)``: official classes) and run: the converted model's
prediction must be bitwise what the official training model (its EMA weights, as stored)
predicts from its main branch. Every head rule of ``rules/yolov9.yaml`` runs here on an
official model.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

from fxrewrite.cli import main
from fxrewrite.rule_file import load_rules
from helpers.official import official, requires_official
from helpers.official_checkpoints import IMAGE_SIZE, OFFICIAL_CHECKPOINTS

pytestmark = requires_official

FULL_WIDTH = ["yolov9-t", "yolov9-s", "yolov9-m", "yolov9-c", "yolov9-e", "yolov9-c-dseg"]

#: Parameter counts, training model -> converted model, nc=80 (measured; cross-checked with the official
#: code's own builder in test_pinned_counts_are_the_official_codes below). A converted detection model has
#: exactly the official gelan model's parameters; yolov9-c-dseg keeps its main branch's segmentation head,
#: whose mask-coefficient towers are wider than gelan-c-dseg's (27,668,256).
PARAMETERS = {
    "yolov9-t": (3_717_680, 2_442_640),
    "yolov9-s": (9_804_512, 7_226_208),
    "yolov9-m": (32_878_432, 20_124_000),
    "yolov9-c": (51_182_080, 25_498_752),
    "yolov9-e": (69_529_664, 58_114_432),
    "yolov9-c-dseg": (57_991_744, 27_824_672),
}
GELAN = {"yolov9-t": "gelan-t", "yolov9-s": "gelan-s", "yolov9-m": "gelan-m", "yolov9-c": "gelan-c",
         "yolov9-e": "gelan-e"}

#: Which official checkpoint exercises which rule of rules/yolov9.yaml (each must rewrite there).
RULE_CASES = {
    "dual-ddetect-to-ddetect": "yolov9-c",
    "dual-detect-to-detect": "dual-detect/8",
    "triple-ddetect-to-ddetect": "yolov9-cf/8",
    "dual-dsegment-to-dsegment": "yolov9-c-dseg",
    "prune-auxiliary-branch": "yolov9-c",
    "collapse-silence": "yolov9-c",
    "collapse-identity": "dual-detect/8",
}


def _converted_by_the_cli(checkpoint, folder, capsys) -> tuple[torch.nn.Module, str]:
    out = folder / "converted.pt"
    code = main(["convert", str(checkpoint.path), "-o", str(out), "--verify", "--imgsz", *map(str, IMAGE_SIZE)])
    stdout, stderr = capsys.readouterr()
    assert (code, stderr) == (0, ""), stdout + stderr
    ckpt = torch.load(out, map_location="cpu", weights_only=False)  # the official code, unpickling
    return ckpt["model"], stdout


@pytest.mark.parametrize("name", list(OFFICIAL_CHECKPOINTS))
def test_the_cli_converts_a_checkpoint_the_official_code_wrote_bitwise(name, official_checkpoint, tmp_path, capsys):
    checkpoint = official_checkpoint(name)
    assert checkpoint.model_differs  # 'model' and 'ema' predict differently: using the EMA is checked too
    model, stdout = _converted_by_the_cli(checkpoint, tmp_path, capsys)
    off = official()
    assert type(model).__module__ == "models.yolo" and type(model.model[0]).__module__ == "models.common"
    single = {"DualDDetect": "DDetect", "DualDetect": "Detect", "TripleDDetect": "DDetect",
              "DualDSegment": "DSegment"}[checkpoint.head]
    assert type(model.model[-1]) is getattr(off.yolo, single)
    assert f"head: {checkpoint.head} -> {single}" in stdout
    assert "converted vs training main output: PASS: 1 output tensor(s), max abs diff 0, max rel diff 0" in stdout
    assert next(p for p in model.parameters()).dtype == torch.float16  # saved as the official code saves
    assert model.names == checkpoint.names and isinstance(model.names, dict)
    model = model.float().eval()
    with torch.no_grad():
        out = model(checkpoint.image)
    assert torch.equal(out[0], checkpoint.expected)
    if checkpoint.expected_protos is not None:  # segmentation: the main branch's mask prototypes too
        assert torch.equal(out[1][2], checkpoint.expected_protos)
    if name in PARAMETERS:
        before, after = PARAMETERS[name]
        assert checkpoint.params == before
        assert f"parameters: {before:,} -> {after:,}" in stdout
        assert sum(p.numel() for p in model.parameters()) == after


def test_pinned_counts_are_the_official_codes():
    from fxrewrite.yolov9 import DetectionModel, SegmentationModel, convert

    off = official()

    def count(config: dict) -> int:  # the official builder's layers, on the meta device (no memory)
        with torch.device("meta"):
            layers, _ = off.yolo.parse_model(copy.deepcopy(config), ch=[3])
        return sum(p.numel() for p in layers.parameters())

    for name, (before, after) in PARAMETERS.items():
        assert count(off.cfg_dict(f"{name}.yaml")) == before, name
        with torch.device("meta"):
            ours = (SegmentationModel if "seg" in name else DetectionModel)(name)
        derived = convert(ours.eval()).config
        assert count(derived) == after, name  # the official builder makes the derived config this size
        if name in GELAN:
            assert count(off.cfg_dict(f"{GELAN[name]}.yaml")) == after, name


def test_every_rule_of_the_shipped_yolov9_rules_runs_on_an_official_checkpoint(official_checkpoint, tmp_path, capsys):
    assert set(RULE_CASES) == {rule.name for rule in load_rules("yolov9")}  # a new rule needs a case here
    applied = {}
    for name in sorted(set(RULE_CASES.values())):
        code = main(["convert", str(official_checkpoint(name).path), "--dry-run", "--imgsz", "64"])
        stdout = capsys.readouterr().out
        assert code == 0
        line = next(line for line in stdout.splitlines() if line.startswith("rules applied (rewrites): "))
        applied[name] = set(re.findall(r"([\w-]+) \(\d+\)", line))
    for rule, name in RULE_CASES.items():
        assert rule in applied[name], (rule, name, applied[name])
