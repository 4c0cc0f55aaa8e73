# Portcullis. README.md gives the two commands users need: `make image` and `make test`.
# Each area adds its own targets in mk/<area>.mk.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help deps test test-gate lint
.DEFAULT_GOAL := help

# Every target's rule line ends in `## what it does`, which `make help` lists
# (tests/unit/test_make_help.py checks that none is missing).
help: ## list every target with what it does
	@echo "make image builds the appliance; make test runs every test. All targets:"
	@awk -F ':[^#]*## ' '/^[A-Za-z0-9_.-]+:[^=]*## / && !seen[$$1]++ \
	    { printf "  %-14s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

deps: ## install the Debian packages and the Python venv (.venv) the tests need
	scripts/install-deps test

# Each area adds its targets, and its tests to EXTRA_TESTS, before the test rule reads it.
-include mk/*.mk

# The one test command: everything, in order of cost.
test: deps lint test-gate $(EXTRA_TESTS) ## run every test: lint, the gate, the roles, fuzzing, the image

lint: ## ruff on the code (and yamllint, ansible-lint on the roles)
	$(VENV)/bin/ruff check appliance tests bench vm/boot vm/lab scripts/make-seed

test-gate: ## the gate's unit and integration tests (pytest)
	$(PY) -m pytest -q tests/unit tests/integration

