"""No output may be an input, and nothing is created before the inputs are validated.

Every file a command reads (the checkpoint, the ``--config`` file, every ``--rules`` file)
is compared with every file it would write (``OUT.pt`` and its ``OUT.yaml``,
``OUT.params.json``, ``OUT.safetensors``, the drawings, exports), ``--force`` or not.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers.yolo_cli import files, run
from fxrewrite.rule_file import shipped_rules_dir
from fxrewrite.yolov9.config import CONFIG_DIR




@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "m.yaml"
    path.write_bytes((CONFIG_DIR / "yolov9-t.yaml").read_bytes())
    return path


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_bytes((shipped_rules_dir() / "yolov9.yaml").read_bytes())
    return path


def refused(output: Path, given: Path) -> str:
    return f"fxrewrite: error: {output}: output is the same file as the input {given}; refusing to overwrite an input\n"


def test_the_config_file_is_an_input_of_convert(capsys, tmp_path, config):
    # m.pt's derived config is m.yaml: the very file the model is built from
    before = config.read_bytes()
    code, out, err = run(capsys, "convert", "--config", config, "-o", tmp_path / "m.pt", "--force")
    assert (code, out) == (1, "")
    assert err == refused(tmp_path / "m.yaml", config)
    assert config.read_bytes() == before and files(tmp_path) == ["m.yaml"]


def test_every_rules_file_is_an_input_of_convert(capsys, tmp_path, config, rules):
    other = tmp_path / "extra.yaml"
    other.write_text("rules: []\n")
    before = rules.read_bytes()
    code, out, err = run(capsys, "convert", "--config", config, "--rules", rules, "-o", tmp_path / "r.pt", "--force")
    assert (code, out) == (1, "") and err == refused(tmp_path / "r.yaml", rules)
    assert rules.read_bytes() == before
    # the second of several rule files, and the parameter map's name
    params = tmp_path / "p.params.json"
    params.write_text("rules: []\n")
    code, _, err = run(capsys, "convert", "--config", config, "--rules", "yolov9", params, "-o", tmp_path / "p.pt",
                       "--force")
    assert code == 1 and err == refused(params, params)
    assert params.read_text() == "rules: []\n" and files(tmp_path) == ["extra.yaml", "m.yaml", "p.params.json", "r.yaml"]


def test_a_drawing_may_not_be_an_input(capsys, tmp_path, config):
    before = config.read_bytes()
    code, _, err = run(capsys, "convert", "--config", config, "-o", tmp_path / "out.pt", "--draw", tmp_path, "--force")
    assert code == 0  # m.yaml is not one of the drawings
    (tmp_path / "diff.svg").unlink()
    config.rename(tmp_path / "diff.svg")  # a config named like a drawing
    code, _, err = run(capsys, "convert", "--config", tmp_path / "diff.svg", "-o", tmp_path / "o2.pt", "--draw",
                       tmp_path, "--force")
    assert code == 1 and err == refused(tmp_path / "diff.svg", tmp_path / "diff.svg")
    assert (tmp_path / "diff.svg").read_bytes() == before


def test_draw_and_export_check_their_inputs_too(capsys, tmp_path, config, rules):
    before = config.read_bytes()
    code, _, err = run(capsys, "draw", "--config", config, "-o", config, "--force")
    assert code == 1 and err == refused(config, config)
    code, _, err = run(capsys, "draw", "--config", config, "--rules", rules, "-o", rules, "--force")
    assert code == 1 and err == refused(rules, rules)
    code, _, err = run(capsys, "export", "--config", config, "--onnx", config, "--force")
    assert code == 1 and err == refused(config, config)
    assert config.read_bytes() == before and files(tmp_path) == ["m.yaml", "r.yaml"]


def test_the_draw_folder_is_not_created_before_the_inputs_are_validated(capsys, tmp_path, config):
    drawings = tmp_path / "new" / "drawings"
    code, _, err = run(capsys, "convert", tmp_path / "missing.pt", "-o", tmp_path / "out.pt", "--draw", drawings)
    assert code == 1 and "missing.pt" in err
    assert files(tmp_path) == ["m.yaml"]
    (tmp_path / "out.pt").write_bytes(b"keep")
    code, _, err = run(capsys, "convert", "--config", config, "-o", tmp_path / "out.pt", "--draw", drawings)
    assert code == 1 and "output already exists" in err
    assert files(tmp_path) == ["m.yaml", "out.pt"]
    bad_rules = tmp_path / "bad.yaml"
    bad_rules.write_text("rules: [{name: x}]\n")
    code, _, err = run(capsys, "convert", "--config", config, "--rules", bad_rules, "-o", tmp_path / "o.pt",
                       "--draw", drawings)
    assert code == 1 and str(bad_rules) in err
    assert files(tmp_path) == ["bad.yaml", "m.yaml", "out.pt"]


def test_a_draw_folder_that_is_a_file_is_refused(capsys, tmp_path, config):
    (tmp_path / "d").write_text("a file")
    code, out, err = run(capsys, "convert", "--config", config, "-o", tmp_path / "out.pt", "--draw", tmp_path / "d")
    assert (code, out) == (1, "")
    assert err == f"fxrewrite: error: --draw {tmp_path / 'd'}: exists and is not a folder\n"
    assert files(tmp_path) == ["d", "m.yaml"]


def test_a_new_draw_folder_is_made_and_written(capsys, tmp_path, config):
    drawings = tmp_path / "a" / "b"
    code, out, _ = run(capsys, "convert", "--config", config, "-o", tmp_path / "out.pt", "--draw", drawings)
    assert code == 0 and files(drawings) == ["after.svg", "before.svg", "diff.svg"]
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["head"][-1][2] == "DDetect"
