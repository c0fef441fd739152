# Developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# bandit over src/, configured in pyproject.toml ([tool.bandit]); part of `make check`
BANDIT := $(BIN)/bandit --quiet --configfile pyproject.toml --recursive src
# The locks in requirements/ (README, "Dependencies"): every package pinned, with its hashes.
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
# What pip-audit prints when it could not ask its vulnerability service about every package
AUDIT_UNCHECKED := could not be audited|requests\.exceptions|ConnectionError|Max retries|ServiceError|timed out

.PHONY: help venv assets check test test-fast demo clean lock upgrade audit wheel bench fuzz attack faults cluster-demo

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# scripts/bootstrap.py (its docstring says why): a pinned pip first, then the development lock,
# then iotvault editable, then the web application's pinned assets (scripts/fetch_assets.py). It
# does nothing when its inputs have not changed since the last run, and it completes a .venv the
# demo command made with the runtime lock only.
venv:  ## create or update .venv with iotvault and the development tools
	@$(PYTHON) scripts/bootstrap.py --dev --venv $(VENV)

# The web application's third-party assets (uPlot, Swagger UI): pinned with their integrity in
# web-assets.lock.json, fetched from the npm registry by a standard-library script (no Node).
assets:  ## fetch and verify the web application's pinned assets (web-assets.lock.json)
	$(PYTHON) scripts/fetch_assets.py

check: venv  ## lint (ruff), format check, type check (mypy strict on src/), import rules, bandit on src/
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BANDIT)

test: check  ## the whole suite: checks, unit and integration tests
	$(BIN)/pytest

test-fast: venv  ## unit tests only
	$(BIN)/pytest tests/unit

demo: venv  ## run the demo (embedded broker, SQLite, simulated devices)
	$(BIN)/iotvault demo

# docs/design/cluster.md: two API and two ingest nodes on loopback, PostgreSQL, Redis and a
# private Mosquitto; simulated devices publish until Ctrl-C (CLUSTER_FLAGS="--seconds 30").
cluster-demo: venv  ## two API and two ingest nodes on loopback (PostgreSQL, Redis, Mosquitto)
	$(BIN)/python -m bench.cluster_demo $(CLUSTER_FLAGS)

# BENCHMARKS.md: what it measures, the figures, the profiles. BENCH_FLAGS="--repeat 3" on a
# shared machine; "--smoke" for a quick check of the harness; "--soak 10" for the memory run.
bench: venv  ## benchmarks, each figure beside a same-run baseline (needs Mosquitto, PostgreSQL)
	$(BIN)/python -m bench $(BENCH_FLAGS)

FUZZ_SECONDS ?= 600
fuzz: venv  ## fuzz the embedded broker's packet decoder (atheris) for FUZZ_SECONDS (default 600)
	@mkdir -p .fuzz
	$(BIN)/python tests/fuzz/fuzz_codec.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=.fuzz/ .fuzz

ATTACK_SECONDS ?= 60
attack: venv  ## hostile clients against one `iotvault serve` (embedded broker); prints the bounds
	$(BIN)/python -m bench.attack --seconds $(ATTACK_SECONDS)

# bench/faults.py: SIGKILL/SIGTERM, broker restart, database outage, table locks, full disk, on
# services of its own (a private PostgreSQL and Mosquitto; the disk needs root). Several minutes;
# the short version runs in the test suite (tests/integration/test_faults_suite.py).
faults: venv  ## the long fault-injection run: prints published/acknowledged/stored/lost/duplicates
	$(BIN)/python -m bench.faults $(FAULTS_FLAGS)

# pip-compile keeps only what the Python it runs on needs (redis needs async-timeout before
# 3.11.3 only): lock from an environment of the oldest Python 3.11 at hand, e.g. Debian 12's
# `make lock PYTHON=/usr/bin/python3.11 VENV=.venv-lock` (tests/unit/test_packaging.py checks).
lock: venv  ## re-lock requirements/ after a change to pyproject.toml (other pins stay)
	$(PIP_COMPILE) $(LOCK_FLAGS) --extra postgres --extra redis \
		--output-file requirements/runtime.txt pyproject.toml
	$(PIP_COMPILE) $(LOCK_FLAGS) --all-build-deps --extra dev --extra postgres --extra redis \
		--constraint requirements/runtime.txt --output-file requirements/dev.txt pyproject.toml
	$(PIP_COMPILE) $(LOCK_FLAGS) --constraint requirements/dev.txt \
		--output-file requirements/bootstrap.txt requirements/bootstrap.in
	$(PIP_COMPILE) $(LOCK_FLAGS) --output-file requirements/wiotp.txt requirements/wiotp.in

upgrade:  ## re-lock with the newest releases pyproject.toml allows, then update .venv
	$(MAKE) lock LOCK_FLAGS=--upgrade
	$(MAKE) venv

# pip-audit fails (exit 2) rather than passes when its service cannot be asked: `--strict` turns
# a package it could not look up into an error. AUDIT_FLAGS="-s osv" asks OSV instead of PyPI.
# cyclonedx-py warns on every run that a requirements file has no dependency graph: silenced.
audit: venv  ## bandit, a CycloneDX SBOM in dist/, pip-audit of the locks (needs the network)
	$(BANDIT)
	@mkdir -p dist
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/cyclonedx-py requirements --pyproject pyproject.toml \
		--output-reproducible --output-file dist/iotvault-sbom.cdx.json requirements/runtime.txt
	@echo "SBOM: dist/iotvault-sbom.cdx.json"
	@echo "pip-audit: requirements/runtime.txt, requirements/dev.txt"
	@$(BIN)/pip-audit --strict --disable-pip --require-hashes --progress-spinner off $(AUDIT_FLAGS) \
		-r requirements/runtime.txt -r requirements/dev.txt 2>dist/pip-audit.log; rc=$$?; \
	if [ $$rc -ne 0 ] && grep -qE '$(AUDIT_UNCHECKED)' dist/pip-audit.log; then \
		grep -E '$(AUDIT_UNCHECKED)' dist/pip-audit.log | tail -n 1 | cut -c1-240 >&2; \
		echo "pip-audit: vulnerability service unreachable — NOT checked" >&2; exit 2; \
	fi; cat dist/pip-audit.log >&2; exit $$rc

wheel: venv  ## build dist/iotvault-*.whl (offline: the build backend is in the dev lock)
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build
