# Two commands for a fresh machine:  `make demo` (the main job)  and  `make test`.
# Both create .venv on first use: torch 2.13.0 first (pinned, so pip never pulls a CUDA
# build), then this package with its test extras.
VENV ?= .venv
PY := $(VENV)/bin/python
SMUP := $(VENV)/bin/smup
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/tinyshakespeare/input.txt),)
export SMUP_DATA_DIR ?= $(SHARED_DATA)
endif

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The main job: an AdamW width-transfer sweep, SP vs μP (128 short runs, resumable), then its
# report (tables, loss-vs-LR plot, optimum drift) in runs/sweeps/demo_report/.
demo: $(VENV)/.installed
	$(SMUP) sweep configs/sweeps/demo.toml
	$(SMUP) report runs/sweeps/demo.sqlite

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf runs .pytest_cache .ruff_cache
