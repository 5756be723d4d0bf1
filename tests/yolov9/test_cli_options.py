"""Every public option of convert, draw and export: checked up front, and with the effect it promises.

Numeric options are validated when the command line is parsed (exit status 2, one message
naming the option and its range); ``--imgsz`` is then checked against the model's largest
stride as soon as the model is loaded, before it is converted or exported.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers.yolo_cli import files, run, tiny_yaml, usage_error  # noqa: F401  (tiny_yaml: a fixture)
from fxrewrite.rule_file import shipped_rules_dir
from fxrewrite.yolov9 import DetectionModel, convert
from fxrewrite.yolov9.checkpoint import load_checkpoint
from fxrewrite.yolov9.cli import randomise_batchnorm

onnx = pytest.importorskip("onnx", reason="export needs the optional package onnx (fxrewrite[export])")
pytest.importorskip("onnxruntime", reason="export --verify needs onnxruntime (fxrewrite[export])")





# -- validated up front --------------------------------------------------------------------
@pytest.mark.parametrize("command", ["convert", "export"])
@pytest.mark.parametrize("values, message", [
    (["64", "64", "64"], "argument --imgsz: takes N or H W (1 or 2 numbers), got 3"),
    (["0"], "argument --imgsz: must be an integer from 1 to 4096, got 0"),
    (["-32"], "argument --imgsz: must be an integer from 1 to 4096, got -32"),
    (["64", "4128"], "argument --imgsz: must be an integer from 1 to 4096, got 4128"),
    (["6.4e1"], "argument --imgsz: must be an integer from 1 to 4096, got '6.4e1'"),
])
def test_imgsz_is_checked_when_the_command_line_is_parsed(capsys, tmp_path, command, values, message):
    out = ["-o", tmp_path / "x.pt"] if command == "convert" else ["--onnx", tmp_path / "x.onnx"]
    assert usage_error(capsys, command, "--config", "yolov9-t", *out, "--imgsz", *values) == \
        f"fxrewrite {command}: error: {message}"
    assert files(tmp_path) == []


@pytest.mark.parametrize("option, value, message", [
    ("--seed", str(10**23), "argument --seed: must be an integer from 0 to 18446744073709551615, got "
                            "100000000000000000000000"),
    ("--seed", "-1", "argument --seed: must be an integer from 0 to 18446744073709551615, got -1"),
    ("--nc", "0", "argument --nc: must be an integer from 1 to 65536, got 0"),
    ("--nc", "65537", "argument --nc: must be an integer from 1 to 65536, got 65537"),
    ("--nc", "ten", "argument --nc: must be an integer from 1 to 65536, got 'ten'"),
])
@pytest.mark.parametrize("command", ["convert", "export"])
def test_seed_and_nc_are_checked_when_the_command_line_is_parsed(capsys, tmp_path, command, option, value, message):
    out = ["-o", tmp_path / "x.pt"] if command == "convert" else ["--onnx", tmp_path / "x.onnx"]
    assert usage_error(capsys, command, "--config", "yolov9-t", *out, option, value) == \
        f"fxrewrite {command}: error: {message}"


@pytest.mark.parametrize("option, value, message", [
    ("--batch", "0", "argument --batch: must be an integer from 1 to 64, got 0"),
    ("--batch", "1025", "argument --batch: must be an integer from 1 to 64, got 1025"),  # main: killed, out of memory
    ("--opset", "10", "argument --opset: must be an integer from 11 to 20, got 10"),
    ("--opset", "21", "argument --opset: must be an integer from 11 to 20, got 21"),
])
def test_batch_and_opset_are_checked_when_the_command_line_is_parsed(capsys, tmp_path, option, value, message):
    assert usage_error(capsys, "export", "--config", "gelan-t", "--onnx", tmp_path / "x.onnx", option, value) == \
        f"fxrewrite export: error: {message}"


def test_the_example_batch_is_bounded_in_pixels(capsys, tmp_path):
    code, out, err = run(capsys, "export", "--config", "gelan-t", "--onnx", tmp_path / "x.onnx", "--batch", "2",
                         "--imgsz", "4096")
    assert (code, out) == (1, "") and files(tmp_path) == []
    assert err == ("fxrewrite: error: --batch 2 --imgsz 4096: 33,554,432 pixels per example batch, at most "
                   "26,214,400 (64 images of 640x640): give a smaller batch or image size\n")


def test_the_largest_seed_works(capsys, tiny_yaml):
    code, out, _ = run(capsys, "convert", "--config", tiny_yaml, "--dry-run", "--seed", str(2**64 - 1))
    assert code == 0 and out.startswith(f"source: random weights (seed {2**64 - 1}) built from config")


@pytest.mark.parametrize("command", ["convert", "export"])
def test_imgsz_must_fit_the_stride_before_the_conversion(capsys, tmp_path, command, tiny_yaml):
    out = ["-o", tmp_path / "x.pt"] if command == "convert" else ["--onnx", tmp_path / "x.onnx"]
    code, stdout, err = run(capsys, command, "--config", tiny_yaml, *out, "--imgsz", "64", "100")
    assert (code, stdout) == (1, "")  # nothing converted: the summary comes after the conversion
    assert err == ("fxrewrite: error: --imgsz 64 100: each side must be a multiple of the model's largest stride "
                   "(32), e.g. --imgsz 64 96\n")
    assert files(tmp_path) == []


def test_imgsz_of_a_checkpoint_is_checked_once_it_is_loaded(capsys, tmp_path, official_checkpoint):
    path = official_checkpoint("yolov9-t").path
    code, stdout, err = run(capsys, "convert", path, "-o", tmp_path / "x.pt", "--verify", "--imgsz", "48")
    assert (code, stdout) == (1, "")
    assert err == ("fxrewrite: error: --imgsz 48: each side must be a multiple of the model's largest stride (32), "
                   "e.g. --imgsz 64\n")


# -- convert -------------------------------------------------------------------------------
def test_convert_seed_and_nc_decide_the_random_weights(capsys, tmp_path, tiny_yaml):
    def converted(name, *options):
        code, out, _ = run(capsys, "convert", "--config", tiny_yaml, "-o", tmp_path / f"{name}.pt", "--fp32", *options)
        assert code == 0
        return load_checkpoint(tmp_path / f"{name}.pt", dtype=None).model, out

    one, out = converted("one", "--seed", "1")
    assert out.startswith(f"source: random weights (seed 1) built from config {tiny_yaml}")
    # exactly the model --config builds with that seed: the same builder, seeded, BatchNorms randomised
    torch.manual_seed(1)
    expected = DetectionModel(str(tiny_yaml))
    randomise_batchnorm(expected, 1, affine=True)
    reference = convert(expected.eval()).model.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in one.state_dict().items())
    torch.manual_seed(2)  # another seed: other weights everywhere
    two = DetectionModel(str(tiny_yaml))
    randomise_batchnorm(two, 2, affine=True)
    two = convert(two.eval()).model.state_dict()
    kernels = [k for k in one.state_dict() if k.endswith("conv.weight") and ".dfl." not in k]  # the DFL's is fixed
    assert len(kernels) > 50 and not any(torch.equal(one.state_dict()[k], two[k]) for k in kernels)
    five, _ = converted("five", "--seed", "1", "--nc", "5")
    assert five.model[-1].nc == 5 and five.yaml["nc"] == 5 and yaml.safe_load((tmp_path / "five.yaml").read_text())["nc"] == 5
    assert [seq[-1].out_channels for seq in five.model[-1].cv3] == [5, 5, 5]
    assert [seq[-1].out_channels for seq in one.model[-1].cv3] == [3, 3, 3]  # the config's nc
    # the class count only changes the head: every layer before it has the same weights
    assert all(torch.equal(t, one.state_dict()[k]) for k, t in five.state_dict().items()
               if not k.startswith(f"model.{len(five.model) - 1}."))


def test_convert_imgsz_is_the_verification_image(capsys, tiny_yaml):
    # (--imgsz H W: test_cli_convert.py)
    code, out, _ = run(capsys, "convert", "--config", tiny_yaml, "--dry-run", "--verify", "--imgsz", "96")
    assert code == 0 and "verify: 96x96 random image, converted vs training main output: PASS" in out


def test_convert_rules_decide_what_is_written(capsys, tmp_path, tiny_yaml):
    shipped = yaml.safe_load((shipped_rules_dir() / "yolov9.yaml").read_text())
    shipped["rules"] = [rule for rule in shipped["rules"] if rule["name"] != "collapse-silence"]
    keep_silence = tmp_path / "keep-silence.yaml"
    keep_silence.write_text(yaml.safe_dump(shipped))
    code, out, _ = run(capsys, "convert", "--config", tiny_yaml, "--rules", keep_silence, "-o", tmp_path / "s.pt")
    assert code == 0
    assert "rules applied (rewrites): dual-ddetect-to-ddetect (1), prune-auxiliary-branch (1)\n" in out
    derived = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert derived["backbone"][0] == [-1, 1, "Silence", []] and len(derived["backbone"] + derived["head"]) == 24
    model = load_checkpoint(tmp_path / "s.pt").model
    assert type(model.model[0]).__name__ == "Silence" and len(model.model) == 24
    assert json.loads((tmp_path / "s.params.json").read_text())["model.23.dfl.conv.weight"] == "model.26.dfl2.conv.weight"
    # the default rules collapse it
    code, out, _ = run(capsys, "convert", "--config", tiny_yaml, "-o", tmp_path / "d.pt")
    assert code == 0 and len(load_checkpoint(tmp_path / "d.pt").model.model) == 23


# -- draw --------------------------------------------------------------------------------------
def _statuses(dot: str) -> dict[str, int]:
    import re

    found: dict[str, int] = {}
    for status in re.findall(r"status-([a-z]+)", dot):
        found[status] = found.get(status, 0) + 1
    return found


def test_draw_views(capsys, tmp_path, tiny_yaml):
    dots = {}
    for view in ("overlay", "before", "after", "side-by-side"):
        path = tmp_path / f"{view}.dot"
        code, out, _ = run(capsys, "draw", "--config", tiny_yaml, "-o", path, *([f"--{view}"] if view != "overlay" else []))
        assert code == 0 and out.splitlines()[-1] == f"wrote {path}"
        dots[view] = path.read_text()
    for view, dot in dots.items():
        assert dot.startswith(f"digraph DetectionModel_{view.replace('-', '_')} {{")
    assert _statuses(dots["overlay"])["pruned"] == 3 and "model_24" in dots["overlay"]  # the auxiliary layers 23..25
    assert _statuses(dots["before"]) == _statuses(dots["overlay"])  # the original graph, marked
    assert "pruned" not in _statuses(dots["after"]) and "model_24" not in dots["after"]
    assert "cluster_before" in dots["side-by-side"] and "cluster_after" in dots["side-by-side"]
    assert "cluster_before" not in dots["overlay"] and "cluster_after" not in dots["after"]


def test_draw_ops_rules_and_param_table(capsys, tmp_path, tiny_yaml):
    code, _, _ = run(capsys, "draw", "--config", tiny_yaml, "-o", tmp_path / "layers.dot")
    layers = (tmp_path / "layers.dot").read_text()
    code, _, _ = run(capsys, "draw", "--config", tiny_yaml, "-o", tmp_path / "ops.dot", "--ops")
    ops = (tmp_path / "ops.dot").read_text()
    assert code == 0 and "op-call_function" in ops and "op-call_function" not in layers
    assert ops.count("fx-node") > 5 * layers.count("fx-node")
    no_prune = tmp_path / "heads-only.yaml"
    shipped = yaml.safe_load((shipped_rules_dir() / "yolov9.yaml").read_text())
    shipped["rules"] = [rule for rule in shipped["rules"] if rule["action"] == "replace"]
    no_prune.write_text(yaml.safe_dump(shipped))
    code, out, _ = run(capsys, "draw", "--config", tiny_yaml, "-o", tmp_path / "rules.dot", "--rules", no_prune)
    assert code == 0 and "prune-auxiliary-branch" not in out
    assert "pruned" not in _statuses((tmp_path / "rules.dot").read_text())  # nothing pruned by these rules
    assert "fx-param-box" not in layers
    code, _, _ = run(capsys, "draw", "--config", tiny_yaml, "-o", tmp_path / "table.dot", "--param-table")
    table = (tmp_path / "table.dot").read_text()
    assert code == 0 and "fx-param-box" in table and "parameter map (937 tensors)" in table  # the converted model's
    assert "model.3.cv1.conv.*" in table


def test_draw_a_checkpoint_as_png(capsys, tmp_path, official_checkpoint):
    path = official_checkpoint("yolov9-t").path
    code, out, err = run(capsys, "draw", path, "-o", tmp_path / "g.png", "--after")
    assert (code, err) == (0, "")
    assert out.startswith(f"source: {path}: 'ema' weights (float16, epoch 3)")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files(tmp_path) == ["g.png"]


# -- export ------------------------------------------------------------------------------------
def test_export_a_checkpoint_the_official_code_wrote(capsys, tmp_path, official_checkpoint):
    checkpoint = official_checkpoint("yolov9-t")
    out = tmp_path / "t.onnx"
    code, stdout, err = run(capsys, "export", checkpoint.path, "--onnx", out, "--imgsz", "64", "96", "--verify")
    assert (code, err) == (0, "")
    assert "converted: DualDDetect -> DDetect, 30 -> 23 layers, parameters 3,717,680 -> 2,442,640" in stdout
    assert "converted vs training main output: PASS" in stdout and "ONNX Runtime vs PyTorch: PASS" in stdout
    from fxrewrite.yolov9.export import run_onnx

    (y,) = run_onnx(out, checkpoint.image)  # the official model's main prediction, within the fp32 export tolerance
    torch.testing.assert_close(y, checkpoint.expected, atol=1e-4, rtol=1e-5)


def test_export_half_opset_and_batch(capsys, tmp_path):
    out = tmp_path / "h.onnx"
    code, stdout, err = run(capsys, "export", "--config", "gelan-t", "--onnx", out, "--imgsz", "64", "--half",
                            "--opset", "13", "--batch", "2", "--verify")
    assert (code, err) == (0, "")
    assert "verify: 64x64 random image, batch 2, fp16, ONNX Runtime vs PyTorch: PASS" in stdout
    proto = onnx.load(out)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    image = proto.graph.input[0].type.tensor_type
    assert image.elem_type == onnx.TensorProto.FLOAT16
    assert [d.dim_value for d in image.shape.dim] == [2, 3, 64, 64]
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [2, 84, 8 * 8 + 4 * 4 + 2 * 2]
    weights = [t for t in proto.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


def test_export_dynamic_and_force(capsys, tmp_path):
    out = tmp_path / "d.onnx"
    out.write_bytes(b"an older export")
    code, _, err = run(capsys, "export", "--config", "gelan-t", "--onnx", out, "--imgsz", "64", "--dynamic")
    assert code == 1 and "output already exists" in err and out.read_bytes() == b"an older export"
    code, _, err = run(capsys, "export", "--config", "gelan-t", "--onnx", out, "--imgsz", "64", "--dynamic", "--force")
    assert (code, err) == (0, "")
    image = onnx.load(out).graph.input[0].type.tensor_type
    assert [d.dim_param or d.dim_value for d in image.shape.dim] == ["batch", 3, "height", "width"]
    from fxrewrite.yolov9.export import run_onnx

    (y,) = run_onnx(out, torch.rand(3, 3, 96, 128))  # another batch and size than it was traced with
    assert tuple(y.shape) == (3, 84, 12 * 16 + 6 * 8 + 3 * 4)
    assert files(tmp_path) == ["d.onnx"]


def test_export_pt2(capsys, tmp_path):
    out = tmp_path / "m.pt2"
    code, stdout, err = run(capsys, "export", "--config", "gelan-t", "--pt2", out, "--imgsz", "64", "--seed", "3",
                            "--verify")
    assert (code, err) == (0, "") and files(tmp_path) == ["m.pt2"]
    assert ("verify: 64x64 random image, fp32, loaded ExportedProgram vs PyTorch: PASS: 1 output tensor(s), max abs "
            "diff 0, max rel diff 0 (required: |diff| <= 0.0001 + 1e-05 * |expected|)") in stdout
    program = torch.export.load(out)
    torch.manual_seed(3)
    model = DetectionModel("gelan-t")
    randomise_batchnorm(model, 3, affine=True)
    x = torch.rand(1, 3, 64, 64)
    from fxrewrite.yolov9.export import export_mode

    with export_mode(model.eval()), torch.no_grad():
        assert torch.equal(program.module()(x), model(x))


def test_export_a_segmentation_model_has_two_outputs(capsys, tmp_path):
    out = tmp_path / "s.onnx"
    code, stdout, err = run(capsys, "export", "--config", "gelan-c-dseg", "--nc", "3", "--onnx", out, "--imgsz", "64",
                            "--verify")
    assert (code, err) == (0, "")
    assert "ONNX Runtime vs PyTorch: PASS: 2 output tensor(s)" in stdout  # both outputs compared
    proto = onnx.load(out)
    assert [o.name for o in proto.graph.output] == ["output0", "output1"]
    shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output]
    assert shapes == [[1, 4 + 3 + 32, 8 * 8 + 4 * 4 + 2 * 2], [1, 32, 16, 16]]
