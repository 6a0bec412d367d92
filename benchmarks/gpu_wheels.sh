#!/usr/bin/env bash
# Wheels that the lent GPU machine lacks for benchmarks/gpu_check.sh, fetched here into .whl/.
#
# That machine (Python 3.12, torch 2.11, transformers 5.17 preinstalled) reaches no network, so
# every package eqakit needs beyond its image has to travel as a wheel in .whl (git-ignored through
# .git/info/exclude, carried by the device call). Versions are the tested ones, read from
# constraints/test.txt, so the GPU runs what CI runs. Idempotent: a wheel already in .whl is not
# fetched again (pip skips it), and a second version of a package is removed (two stop the install).
#
#   bash benchmarks/gpu_wheels.sh          then: device run `bash benchmarks/gpu_check.sh`, carry .whl
#   PYTHON_VERSION=3.12 bash benchmarks/gpu_wheels.sh      (the device machine's Python; default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
WHL=.whl
mkdir -p "$WHL"
# .whl must never be committed or travel unasked: ignore it in this clone only (.gitignore is shared)
if [ -d .git ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
fi

# What the image lacks or has too old, for eqakit's dependencies in pyproject.toml (the image's own
# list: /work/.library/device/KINDS.md where this workplace keeps it). Each name's own requirements
# are listed too when the image lacks them: pip installs there with --no-deps.
PACKAGES=(
  transformers     # image: 5.17; eqakit needs >= 5.19
  peft             # not in the image's pip list as read; small, so carried to be sure of >= 0.17
  huggingface_hub  # transformers 5.25 and datasets 5 need a newer one than the image's 1.33
  datasets dill multiprocess
  nltk rouge-chinese
  fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn
  # in the image, but its version is not known here and a carried wheel needs a recent one (or,
  # for fsspec, an old one: datasets caps it); small, so carried rather than risked
  click typing_extensions regex hf-xet fsspec
)
# PyAV (35 MB) would push the carried tree past the device call's 64 MiB: gpu_check.sh decodes no
# video, so it travels only when asked for (WITH_AV=1); the preflight then checks it too.
if [ "${WITH_AV:-0}" = 1 ]; then PACKAGES+=(av); else rm -f "$WHL"/av-*.whl; fi
# jieba is published as a source archive only: built into a wheel below (pure Python)
JIEBA=jieba

pin() {  # NAME -> NAME==VERSION from constraints/test.txt (names compared as PEP 503 normalises them)
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  awk -F'==' -v want="$want" '{n=tolower($1); gsub(/[_.]/, "-", n)} n==want {print $1"=="$2; exit}' \
    constraints/test.txt
}

fetch() {  # NAME... -> their pinned wheels in .whl (pip skips one already there)
  local pins=() spec name
  for name in "$@"; do
    spec=$(pin "$name")
    [ -n "$spec" ] || { echo "gpu_wheels: $name has no pin in constraints/test.txt" >&2; exit 1; }
    pins+=("$spec")
  done
  echo "fetching for CPython $PYTHON_VERSION (x86-64 Linux): ${pins[*]}"
  # --no-deps: the image's torch, numpy, pyarrow ... must not be replaced (and are too large to carry)
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp "${platforms[@]}" -d "$WHL" "${pins[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

fetch "${PACKAGES[@]}"

# jieba: pip builds the sdist into a py3-none-any wheel here (the device machine has no setuptools
# download and the old script's --no-build-isolation install of the .tar.gz could fail there)
jieba=$(pin "$JIEBA")
if ! ls "$WHL"/jieba-*.whl >/dev/null 2>&1; then
  "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-binary=:all: -w "$WHL" "$jieba"
fi
rm -f "$WHL"/*.tar.gz "$WHL"/*.zip  # sdists never travel: only wheels install without a build

# One version per package: drop any wheel whose version is not the pinned one (an older run's)
for wheel in "$WHL"/*.whl; do
  file=$(basename "$wheel")
  name=${file%%-*}
  version=$(echo "$file" | cut -d- -f2)
  spec=$(pin "$name")
  if [ -n "$spec" ] && [ "${spec#*==}" != "$version" ]; then
    echo "removing $file (pinned: $spec)"
    rm -f "$wheel"
  fi
done

# Close the set: what a carried wheel (or eqakit) requires that is neither carried nor in the image
# (benchmarks/gpu_image.txt) is fetched too, until nothing is missing; a gap shows here, where it can
# still be fetched. Versions the image holds but this list does not know are checked there, by
# benchmarks/gpu_preflight.py, first thing in gpu_check.sh.
for round in 1 2 3 4 5; do
  missing=$( ("$PY" benchmarks/gpu_preflight.py --wheels "$WHL" || true) | tee /dev/stderr | sed -n 's/^missing: //p')
  [ "$missing" = none ] && break
  [ "$round" = 5 ] && { echo "gpu_wheels: still missing after 5 rounds: $missing" >&2; exit 1; }
  # shellcheck disable=SC2086  # one name per word
  fetch $missing
done
size=$(du -sm "$WHL" | cut -f1)
echo "$WHL: $(ls "$WHL"/*.whl | wc -l) wheels, ${size} MiB (a device call carries at most 64 MiB with the tree)"
