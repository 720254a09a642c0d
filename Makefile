# Quick start:  make demo   (2D toy example: trains, evaluates and plots autoguidance on CPU; ~4 min)
#               make test   (the full test suite; make test-fast for the quick subset; make lint for ruff)
# Commands and tests compute with one CPU thread (edm2/threads.py), so a busy machine cannot stall them;
# EDM2_THREADS=N (or --threads N on a command) chooses more.
# The first use creates .venv. TORCH selects the torch build installed before the package: the default is
# PyPI's torch==2.13.0 (on Linux x86-64 the CUDA build, which also runs on the CPU); the CPU-only build:
# `make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"`; another CUDA version:
# `make TORCH="torch --index-url https://download.pytorch.org/whl/cu124"`; or install torch into .venv yourself
# first (an existing torch is kept).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[dev,toy,vae]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) toy_example.py demo --outdir out/toy-demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out *.egg-info
