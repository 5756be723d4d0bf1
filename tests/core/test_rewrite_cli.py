"""``fxrewrite rewrite MODULE_SPEC``: rule files on any model, through the command line users run.

Oracles: ``torch.fx.experimental.optimization.fuse`` and the model itself, on the file the
command wrote (read back with ``torch.load``)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fxrewrite.cli import main
from helpers.graphviz import needs_dot

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.blocks = nn.Sequential(Block(8), Block(8))
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.blocks(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


    def net():
        torch.manual_seed(0)
        model = Net()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        return model


    def broken():
        raise RuntimeError("no weights here")
''')

GELU = "rules:\n  - {name: gelu, pattern: {module_class: ReLU}, action: replace, args: {with: nn.GELU}}\n"


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("mymodels", None)


def reference():
    namespace: dict = {}
    exec(MODELS, namespace)
    return namespace["net"]().eval()


def test_fuse_conv_bn_on_a_user_module_matches_torch_fx(models, capsys):
    from torch.fx.experimental.optimization import fuse

    assert main(["rewrite", "mymodels:net", "--rules", "fuse-conv-bn", "-o", "fused.pt",
                 "--example-input", "2,3,16,16", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "fold-Conv2d-BatchNorm2d (fold_batchnorm): 5 matched, 5 rewritten" in out
    assert "verify: PASS: 1 output tensor(s)" in out and out.endswith("wrote fused.pt\n")
    saved = torch.load(models / "fused.pt", weights_only=False)
    model, x = reference(), torch.randn(2, 3, 16, 16)
    theirs = fuse(model).state_dict()
    ours = saved["module"].state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saved["module"](x), model(x), rtol=1e-5, atol=1e-5)
    assert saved["param_map"]["stem.bias"] == ("stem.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                               "bn.running_var")
    assert saved["param_map"]["fc.weight"] == "fc.weight"


def test_state_dict_output_loads_without_running_code(models, capsys):
    assert main(["rewrite", str(models / "mymodels.py") + ":net", "--rules", "fuse-conv-bn", "-o", "sd.pt",
                 "--state-dict"]) == 0
    saved = torch.load(models / "sd.pt", weights_only=True)
    assert sorted(saved) == ["param_map", "state_dict"]
    assert sorted(saved["state_dict"]) == sorted(saved["param_map"])
    assert not any(".bn" in k or k.startswith("bn.") for k in saved["state_dict"])


def test_verify_mismatch_exits_1_and_writes_nothing(models, capsys):
    (models / "gelu.yaml").write_text(GELU)
    assert main(["rewrite", "mymodels:net", "--rules", "gelu.yaml", "-o", "out.pt", "--example-input", "1,3,8,8",
                 "--verify"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fxrewrite: error: --verify failed: FAIL: 1 output tensor(s), max abs diff ")
    assert err.endswith("(required: bitwise equal); nothing was written\n")
    assert not (models / "out.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["nocolon"], "nocolon: expected package.module:factory or path/to/file.py:factory"),
    (["mymodels:missing"], "mymodels:missing: mymodels has no attribute 'missing'"),
    (["mymodels:broken"], "mymodels:broken: calling broken() failed: RuntimeError: no weights here"),
    (["nosuchpkg.mod:net"], "nosuchpkg.mod:net: cannot import nosuchpkg.mod: ModuleNotFoundError: "
                            "No module named 'nosuchpkg'"),
    (["mymodels:net", "--example-input", "1,x"], "--example-input '1,x': expected positive dimensions such as "
                                                 "1,3,224,224 (at most 268,435,456 values)"),
    (["mymodels:net", "--verify"], "--verify needs --example-input (the inputs both models run on)"),
])
def test_bad_arguments_are_one_line_errors(models, capsys, argv, message):
    spec, *rest = argv
    assert main(["rewrite", spec, "--rules", "fuse-conv-bn", "-o", "out.pt", *rest]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"fxrewrite: error: {message}\n"
    assert not (models / "out.pt").exists()


def test_the_output_is_never_an_input(models, capsys):
    (models / "gelu.yaml").write_text(GELU)
    before = (models / "mymodels.py").read_bytes()
    for target, given in (("mymodels.py", models / "mymodels.py"), ("gelu.yaml", "gelu.yaml")):
        assert main(["rewrite", "mymodels:net", "--rules", "gelu.yaml", "-o", target, "--force"]) == 1
        assert capsys.readouterr().err == (f"fxrewrite: error: {target}: output is the same file as the input "
                                           f"{given}; refusing to overwrite an input\n")
    assert (models / "mymodels.py").read_bytes() == before and (models / "gelu.yaml").read_text() == GELU


@needs_dot
def test_entry_point_with_drawings(models):
    env = dict(os.environ, PYTHONPATH=str(models))
    done = subprocess.run([sys.executable, "-m", "fxrewrite.cli", "rewrite", "mymodels:net", "--rules", "fuse-conv-bn",
                           "-o", "out.pt", "--example-input", "1,3,8,8", "--draw", "pictures"],
                          cwd=models, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (models / "pictures").iterdir()) == ["after.svg", "before.svg", "diff.svg"]
    assert (models / "pictures" / "after.svg").read_text().startswith("<?xml")


@needs_dot
def test_the_model_and_its_drawings_are_written_all_or_nothing(models, capsys, monkeypatch):
    def disk_full(obj, handle):
        handle.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    code = main(["rewrite", "mymodels:net", "--rules", "fuse-conv-bn", "-o", "out.pt", "--example-input", "1,3,8,8",
                 "--draw", "pictures"])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in models.iterdir()) == ["mymodels.py"]  # no model, no drawings, no folder
    monkeypatch.undo()
    monkeypatch.chdir(models)
    assert main(["rewrite", "mymodels:net", "--rules", "fuse-conv-bn", "-o", "out.pt", "--example-input", "1,3,8,8",
                 "--draw", "pictures"]) == 0
    assert capsys.readouterr().out.endswith("wrote out.pt, pictures/before.svg, pictures/after.svg, pictures/diff.svg\n")
    assert sorted(p.name for p in (models / "pictures").iterdir()) == ["after.svg", "before.svg", "diff.svg"]
