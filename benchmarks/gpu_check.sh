#!/usr/bin/env bash
# GPU figures in one prepared run (about 8 minutes on one H200): the full Qwen3-VL-2B architecture
# (random weights, bf16, CUDA) through eqakit's three hot paths, each against the reference way.
#   1. LoRA training steps: eqakit (vision cache + shared-prefix packing) vs plain transformers;
#   2. predict on 2 OpenEQA-shaped episodes: HF generate at batch 2 vs eqakit's engine (KV budget);
#   3. the API at 8 concurrent clients: eqakit api vs an HF-generate server.
# Never a dependency of anything: run it when a GPU machine is at hand and record what it prints
# in docs/benchmarks.md. Wheels the machine lacks travel in .whl (benchmarks/gpu_wheels.sh).
#
#   device run: bash benchmarks/gpu_check.sh        (carry: .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    --no-build-isolation .whl/*.whl .whl/*.tar.gz && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
CONFIG=benchmarks/configs/qwen3-vl-2b-instruct.config.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
log=${OUT:-/tmp}/gpu_check.log
{
  echo "== 1. training (full depth, bf16) =="
  timeout 200 python3 benchmarks/bench_train.py --scale 1 --episodes 2 --bf16
  echo "== 2. predict (full depth, bf16, 2 episodes x 8 questions) =="
  timeout 160 python3 benchmarks/bench_predict.py --config "$CONFIG" --dtype bfloat16 --device cuda \
    --episodes 2 --questions 8 --max-new-tokens 32 --engine-batch-size 16
  echo "== 3. API (full depth, bf16, 8 clients) =="
  timeout 120 python3 benchmarks/bench_api.py --config "$CONFIG" --dtype bfloat16 --device cuda \
    --clients 8 --episodes 2 --questions 8
} 2>&1 | grep --line-buffered -v -i "warning\|Loading weights\|Writing model" | tee "$log"
