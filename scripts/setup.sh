#!/usr/bin/env bash
# Install everything fxrewrite and its tests need on a fresh machine (Debian, Python 3.11, root or sudo).
# Idempotent: what is already there is not installed again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! command -v dot >/dev/null 2>&1; then
    echo "[setup] installing Graphviz (dot)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq graphviz >/dev/null
fi

# A CPU build of torch, pinned: an unpinned "torch" may pull a multi-GB CUDA build.
if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    echo "[setup] installing torch 2.13.0 (CPU)"
    $PY -m pip install -q torch==2.13.0
fi

echo "[setup] installing fxrewrite with its test extras"
$PY -m pip install -q -e ".[test]"
# An editable install leaves fxrewrite's modules uncompiled (pip compiles a regular install), and
# where PYTHONDONTWRITEBYTECODE is set Python never caches them: every command would compile them
# from source again (~0.07 s of each `fxrewrite convert`). Stale files are recompiled in memory.
$PY -m compileall -q fxrewrite

# The official YOLOv9 code, used by the tests only as a reference ("oracle"): its declared
# dependencies (opencv, torchvision, pandas...) are not needed to build and run its models.
if ! $PY -m pip show -q yolo9 >/dev/null 2>&1; then
    echo "[setup] installing the official YOLOv9 code as a test oracle (yolo9==1.0.18, no deps)"
    $PY -m pip install -q --no-deps yolo9==1.0.18
fi
# What the official model files import when they load (the heavy rest is stubbed by tests/helpers/official.py).
$PY -m pip install -q numpy packaging requests pillow tqdm psutil
echo "[setup] done"
