"""Helpers shared by the CLI tests: running a command in-process, listing a folder, a small PGI config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fxrewrite.cli import main

# A small PGI model (Silence, auxiliary branch, DualDDetect): a few seconds to build and convert. The
# hidden widths of the ELAN blocks are given small (the builder scales only a block's output channels).
TINY = {
    "nc": 3, "depth_multiple": 0.33, "width_multiple": 0.25,
    "backbone": [
        [-1, 1, "Silence", []],
        [-1, 1, "Conv", [64, 3, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 1, "RepNCSPELAN4", [256, 32, 16, 1]],
        [-1, 1, "ADown", [256]],
        [-1, 1, "RepNCSPELAN4", [256, 64, 32, 1]],  # 5 P3
        [-1, 1, "ADown", [512]],
        [-1, 1, "RepNCSPELAN4", [512, 128, 64, 1]],  # 7 P4
        [-1, 1, "ADown", [512]],
        [-1, 1, "RepNCSPELAN4", [512, 128, 64, 1]],  # 9 P5
    ],
    "head": [
        [-1, 1, "SPPELAN", [512, 64]],  # 10
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 7], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [512, 128, 64, 1]],  # 13
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 5], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [256, 64, 32, 1]],  # 16
        [-1, 1, "ADown", [256]],
        [[-1, 13], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [512, 128, 64, 1]],  # 19
        [-1, 1, "ADown", [512]],
        [[-1, 10], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [512, 128, 64, 1]],  # 22
        [5, 1, "RepNCSPELAN4", [256, 64, 32, 1]],  # 23 aux
        [7, 1, "RepNCSPELAN4", [512, 128, 64, 1]],  # 24 aux
        [9, 1, "RepNCSPELAN4", [512, 128, 64, 1]],  # 25 aux
        [[23, 24, 25, 16, 19, 22], 1, "DualDDetect", ["nc"]],
    ],
}


def run(capsys, *args) -> tuple[int, str, str]:
    """``fxrewrite ARGS`` in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, *args) -> str:
    """The last line of the usage error (exit status 2) ``fxrewrite ARGS`` prints; nothing on stdout."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err.strip().splitlines()[-1]


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    """:data:`TINY` as a config file."""
    path = tmp_path_factory.mktemp("cfg") / "tiny-pgi.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return path
