# The two commands of a fresh machine: `make demo` and `make test` (README).
# The virtualenv is (re)installed only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: install demo test bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m stages.demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) tests/bench/bench_loading.py

clean-demo:
	rm -rf $(DEMO_OUT)
