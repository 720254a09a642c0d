# Quick start:  make demo   (2D toy example: trains, evaluates and plots autoguidance on CPU; ~4 min at one thread)
#               make test   (the full test suite; make test-fast for the quick subset; make lint for ruff)
# The first use creates .venv. TORCH selects the torch build installed before the package:
# the default is the CPU wheel; with CUDA, e.g. `make TORCH="torch --index-url https://download.pytorch.org/whl/cu124"`,
# or install torch into .venv yourself first (an existing torch is kept).
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
