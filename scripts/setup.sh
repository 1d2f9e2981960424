#!/usr/bin/env bash
# Creates .venv with everything the project, its export extra and its tests need.
# The CPU build of PyTorch goes in first: a bare `torch` requirement would pull a CUDA build. Where
# PyTorch's CPU index answers, it is asked too (its 2.13.0+cpu outranks PyPI's CUDA 2.13.0); machines
# without it (ours and CI's) have the CPU build in their configured wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate

quiet_pip() {  # pip without the venv-location warnings; a failing pip fails the script (pipefail)
  pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

cpu_index=()
if python -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=3)" \
    >/dev/null 2>&1; then
  cpu_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
quiet_pip install -q --upgrade pip
quiet_pip install -q ${cpu_index[@]+"${cpu_index[@]}"} "torch==2.13.0"
quiet_pip install -q -e ".[export,test]"
# The tests' oracle for DPM++ 2S a, which diffusers lacks: k-diffusion's sampling.py (tests/conftest.py
# loads it alone). Without its dependencies: they include torchvision, whose PyPI builds pin a CUDA torch.
quiet_pip install -q --no-deps "k-diffusion==0.1.1.post1" "torchdiffeq==0.2.5"
python -c "import torch, diffusers, onnxruntime, ldm_deploy; print('setup: torch', torch.__version__, '| diffusers', diffusers.__version__, '| onnxruntime', onnxruntime.__version__)"
