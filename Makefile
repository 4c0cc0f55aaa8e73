# Portcullis. README.md gives the two commands users need: `make image` and `make test`.
# Each area adds its own targets in mk/<area>.mk.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: deps test test-gate lint
.DEFAULT_GOAL := help

help:
	@echo "make image   build the appliance image (qcow2 + ISO) into build/"
	@echo "make test    run every test: gate, roles (molecule), image end to end"

deps:
	scripts/install-deps test

# Each area adds its targets, and its tests to EXTRA_TESTS, before the test rule reads it.
-include mk/*.mk

# The one test command: everything, in order of cost.
test: deps lint test-gate $(EXTRA_TESTS)

lint:
	$(VENV)/bin/ruff check appliance tests bench

test-gate:
	$(PY) -m pytest -q tests/unit tests/integration

