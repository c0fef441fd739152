# Developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: help venv check test test-fast demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/iotvault: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(BIN)/iotvault  ## create .venv with iotvault and the development tools

check: venv  ## lint (ruff), format check, type check (mypy strict on src/)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

test: check  ## the whole suite: checks, unit and integration tests
	$(BIN)/pytest

test-fast: venv  ## unit tests only
	$(BIN)/pytest tests/unit

demo: venv  ## run the demo (embedded broker, SQLite, simulated devices)
	$(BIN)/iotvault demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build
