# Two entry points for a newcomer: `make bench` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test workers: 2 fit the 2-core CI machine (each gloo test spawns its own ranks).
WORKERS ?= 2

$(VENV)/.installed: requirements-cpu.txt setup.py pyproject.toml CMakeLists.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q -e .
	touch $@

.PHONY: setup bench test
setup: $(VENV)/.installed

bench: setup
	$(PY) bench/throughput.py

test: setup
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal
