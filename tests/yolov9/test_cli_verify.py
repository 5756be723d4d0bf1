"""``--verify`` can fail: a stated tolerance, PASS/FAIL, exit status 1, and nothing written on FAIL.

Every ``--verify`` (convert, convert --fuse, export --onnx / --pt2) runs before anything is
written; on FAIL the command exits 1 with the FAIL line and writes nothing, unless
``--keep-on-mismatch`` (then the outputs are written and the exit status is still 1).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers.yolo_cli import files, run, tiny_yaml  # noqa: F401  (tiny_yaml: a fixture)
from fxrewrite.verify import BITWISE
from fxrewrite.yolov9 import tolerances

pytest.importorskip("onnxruntime", reason="export --verify runs the model in onnxruntime (fxrewrite[export])")

# A user rule that changes the numbers (a different upsampling): the conversion is not bitwise.
BILINEAR = """\
rules:
  - name: bilinear-upsampling
    pattern: {module_class: Upsample, capture: up}
    action: replace
    args: {with: nn.Upsample, init: {scale_factor: 2.0, mode: bilinear}}
"""




@pytest.fixture
def bilinear(tmp_path) -> Path:
    rules = tmp_path / "rules" / "bilinear.yaml"
    rules.parent.mkdir()
    rules.write_text(BILINEAR)
    return rules


def test_convert_verify_fails_exits_1_and_writes_nothing(capsys, tmp_path, bilinear, tiny_yaml):
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run(capsys, "convert", "--config", tiny_yaml, "--rules", "yolov9", bilinear, "-o",
                            out / "gelan.pt", "--verify", "--imgsz", "64", "--draw", out / "drawings")
    assert code == 1
    line = next(line for line in stdout.splitlines() if "converted vs training main output" in line)
    fail = re.fullmatch(r"verify: 64x64 random image, converted vs training main output: FAIL: 1 output tensor\(s\), "
                        r"max abs diff (\S+), max rel diff (\S+) \(required: bitwise equal\)", line)
    assert fail and float(fail[1]) > 0 and float(fail[2]) > 0
    assert err == (f"fxrewrite: error: --verify failed: converted vs training main output: {line.split(': ', 2)[2]}; "
                   f"nothing written (--keep-on-mismatch writes the outputs anyway)\n")
    assert files(out) == []  # not even the --draw folder


def test_keep_on_mismatch_writes_the_outputs_and_still_exits_1(capsys, tmp_path, bilinear, tiny_yaml):
    code, stdout, err = run(capsys, "convert", "--config", tiny_yaml, "--rules", "yolov9", bilinear, "-o",
                            tmp_path / "gelan.pt", "--verify", "--imgsz", "64", "--keep-on-mismatch")
    assert code == 1 and "FAIL" in stdout
    assert err.startswith("fxrewrite: error: --verify failed: converted vs training main output: FAIL: ")
    assert err.endswith("; the outputs were written anyway (--keep-on-mismatch)\n")
    assert files(tmp_path) == ["gelan.params.json", "gelan.pt", "gelan.yaml", "rules"]


def test_a_passing_verify_says_pass_with_both_differences(capsys, tmp_path, tiny_yaml):
    code, stdout, err = run(capsys, "convert", "--config", tiny_yaml, "-o", tmp_path / "g.pt", "--verify",
                            "--imgsz", "64", "--fuse")
    assert (code, err) == (0, "")
    lines = [line for line in stdout.splitlines() if line.startswith("verify: 64x64")]
    assert lines[0].endswith(": PASS: 1 output tensor(s), max abs diff 0, max rel diff 0 (required: bitwise equal)")
    fused = re.fullmatch(r"verify: 64x64 random image, fused vs converted: PASS: 4 output tensor\(s\), max abs diff "
                         r"(\S+), max rel diff (\S+) \(required: \|diff\| <= 0.0001 \+ 1e-05 \* \|expected\|\)",
                         lines[1])
    assert fused and 0 < float(fused[1]) < 1e-3  # fp32 rounding of the fold, not an error


def test_fuse_verify_fails_against_a_tolerance_it_does_not_meet(capsys, tmp_path, monkeypatch, tiny_yaml):
    # The fused model differs from the unfused one by float32 rounding: held to bitwise, it must FAIL.
    monkeypatch.setitem(tolerances.FUSION, torch.float32, BITWISE)
    code, stdout, err = run(capsys, "convert", "--config", tiny_yaml, "-o", tmp_path / "g.pt", "--verify",
                            "--imgsz", "64", "--fuse")
    assert code == 1
    assert "converted vs training main output: PASS" in stdout  # the conversion itself is bitwise
    assert re.search(r"fused vs converted: FAIL: 4 output tensor\(s\), max abs diff \S+, max rel diff \S+ "
                     r"\(required: bitwise equal\)", stdout)
    assert err.startswith("fxrewrite: error: --verify failed: fused vs converted: FAIL: ")
    assert files(tmp_path) == []


def test_export_verify_fails_against_a_tolerance_it_does_not_meet(capsys, tmp_path, monkeypatch):
    # ONNX Runtime differs from PyTorch by float32 rounding: held to bitwise, the export must FAIL.
    # (That nothing is written on FAIL: test_export_verify_fails_on_a_nan_in_one_output.)
    monkeypatch.setitem(tolerances.EXPORT, torch.float32, BITWISE)
    code, stdout, err = run(capsys, "export", "--config", "gelan-t", "--onnx", tmp_path / "m.onnx", "--imgsz", "64",
                            "--verify", "--keep-on-mismatch")
    assert code == 1
    assert re.search(r"verify: 64x64 random image, fp32, ONNX Runtime vs PyTorch: FAIL: 1 output tensor\(s\), "
                     r"max abs diff \S+, max rel diff \S+ \(required: bitwise equal\)", stdout)
    assert err.startswith("fxrewrite: error: --verify failed: ONNX Runtime vs PyTorch: FAIL")
    assert err.endswith("the outputs were written anyway (--keep-on-mismatch)\n") and files(tmp_path) == ["m.onnx"]


def test_export_verify_fails_on_a_nan_in_one_output(capsys, tmp_path, monkeypatch):
    from fxrewrite.yolov9 import export

    real = export.run_onnx

    def nan_at_one_position(model, x, **kw):
        outputs = real(model, x, **kw)
        outputs[0][0, 0, 0] = float("nan")
        return outputs

    monkeypatch.setattr(export, "run_onnx", nan_at_one_position)
    code, stdout, err = run(capsys, "export", "--config", "gelan-t", "--onnx", tmp_path / "m.onnx", "--imgsz", "64",
                            "--verify")
    assert code == 1 and files(tmp_path) == []
    assert stdout.count("; 1 NaN/Inf value(s) (only NaN in both outputs at the same positions is accepted)") == 1
    assert "ONNX Runtime vs PyTorch: FAIL" in stdout
