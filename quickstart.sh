#!/usr/bin/env bash
# Set up everything (Graphviz, a CPU build of torch, fxrewrite and its test extras), then run the
# main job on a built-in default: convert a yolov9-c training model built from its shipped config
# (seeded random weights, no download), verify it bitwise and draw the graphs.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
mkdir -p out
fxrewrite convert --config yolov9-c -o out/yolov9-c-converted.pt --verify --draw out/drawings --force
