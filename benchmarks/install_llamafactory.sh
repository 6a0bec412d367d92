#!/usr/bin/env bash
# Install LLaMA-Factory 0.9.5 into a virtual environment of its own, beside eqakit, so that the
# benchmarks can run the tool users would otherwise pick on the same YAML and data (never a test
# dependency: only benchmarks/ call it).
#
#   benchmarks/install_llamafactory.sh VENV [PYTHON]      (the benchmarks call it with .venv-lf)
#
# Same torch as eqakit (2.14.1 / torchvision 0.29.1). LLaMA-Factory requires torchaudio, which has
# no build for torch 2.14; audio is unused here, so a stand-in module takes its place (LLaMA-Factory
# imports it at start-up only). Its other requirements install as it pins them (transformers <= 5.6).
set -euo pipefail
VENV=${1:?usage: install_llamafactory.sh VENV [PYTHON]}
PYTHON=${2:-python3}
LF="llamafactory==0.9.5"

"$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
"$py" -m pip install --quiet --upgrade pip packaging
"$py" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$py" -m pip install --quiet --no-deps "$LF"
"$py" - > "$VENV/lf-requirements.txt" <<'PY'
from importlib.metadata import requires

from packaging.requirements import Requirement

for line in requires("llamafactory") or []:
    req = Requirement(line)
    if req.name in {"torch", "torchvision", "torchaudio"}:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
"$py" -m pip install --quiet -r "$VENV/lf-requirements.txt" "torch==2.14.1" "torchvision==0.29.1"
# its "metrics" extra: predict_with_generate scores BLEU/ROUGE with them
"$py" -m pip install --quiet jieba nltk rouge-chinese
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$site/torchaudio"
cat > "$site/torchaudio/__init__.py" <<'PY'
"""Stand-in for torchaudio (no build for torch 2.14): LLaMA-Factory imports it; audio is unused."""

__version__ = "0.0.0+stand-in"


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: this is a stand-in without audio support")
PY
"$VENV/bin/llamafactory-cli" version >/dev/null
touch "$VENV/.installed"
