#!/usr/bin/env bash
# Set up everything (torch CPU build, Graphviz, fxrewrite and its test extras), then run the main job.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
fxrewrite demo
