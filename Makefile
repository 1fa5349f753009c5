# `make test` is the project's test command (README, .ci/run). It builds its own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROTOS := $(shell find proto -name '*.proto')

.PHONY: test lint typecheck unit proto bench clean

test: lint typecheck unit

$(STAMP): pyproject.toml hatch_build.py $(PROTOS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

proto: $(STAMP)
	$(BIN)/python hatch_build.py

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks) hatch_build.py
	$(BIN)/ruff format --check src tests $(wildcard benchmarks) hatch_build.py

typecheck: proto
	$(BIN)/mypy

unit: proto
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache src/amoskys/v1/*_pb2*
