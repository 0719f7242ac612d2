# Two entry points for a fresh machine: `make demo` and `make test`.
# Each builds .venv on first use with the default set of constraints.txt (Python 3.11, torch
# pinned to the CPU wheel). CI (.ci/run) reuses these targets with VENV, PYTHON and CONSTRAINTS
# set for the other tested sets (docs/versions.md).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: demo test crosscheck bench lint clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint $(CONSTRAINTS) --editable ".[test,demo]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lstm-deepshap demo --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest

crosscheck: $(VENV)/.installed
	$(PY) -m pytest crosscheck

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py --out $(OUT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
