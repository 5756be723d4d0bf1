"""``fxrewrite convert`` / ``fxrewrite draw`` end to end: outputs, summary, and every bad input."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from helpers.yolo_cli import TINY, files, run, tiny_yaml  # noqa: F401  (tiny_yaml: a fixture)
from fxrewrite.yolov9 import DetectionModel, convert
from fxrewrite.yolov9 import checkpoint as ckpt_io
from fxrewrite.yolov9.checkpoint import load_checkpoint
from fxrewrite.yolov9.classes import allowed_globals, official_aliases
from fxrewrite.yolov9.cli import randomise_batchnorm

def training_checkpoint(path: Path, model, ema=None, **entries) -> Path:
    """A train_dual.py-style checkpoint (fp16 model and ema, optimizer state...) pickled under official names."""
    official_names = {cls: name for name, cls in official_aliases().items()}
    loadable = set(allowed_globals()) | ckpt_io._torch_default_globals() | set(official_names.values())
    data = {"model": ckpt_io._fp16_copy(model, official_names), "ema": None if ema is None else
            ckpt_io._fp16_copy(ema, official_names), "updates": 100, "optimizer": None, "epoch": 7,
            "best_fitness": None, "opt": {"epochs": 10}, "git": None, "date": "2026-11-27", **entries}
    with open(path, "wb") as f:
        torch.save(data, f, pickle_module=ckpt_io._pickle_module(official_names, loadable))
    return path


@pytest.fixture(scope="module")
def pgi_checkpoint(tmp_path_factory, tiny_yaml) -> tuple[Path, DetectionModel, DetectionModel]:
    torch.manual_seed(0)
    model = DetectionModel(str(tiny_yaml))
    ema = DetectionModel(str(tiny_yaml))  # other weights: the EMA must be the one converted
    randomise_batchnorm(model, 1)
    randomise_batchnorm(ema, 2)
    model.names = ema.names = ["cat", "dog", "bird"]
    path = training_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", model, ema)
    return path, model, ema


def test_convert_a_training_checkpoint_uses_ema_and_writes_three_files(capsys, tmp_path, pgi_checkpoint):
    src, _, ema = pgi_checkpoint
    out = tmp_path / "gelan.pt"
    code, stdout, err = run(capsys, "convert", src, "-o", out, "--verify", "--imgsz", "128", "160")
    assert (code, err) == (0, "")
    assert files(tmp_path) == ["gelan.params.json", "gelan.pt", "gelan.yaml"]
    lines = stdout.splitlines()
    assert lines[0] == f"source: {src}: 'ema' weights (float16, epoch 7)"
    assert lines[1] == "head: DualDDetect -> DDetect"
    assert lines[2] == "layers: 27 -> 23 kept; pruned 23..25; collapsed 0"
    assert lines[3] == "layer map (new <- old): 0..21 <- 1..22, 22 <- 26"
    assert lines[4] == ("rules applied (rewrites): dual-ddetect-to-ddetect (1), prune-auxiliary-branch (1), "
                        "collapse-silence (1)")
    assert lines[6] == ("verify: 128x160 random image, converted vs training main output: PASS: 1 output tensor(s), "
                        "max abs diff 0, max rel diff 0 (required: bitwise equal)")
    loaded = load_checkpoint(out)
    assert lines[7] == (f"verify: the derived config builds exactly the converted model's "
                        f"{len(loaded.model.state_dict()):,} tensors (names and shapes)")
    assert loaded.weights == "model" and loaded.stored_dtype == torch.float16 and loaded.epoch == -1
    assert loaded.model.names == ["cat", "dog", "bird"]
    derived = yaml.safe_load((tmp_path / "gelan.yaml").read_text())
    assert loaded.model.yaml == derived and derived["head"][-1] == [[15, 18, 21], 1, "DDetect", ["nc"]]
    param_map = json.loads((tmp_path / "gelan.params.json").read_text())
    assert param_map["model.22.cv2.0.0.conv.weight"] == "model.26.cv4.0.0.conv.weight"
    assert set(param_map) == set(loaded.model.state_dict())
    # The converted weights are the EMA's (rounded to fp16 as stored), not the raw model's.
    ema16 = ema.half().float()
    for new, old in param_map.items():
        assert torch.equal(loaded.model.state_dict()[new].float(), ema16.state_dict()[old].float())


def test_dry_run_prints_the_layer_map_and_writes_nothing(capsys, tmp_path, pgi_checkpoint):
    src, _, _ = pgi_checkpoint
    code, stdout, _ = run(capsys, "convert", src, "-o", tmp_path / "x.pt", "--dry-run")
    assert code == 0 and "layer map (new <- old): 0..21 <- 1..22, 22 <- 26" in stdout
    assert stdout.splitlines()[-1] == "dry run: nothing written"
    assert files(tmp_path) == []


def test_converted_checkpoint_is_nothing_to_do(capsys, tmp_path, pgi_checkpoint):
    src, _, _ = pgi_checkpoint
    first = tmp_path / "gelan.pt"
    assert run(capsys, "convert", src, "-o", first)[0] == 0
    code, stdout, err = run(capsys, "convert", first, "-o", tmp_path / "again.pt")
    assert code == 0 and err == ""
    assert stdout.splitlines()[-1] == (f"{first}: nothing to convert: the model (DDetect head) has no auxiliary "
                                       f"layers for the rules to remove; it is already an inference model; nothing written")
    assert "again.pt" not in files(tmp_path)


def test_output_equal_to_input_is_refused_and_the_input_kept(capsys, pgi_checkpoint):
    src, _, _ = pgi_checkpoint
    before = src.read_bytes()
    code, out, err = run(capsys, "convert", src, "-o", src, "--force")
    assert code == 1 and out == ""
    assert err == f"fxrewrite: error: {src}: output is the same file as the input {src}; refusing to overwrite an input\n"
    assert src.read_bytes() == before


def test_existing_output_needs_force(capsys, tmp_path, pgi_checkpoint):
    src, _, _ = pgi_checkpoint
    (tmp_path / "gelan.pt").write_bytes(b"keep me")
    code, _, err = run(capsys, "convert", src, "-o", tmp_path / "gelan.pt")
    assert code == 1
    assert err == f"fxrewrite: error: {tmp_path / 'gelan.pt'}: output already exists (use force=True / --force to overwrite)\n"
    assert (tmp_path / "gelan.pt").read_bytes() == b"keep me"
    assert files(tmp_path) == ["gelan.pt"]


def bad_inputs(folder: Path, model) -> dict[str, tuple[Path, str]]:
    """Each bad input and the exact error the CLI must print for it."""
    found = {}
    text = folder / "notes.txt"
    text.write_text("not a checkpoint")
    found["not a checkpoint"] = (text, f"{text}: not a torch checkpoint (not a zip archive)")
    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    found["empty"] = (empty, f"{empty}: file is empty (0 bytes), not a checkpoint")
    full = training_checkpoint(folder / "full.pt", model)
    truncated = folder / "truncated.pt"
    truncated.write_bytes(full.read_bytes()[: os.path.getsize(full) // 2])
    found["truncated"] = (truncated, f"{truncated}: truncated or corrupt zip archive (no end-of-archive record)")
    bare = folder / "state_dict.pt"
    torch.save(model.state_dict(), bare)
    found["bare state_dict"] = (bare, f"{bare}: a bare state_dict")
    ultra = folder / "ultralytics.pt"
    with zipfile.ZipFile(ultra, "w") as z:
        z.writestr("ultralytics/data.pkl", b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01cultralytics.nn.tasks\n"
                                           b"DetectionModel\nq\x02)\x81q\x03s.")
        z.writestr("ultralytics/version", b"3\n")
    found["ultralytics"] = (ultra, f"{ultra}: an Ultralytics checkpoint (it references ultralytics.nn.tasks.DetectionModel)")
    custom = folder / "custom.pt"
    with zipfile.ZipFile(custom, "w") as z:
        z.writestr("custom/data.pkl", b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01cmodels.common\nMyBlock\n"
                                      b"q\x02)\x81q\x03s.")
        z.writestr("custom/version", b"3\n")
    found["unknown block"] = (custom, f"{custom}: the model uses block classes unknown to fxrewrite: models.common.MyBlock")
    return found


@pytest.mark.parametrize("case", ["not a checkpoint", "empty", "truncated", "bare state_dict", "ultralytics",
                                  "unknown block"])
def test_bad_inputs_fail_with_a_specific_message_and_write_nothing(capsys, tmp_path, case, tiny_yaml):
    inputs = tmp_path / "in"
    inputs.mkdir()
    torch.manual_seed(0)
    path, message = bad_inputs(inputs, DetectionModel(str(tiny_yaml)))[case]
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run(capsys, "convert", path, "-o", out / "gelan.pt")
    assert code == 1 and stdout == ""
    assert err.startswith(f"fxrewrite: error: {message}") and err.count("\n") == 1
    assert files(out) == []


def test_unknown_block_message_says_how_to_register(capsys, tmp_path, tiny_yaml):
    torch.manual_seed(0)
    path, _ = bad_inputs(tmp_path, DetectionModel(str(tiny_yaml)))["unknown block"]
    _, _, err = run(capsys, "convert", path, "-o", tmp_path / "x.pt")
    assert "register_block(MyBlock, 'models.common.MyBlock')" in err


def test_convert_from_a_config_is_the_no_download_default(capsys, tmp_path, tiny_yaml):
    out = tmp_path / "gelan.pt"
    code, stdout, _ = run(capsys, "convert", "--config", tiny_yaml, "-o", out, "--draw", tmp_path / "draw", "--fp32")
    assert code == 0
    assert stdout.splitlines()[0] == f"source: random weights (seed 0) built from config {tiny_yaml}"
    assert files(tmp_path / "draw") == ["after.svg", "before.svg", "diff.svg"]
    loaded = load_checkpoint(out, dtype=None)
    assert loaded.stored_dtype == torch.float32
    svg = (tmp_path / "draw" / "diff.svg").read_text()
    assert "model_26" in svg and "auxiliary" in svg and "backbone" in svg


def test_draw_command_marks_the_auxiliary_branch(capsys, tmp_path, tiny_yaml):
    code, stdout, _ = run(capsys, "draw", "--config", tiny_yaml, "-o", tmp_path / "g.dot")
    assert code == 0 and stdout.splitlines()[-1] == f"wrote {tmp_path / 'g.dot'}"
    dot = (tmp_path / "g.dot").read_text()
    assert "cluster" in dot and "auxiliary" in dot
    for layer in (23, 24, 25):
        assert f"model_{layer}" in dot


def test_python_api_converts_an_in_memory_model_the_same_way(tiny_yaml, pgi_checkpoint):
    _, model, _ = pgi_checkpoint
    c = convert(model.eval())
    assert c.layer_map == {**{i: i + 1 for i in range(22)}, 22: 26}
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(c.model(x)[0], model(x)[0][1])
