# Two commands set everything up on a fresh machine with Python >= 3.10 and the package registries:
#   make demo   - create .venv, install eqakit, run the whole pipeline on the tiny model + synthetic data
#   make test   - create .venv with the dev extras, lint, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: demo test lint format bench clean

# torch/torchvision are installed first and pinned: 2.14.1/0.29.1 are the tested pair (avoid 2.9.x:
# a Conv3d regression makes Qwen3-VL's patch embedding several times slower).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/eqakit demo --output-dir $(DEMO_DIR)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache
