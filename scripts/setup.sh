#!/usr/bin/env bash
# Creates .venv with everything the project, its export extra and its tests need.
# The CPU build of PyTorch goes in first: a bare `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e ".[export,test]" 2>&1 | grep -v "^WARNING: Location" || true
# The tests' oracle for DPM++ 2S a, which diffusers lacks: k-diffusion's sampling.py (tests/conftest.py
# loads it alone). Without its dependencies: they include torchvision, whose PyPI builds pin a CUDA torch.
pip install -q --no-deps "k-diffusion==0.1.1.post1" "torchdiffeq==0.2.5" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, diffusers, onnxruntime, ldm_deploy; print('setup: torch', torch.__version__, '| diffusers', diffusers.__version__, '| onnxruntime', onnxruntime.__version__)"
