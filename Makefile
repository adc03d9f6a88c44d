# Set-up is two commands: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# PyTorch builds that install from the package index (capped at torch<=2.14.1 here).
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=

.PHONY: venv demo test lint data clean bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian when it is missing; elsewhere the loader downloads it with checksums.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST_DIR)/train-images-idx3-ubyte ]; then \
	  echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "apt could not install dataset-fashion-mnist; the loader will try the official download"; \
	else \
	  echo "Fashion-MNIST not in $(FMNIST_DIR); the loader will download it into ./data (or see README)"; \
	fi

demo: venv data
	$(VENV)/bin/c2f demo $(DEMO_ARGS)

test: venv
	$(PY) -m pytest -q -x --durations=15

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
