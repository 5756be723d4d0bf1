"""Smoke test for the official-code oracle (tests/helpers/official.py)."""
import io
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.official import official, requires_official

pytestmark = requires_official


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "cfg, expected",
    [("yolov9-c.yaml", 51_182_080), ("gelan-c.yaml", 25_498_752)],
)
def test_official_parameter_counts(cfg, expected):
    model = official().build(cfg, nc=80)
    assert type(model).__module__ == "models.yolo"
    assert type(model).__name__ == "DetectionModel"
    assert _n_params(model) == expected


def test_official_classes_keep_official_module_names():
    off = official()
    assert off.common.Conv.__module__ == "models.common"
    assert off.common.RepNCSPELAN4.__module__ == "models.common"
    assert off.yolo.DualDDetect.__module__ == "models.yolo"
    assert sys.modules["models.common"] is off.common
    assert sys.modules["models.yolo"] is off.yolo
    # The wheel's own `yolo9.models...` spelling is the very same module, not a copy.
    assert sys.modules["yolo9.models.common"] is off.common


def test_official_import_leaves_no_stub_behind():
    official()
    for name in ("cv2", "torchvision", "pandas", "matplotlib", "seaborn", "IPython"):
        mod = sys.modules.get(name)
        assert mod is None or type(mod).__name__ != "_StubModule", name


def _pickle_globals(obj):
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=2)
    found = set()
    for op, arg, _ in pickletools.genops(buf.getvalue()):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return found


def test_official_model_pickles_under_official_names():
    model = official().build("gelan-c.yaml", nc=80)
    names = _pickle_globals(model)
    assert "models.yolo.DetectionModel" in names
    assert "models.common.RepNCSPELAN4" in names
    assert "models.yolo.DDetect" in names
    assert not any(n.startswith("yolo9.") for n in names)


def test_official_forward_runs():
    model = official().build("gelan-c.yaml", nc=80).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    pred = out[0] if isinstance(out, (list, tuple)) else out
    assert pred.shape == (1, 84, 4 * 4 + 8 * 8 + 2 * 2)


def test_official_coexists_with_a_foreign_top_level_models_module(tmp_path):
    # A test helper module named `models` may be imported when the whole suite runs;
    # the oracle must still work and must hand that name back afterwards.
    (tmp_path / "models.py").write_text("MARK = 'foreign'\n")
    script = tmp_path / "check.py"
    script.write_text(
        "import pickle, sys\n"
        f"sys.path[:0] = [{str(tmp_path)!r}, {str(Path(__file__).parents[1])!r}]\n"
        "import models\n"
        "from helpers.official import official\n"
        "off = official()\n"
        "assert sys.modules['models'] is models and models.MARK == 'foreign'\n"
        "conv = off.common.Conv(3, 8)\n"
        "data = pickle.dumps(conv, protocol=2)\n"
        "assert b'cmodels.common\\nConv\\n' in data\n"
        "assert type(pickle.loads(data)) is off.common.Conv\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
