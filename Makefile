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

demo: $(VENV)/.installed
	$(SMUP) coord-check --optimizer adamw --widths 64,128,256,512 --depths 2,4,8,16 --steps 5 --seeds 3 --out runs/demo/coord
	$(SMUP) train configs/demo.toml

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf runs .pytest_cache .ruff_cache
