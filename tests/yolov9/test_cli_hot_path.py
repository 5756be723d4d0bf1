"""``fxrewrite convert`` as users run it most: a checkpoint in, the inference checkpoint out.

The command keeps the weights in their stored precision when it only rearranges and writes them
(fp16 -> fp32 -> fp16 is exact), and imports only what it uses; these tests pin that the outputs
are exactly those of the fp32 path (which ``--verify`` takes), in the official layout, and what a
whole ``fxrewrite`` process imports.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.yolo_cli import run

#: Never needed to convert a checkpoint: torch's compiler stack and symbolic shapes (seconds to import),
#: the exporters, drawing and optional formats.
NOT_FOR_CONVERT = ("sympy", "torch._dynamo", "torch._inductor", "torch.onnx", "onnx", "onnxruntime", "onnxscript",
                   "safetensors", "networkx", "graphviz", "fxrewrite.draw")


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name.split(".", 1)[1]: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.requires_official
def test_stored_precision_writes_exactly_what_the_fp32_path_writes(capsys, tmp_path, official_checkpoint):
    ckpt = official_checkpoint("yolov9-t")
    (tmp_path / "fast").mkdir()
    (tmp_path / "fp32").mkdir()
    code, out, _ = run(capsys, "convert", ckpt.path, "-o", tmp_path / "fast" / "t.pt")
    assert code == 0 and "(float16, epoch" in out
    # (not --verify: running the model on its image leaves that image's anchors in the head's cache)
    # --safetensors writes the model's dtype: the command converts to fp32 first, as it always did
    code, out, _ = run(capsys, "convert", ckpt.path, "-o", tmp_path / "fp32" / "t.pt", "--safetensors")
    assert code == 0
    fast, fp32 = _outputs(tmp_path / "fast"), _outputs(tmp_path / "fp32")
    assert sorted(fast) == ["params.json", "pt", "yaml"] and fp32.pop("safetensors")
    assert fast == fp32  # byte for byte: the same tensors, the same pickle

    from helpers.official import official

    official()
    model = torch.load(tmp_path / "fast" / "t.pt", map_location="cpu", weights_only=False)["model"]
    head = model.model[-1]
    # the official layout: half() converts the head's strides, the model's own stays fp32
    assert (model.stride.dtype, head.stride.dtype, model.stride is head.stride) == (torch.float32, torch.float16, False)
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.float16}


def _modules_after(*argv: str) -> set[str]:
    """The modules a fresh ``fxrewrite ARGV`` process has imported when it is done."""
    code = ("import json, sys\n"
            "from fxrewrite.cli import main\n"
            f"status = main({list(argv)!r})\n"
            "print(json.dumps([status, sorted(sys.modules)]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    status, modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == 0, done.stderr
    return set(modules)


def _imported(modules: set[str], names) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.requires_official
def test_convert_imports_only_what_it_uses(tmp_path, official_checkpoint):
    modules = _modules_after("convert", str(official_checkpoint("yolov9-t").path), "-o", str(tmp_path / "t.pt"))
    assert (tmp_path / "t.pt").is_file()
    assert _imported(modules, NOT_FOR_CONVERT) == []
    assert "fxrewrite.yolov9.convert" in modules  # the check sees the plug-in's code


def test_core_commands_import_no_plug_in(tmp_path):
    modules = _modules_after("demo")
    assert "fxrewrite.yolov9" not in modules and _imported(modules, ("sympy", "torch._dynamo")) == []


def test_rules_lists_what_the_plug_ins_register(capsys):
    """``rules`` loads every plug-in itself (no longer as a side effect of building the parser)."""
    code, out, _ = run(capsys, "rules")
    actions = next(line for line in out.splitlines() if line.startswith("actions:"))
    assert code == 0 and {"fuse_repconv", "measure_strides", "replace"} <= set(actions[len("actions: "):].split(", "))


def test_only_the_running_command_is_added(monkeypatch):
    from fxrewrite import cli

    def commands(parser):
        (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        return set(sub.choices)

    everything = commands(cli.build_parser())
    assert {"demo", "rules", "convert", "draw", "export"} <= everything
    assert commands(cli.build_parser("convert")) == everything - {"draw", "export"}
    assert commands(cli.build_parser("demo")) == everything - {"convert", "draw", "export"}
    assert commands(cli.build_parser("no-such-command")) == everything  # argparse's error lists every choice
