# The two set-up commands of the README:
#   make serve   install into .venv and run the whole service (API + worker + SQLite + embedded broker)
#   make test    install into .venv (with test tools) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# CPU build of torch unless the caller overrides (GPU machines: make serve CONSTRAINTS=)
CONSTRAINTS ?= -c constraints/cpu.txt

.PHONY: install install-dev serve test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(BIN)/python
	$(PIP) install -q $(CONSTRAINTS) -e .

install-dev: $(BIN)/python
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev]'

serve: install
	$(BIN)/trainyard serve

test: install-dev
	bash scripts/ensure-services.sh
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .

bench: $(BIN)/python
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev,bench]'
	$(BIN)/python bench/engine.py
