# Two entry points for a fresh machine: `make demo` and `make test`.
# Each builds .venv on first use (torch pinned to the CPU wheel by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: demo test crosscheck bench lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable ".[test,demo]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lstm-deepshap demo --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest

crosscheck: $(VENV)/.installed
	$(PY) -m pytest crosscheck

bench: $(VENV)/.installed
	$(VENV)/bin/lstm-deepshap bench --out $(OUT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
