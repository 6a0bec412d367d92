#!/usr/bin/env bash
# GPU figures and exactness in one prepared run of about 8 minutes (one H100 or H200), issue 24:
#   0. wheels from .whl (the machine reaches no network), then the preflight: stop at once, in one
#      line, on a missing package, a too-old version or no CUDA (benchmarks/gpu_preflight.py);
#   a. the exactness tests on CUDA (EQAKIT_TEST_DEVICE=cuda): the engine against model.generate
#      (tests/test_engine.py), the vision cache and shared-prefix packing against plain batches;
#   b. training at the tutorial's 2 x 8 on the full Qwen3-VL-2B architecture (random weights, saved in
#      bf16 as Qwen publishes it): seconds per optimizer step after warm-up, vision cache build time,
#      torch.cuda.max_memory_allocated beside `eqakit config --memory`'s estimate; in the tutorial's
#      dtype, in bf16, and with fa2 where flash-attn is installed (bench_train.py --steady);
#   c. predict at the tutorial's sampling (eval_args.yaml): decode tokens/s and syncs per decode
#      step (bench_predict.py --decode).
# One Markdown table at the end, also written to $OUT (gpu_check_table.md, with the log and rows).
# Never a dependency of anything: run it when a GPU machine is lent and record the table in
# docs/benchmarks.md ("GPU check").
#
#   bash benchmarks/gpu_wheels.sh                    here, once: the wheels into .whl
#   device run: bash benchmarks/gpu_check.sh         carry: .whl; timeout_s 560
#   bash benchmarks/gpu_check.sh --cpu               here: a dry run of every step on the tiny model
set -uo pipefail  # no -e: a part that fails is a row of the table, the next part still runs
cd "$(dirname "$0")/.."

DEVICE=cuda
[ "${1:-}" = "--cpu" ] && DEVICE=cpu
if [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
OUT_DIR=${OUT:-/tmp/gpu_check}  # $OUT comes back from a device call
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
ROWS=$OUT_DIR/gpu_check_rows.jsonl
TABLE=$OUT_DIR/gpu_check_table.md
: >"$LOG"
: >"$ROWS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src" TOKENIZERS_PARALLELISM=false
CONFIG=benchmarks/configs/qwen3-vl-2b-instruct.config.json
START=$SECONDS
CARRIED=()

say() { echo "== $* ($((SECONDS - START)) s)" | tee -a "$LOG"; }
row() { "$PY" benchmarks/gpu_table.py add "$ROWS" "$@"; }
# run LIMIT COMMAND...: the command under `timeout`, its output in the log; returns its status
run() {
  local limit=$1
  shift
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}
# why a part ended without its row: the timeout's status, else the exit status
ended() { [ "$1" = 124 ] || [ "$1" = 137 ] && echo "timed out after $2 s" || echo "exit status $1 (see gpu_check.log)"; }
table() {
  "$PY" benchmarks/gpu_table.py render "$ROWS" >"$TABLE"
  echo
  echo "GPU check, $((SECONDS - START)) s in all:"
  cat "$TABLE"
}

# ---- 0. wheels and preflight -----------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  if [ -d .whl ]; then
    # --target: the image's own packages stay as they are; PYTHONPATH puts the carried ones first
    say "installing $(ls .whl/*.whl | wc -l) carried wheels"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --disable-pip-version-check --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"; then
      row preflight "wheels from .whl" "pip install failed (see gpu_check.log)"
      table
      exit 1
    fi
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    CARRIED=(--carried /tmp/site)  # what these wheels require is checked as strictly as eqakit's needs
  fi
fi
say "preflight"
line=$(timeout 90 "$PY" benchmarks/gpu_preflight.py --device "$DEVICE" "${CARRIED[@]}" 2>&1 | tail -1)
echo "$line" | tee -a "$LOG"
if [[ "$line" != "preflight ok:"* ]]; then
  row preflight "$DEVICE" "${line:-no output (timed out?)}"
  table
  exit 1  # nothing below can run: stop at once
fi
row preflight "$DEVICE" "${line#preflight ok: }"

if [ "$DEVICE" = cuda ]; then
  TESTS_S=120 TRAIN_S=210 PREDICT_S=120
  TRAIN=(--steady 6 --warmup 2 --scale 1 --episodes 3)
  PREDICT=(--config "$CONFIG" --dtype bfloat16 --episodes 2 --questions 8 --max-new-tokens 128)
else  # the dry run: the same steps, tiny model, few steps
  TESTS_S=300 TRAIN_S=300 PREDICT_S=200
  TRAIN=(--steady 2 --warmup 1 --tiny --episodes 2)
  PREDICT=(--episodes 2 --questions 4 --max-new-tokens 16)
fi

# ---- a. exactness tests on the device --------------------------------------------------------------
say "a. exactness tests, EQAKIT_TEST_DEVICE=$DEVICE"
TESTS=(
  tests/test_engine.py
  tests/test_train_speed.py::test_vision_cache_gives_the_plain_loss
  tests/test_train_speed.py::test_shared_prefix_packing_gives_the_plain_loss
  tests/test_train_speed.py::test_packing_spans_the_optimizer_step_and_keeps_its_gradient
)
began=$SECONDS
EQAKIT_TEST_DEVICE=$DEVICE run "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
status=$?
summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)" "$LOG" | tail -1 | tr -d '=' | xargs)
[ "$status" = 0 ] || summary="${summary:+$summary; }$(ended "$status" "$TESTS_S")"
row tests "engine vs model.generate; vision cache and packing vs plain (tiny models, fp32, $DEVICE)" \
  "${summary:-no summary}" "seconds=$((SECONDS - began))"

# ---- b. training, the tutorial's YAML at steady state ----------------------------------------------
say "b. training: tutorial's training_args.yaml, 2 x 8, steady state"
before=$(wc -l <"$ROWS")
run "$TRAIN_S" "$PY" benchmarks/bench_train.py "${TRAIN[@]}" --device "$DEVICE" --rows "$ROWS"
status=$?
if [ "$status" != 0 ]; then
  row train "the rows not reached ($(($(wc -l <"$ROWS") - before)) written)" "$(ended "$status" "$TRAIN_S")"
fi

# ---- c. predict at the tutorial's sampling ---------------------------------------------------------
say "c. predict: tutorial's eval_args.yaml sampling, decode rate and syncs"
run "$PREDICT_S" "$PY" benchmarks/bench_predict.py --decode "${PREDICT[@]}" --device "$DEVICE" --rows "$ROWS"
status=$?
[ "$status" = 0 ] || row predict "tutorial sampling" "$(ended "$status" "$PREDICT_S")"

table | tee -a "$LOG"
