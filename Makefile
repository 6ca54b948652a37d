# Each target sets itself up: a virtual environment in .venv with the project
# installed editable (re-made only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: setup data train test bench lint format clean

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
	$(DEVICES) $(BIN)/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
