#!/usr/bin/env bash
# The main job on a fresh machine: set up, make a small random-weight SD 1.x-architecture model
# (no model hub is reachable here), export it to an engine, and generate txt2img and img2img.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p out
[ -d out/model ] || python -m ldm_deploy.export.random_model --preset tiny-sd1 --out out/model
ldm-export --model out/model --out out/engine --force
ldm-run --engine out/engine "a photo of an astronaut riding a horse" --steps 30 --seed 7 --out out/astronaut.png
ldm-run --engine out/engine "a watercolor painting" --init-image out/astronaut.png --strength 0.6 --seed 7 --out out/watercolor.png
echo "demo: wrote out/astronaut.png and out/watercolor.png (random weights: expect colourful noise, not a horse)"
