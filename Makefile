# Every target bootstraps .venv on first use: the pinned CPU torch first (so pip never
# pulls the multi-GB CUDA wheels), then the package with its dev and queue extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,queue]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/stm-live demo

test: venv
	$(PY) -m pytest -q

# The rules and their reasons are in pyproject.toml ([tool.ruff]).
lint: venv
	$(VENV)/bin/ruff check stm_live tests benchmarks docs
	$(VENV)/bin/ruff format --check stm_live tests benchmarks docs

bench: venv
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) stm_live_data demo_output
