# Each target sets itself up: a virtual environment in .venv with the project
# installed editable (re-made only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8
TESTS ?= tests
# test-latest: a second venv on Python >= 3.12 with the newest releases of every
# dependency. The first interpreter found that runs (a pyenv shim for a version
# not selected exists but fails, so each candidate is tried), or PY_LATEST=...
VENV_LATEST := .venv-latest
PYENV_VERSIONS := $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions
ifndef PY_LATEST
PY_LATEST := $(shell for p in python3.12 python3.13 \
  $(wildcard $(PYENV_VERSIONS)/3.12*/bin/python3.12) \
  $(wildcard $(PYENV_VERSIONS)/3.13*/bin/python3.13); do \
  $$p -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1 \
  && { command -v $$p; break; }; done)
endif

.PHONY: setup setup-latest data train test test-latest bench lint format clean experiments report

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST IDX files from Debian's package where apt-get exists; otherwise
# point --config.data_dir at a folder holding the four IDX files.
data:
	@if [ -d $(FMNIST) ]; then echo "Fashion-MNIST: $(FMNIST)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "apt-get not found: pass --config.data_dir=DIR with the Fashion-MNIST IDX files"; fi

train: $(STAMP) data
	$(BIN)/python train.py --config configs/default.py --workdir runs/default

test: $(STAMP)
	$(DEVICES) $(BIN)/python -m pytest -q -n 2 --dist worksteal $(TESTS)

# Re-resolves on every run (pip install -U), so it tracks the newest releases
# that pyproject.toml admits.
setup-latest:
	@test -n "$(PY_LATEST)" || { echo "setup-latest: no Python >= 3.12 found; set PY_LATEST=/path/to/python3.12"; exit 1; }
	test -x $(VENV_LATEST)/bin/python || $(PY_LATEST) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/pip install -q --upgrade pip
	$(VENV_LATEST)/bin/pip install -q -U -e '.[dev]'
	$(VENV_LATEST)/bin/python -c "import sys, jax, flax, optax, orbax.checkpoint as o; print('test-latest: Python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax-checkpoint', o.__version__)"

test-latest:
	@if [ -z "$(PY_LATEST)" ]; then \
	  echo "test-latest: SKIPPED, no Python >= 3.12 found (python3.12/python3.13 on PATH or under pyenv); set PY_LATEST=/path/to/python3.12"; \
	else $(MAKE) --no-print-directory setup-latest && \
	  $(DEVICES) $(VENV_LATEST)/bin/python -m pytest -q -n 2 --dist worksteal $(TESTS); fi

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# The evidence grid (hours of CPU; resumes where it stopped) and its pages.
experiments: $(STAMP) data
	$(BIN)/python -m experiments.run_all

report: $(STAMP)
	$(BIN)/python -m experiments.report

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(VENV_LATEST) runs .pytest_cache
