"""``fxrewrite export``: ONNX (and torch.export) of converted / fused YOLOv9 models."""
from __future__ import annotations

import collections
import functools
import re
import sys

import pytest
import torch

from helpers.yolo_deploy import assert_close_fp32, converted, fused, image, predictions, training
from fxrewrite.cli import main
from fxrewrite.yolov9.export import ExportError, export_mode, export_onnx, export_pt2, run_onnx

onnx = pytest.importorskip("onnx", reason="ONNX export needs the optional package onnx (fxrewrite[export])")
pytest.importorskip("onnxruntime", reason="these tests run the exports in onnxruntime (fxrewrite[export])")


@functools.lru_cache(maxsize=None)
def _exported(which: str, folder: str) -> str:
    model = {"converted": lambda: converted().model, "fused": lambda: fused().model,
             "training": lambda: training()}[which]()
    return str(export_onnx(model, f"{folder}/{which}.onnx", imgsz=640))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("onnx"))


def _layers(path: str, op: str | None = None) -> collections.Counter:
    """Nodes per layer index, from the module path the exporter writes in node names (/model.N/...)."""
    found = collections.Counter()
    for node in onnx.load(path).graph.node:
        m = re.match(r"/model\.(\d+)/", node.name)
        if m and (op is None or node.op_type == op):
            found[int(m.group(1))] += 1
    return found


@pytest.mark.parametrize("which", ["converted", "fused"])
def test_onnx_runs_in_onnxruntime_like_the_converted_model(which, folder):
    path = _exported(which, folder)
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["output0"]
    x = image(640)
    (y,) = run_onnx(path, x)
    assert tuple(y.shape) == (1, 84, 8400)
    assert_close_fp32(y, predictions(converted().model, x))
    assert {p.key for p in proto.metadata_props} == {"stride", "names"}


@pytest.mark.parametrize("which", ["converted", "fused"])
def test_onnx_has_no_node_of_the_auxiliary_branch(which, folder):
    conversion = converted()
    ours, theirs = _layers(_exported(which, folder)), _layers(_exported("training", folder))
    head, training_head = len(conversion.model.model) - 1, len(conversion.source.model) - 1
    # The training export really has the auxiliary layers (so the check below means something) ...
    assert conversion.pruned == list(range(22, 29)) and all(theirs[i] > 0 for i in conversion.pruned)
    assert len(onnx.load(_exported("training", folder)).graph.output) == 2
    # ... and every node of ours belongs to a kept layer: layer k is training layer layer_map[k].
    assert set(ours) == set(conversion.layer_map)
    assert {conversion.layer_map[k] for k in ours}.isdisjoint(conversion.pruned)
    if which == "converted":  # the same computation, node for node (fusing merges RepConvN branches)
        for k, old in conversion.layer_map.items():
            if k != head:
                assert ours[k] == theirs[old], (k, old)
    # The head: the training head runs two branches (3 levels x 6 Conv + DFL each), ours the main one.
    our_convs = _layers(_exported(which, folder), "Conv")
    their_convs = _layers(_exported("training", folder), "Conv")
    assert 2 * our_convs[head] == their_convs[training_head] == 2 * (3 * 6 + 1)


def test_dynamic_onnx_runs_at_other_sizes_and_batches(tmp_path):
    path = export_onnx(fused().model, tmp_path / "dynamic.onnx", imgsz=320, dynamic=True)
    x = image(256, batch=2)[:, :, :, :192].contiguous()
    (y,) = run_onnx(path, x)
    assert tuple(y.shape) == (2, 84, (32 * 24 + 16 * 12 + 8 * 6))
    assert_close_fp32(y, predictions(converted().model, x))


def test_export_leaves_the_model_as_it_was(folder):
    model = fused().model
    _exported("fused", folder)
    head = model.model[-1]
    assert not head.export and not head.dynamic and "export" not in head.__dict__
    with torch.no_grad():
        out = model(image(64))
    assert isinstance(out, tuple)  # (predictions, raw maps): not the export form


def test_pt2_export_round_trips(tmp_path):
    model = fused().model
    path = export_pt2(model, tmp_path / "model.pt2", imgsz=320)
    program = torch.export.load(path)
    x = image(320)
    with torch.no_grad():
        got = program.module()(x)
    with export_mode(model), torch.no_grad():
        assert torch.equal(got, model(x))
    assert not isinstance(model.model[-1].anchors, torch._subclasses.FakeTensor)


def test_cli_export_from_a_training_config(tmp_path, capsys):
    out = tmp_path / "gelan-t.onnx"
    assert main(["export", "--config", "yolov9-t", "--fuse", "--onnx", str(out), "--imgsz", "320", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "converted: DualDDetect -> DDetect" in text and "parameters 2,442,640 -> 2,407,632" in text
    verified = [line for line in text.splitlines() if line.startswith("verify: 320x320 random image")]
    assert [line.split(": ")[1] for line in verified] == [
        "320x320 random image, converted vs training main output", "320x320 random image, fused vs unfused",
        "320x320 random image, fp32, ONNX Runtime vs PyTorch"]
    assert all(": PASS: " in line for line in verified)
    assert verified[0].endswith("(required: bitwise equal)")
    assert verified[2].endswith("(required: |diff| <= 0.0001 + 1e-05 * |expected|)")
    assert [p.name for p in tmp_path.iterdir()] == ["gelan-t.onnx"]  # no temporary file left behind
    assert main(["export", "--config", "yolov9-t", "--onnx", str(out)]) == 1  # exists: refused
    assert "already exists" in capsys.readouterr().err


def test_cli_export_needs_an_output_and_onnx(tmp_path, capsys, monkeypatch):
    assert main(["export", "--config", "gelan-t"]) == 1
    assert "--onnx OUT.onnx and/or --pt2" in capsys.readouterr().err
    with pytest.raises(ExportError, match="multiples of the model's largest stride"):
        export_onnx(fused().model, tmp_path / "x.onnx", imgsz=100)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    assert main(["export", "--config", "gelan-t", "--onnx", str(tmp_path / "x.onnx")]) == 1
    assert "needs the optional package 'onnx' (pip install 'fxrewrite[export]')" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
