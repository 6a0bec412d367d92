#!/usr/bin/env bash
# Wheels that the lent GPU machine (Python 3.12, torch and transformers 5.17 preinstalled, no
# network) lacks for benchmarks/gpu_check.sh, downloaded here into .whl/ (git-ignored).
#
#   bash benchmarks/gpu_wheels.sh          then: run benchmarks/gpu_check.sh with .whl carried
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for n in 2_17 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
fetch() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$@"
}
# eqakit's own requirements that the image lacks or has too old (transformers >= 5.19)
fetch "transformers==5.24.0" "fastapi==0.115.12" "starlette==0.46.2" "uvicorn==0.34.2" \
  "pydantic==2.11.4" "pydantic-core==2.33.2" "annotated-types==0.7.0" "typing-inspection==0.4.0" \
  "datasets==3.6.0" "dill==0.3.8" "multiprocess==0.70.16" "nltk==3.9.1" \
  "rouge-chinese==1.0.3" "openai==1.82.0" "distro==1.9.0" "jiter==0.9.0" "sniffio==1.3.1"
# jieba is published as a source archive only (pure Python: built there without a network)
python3 -m pip download --quiet --no-deps --no-binary=:all: -d .whl "jieba==0.42.1"
du -sh .whl
