#!/usr/bin/env bash
# The main job on a fresh machine: set up, then draw with the bundled shapes model. The first
# `ldm-run` exports the model's engine into ~/.cache/ldm-deploy (seconds, once); later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p out
cd out
ldm-run "a red circle on a blue background"
echo "demo: wrote out/$(ls -t -- *.png | head -n 1)"  # (output.png, then output-2.png, ... as ldm-run numbers them)
