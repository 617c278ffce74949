# unus-edge: the two set-up commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

# Where real MNIST lives is a setting. When it is not set, use the shared folder beside this
# checkout if there is one; the code itself never assumes that path.
ifeq ($(origin UNUS_DATA_DIR), undefined)
UNUS_DATA_DIR := $(firstword $(wildcard $(abspath $(CURDIR)/../shared/datasets/mnist)))
endif
export UNUS_DATA_DIR

# PyTorch is a test oracle only. The CPU build is pinned by its local version so that a machine
# without it fails fast (and the oracle tests skip) instead of pulling a multi-GB CUDA build.
TORCH_ORACLE ?= torch==2.13.0+cpu

INSTALLED := $(VENV)/.installed
ORACLE    := $(VENV)/.oracle

.PHONY: help install test lint typecheck pytest demo bench clean

help:
	@echo "make demo   create $(VENV), install, run a real federated training (embedded broker, 10 devices)"
	@echo "make test   install what the tests need (mosquitto via apt-get when root) and run them"

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev,all]'
	@touch $@

install: $(INSTALLED)

$(ORACLE): $(INSTALLED)
	@$(PY) -c 'import torch' 2>/dev/null \
	  || $(PIP) install --quiet '$(TORCH_ORACLE)' \
	  || echo "note: $(TORCH_ORACLE) is not installable here; the PyTorch oracle tests will be skipped"
	@touch $@

lint: $(INSTALLED)
	$(PY) -m ruff check unus_edge tests bench $(wildcard examples)

typecheck: $(INSTALLED)
	$(PY) -m mypy --strict unus_edge

pytest: $(INSTALLED) $(ORACLE)
	@tests/ensure-mosquitto.sh
	@tests/ensure-datasets.sh
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

demo: $(INSTALLED)
	$(PY) -m unus_edge.cli demo

bench: $(INSTALLED)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
