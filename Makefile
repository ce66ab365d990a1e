# histoboost developer tasks. `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# glibc hands large freed buffers back to the OS and re-faults them on every CNN batch; on many VMs
# that halves CNN speed. Keep freed memory in the process instead.
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: test lint check demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,dask]'
	touch $(STAMP)

# Two pytest-xdist workers of one core each (tests/conftest.py), test files kept whole on one worker (their module
# fixtures: a Dask cluster, a trained bundle, are made once): the 2-core machine's both cores, all the time.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# Lint, format check and type check; configured in pyproject.toml ([tool.ruff], [tool.mypy]).
LINTED := src tests benchmarks experiments
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

# The fast lane while developing: lint, then the tests not marked heavy, stopping at the first failure.
check: $(STAMP) lint
	$(PY) -m pytest -m "not heavy" -x -q

demo: $(STAMP)
	$(VENV)/bin/histoboost demo --out runs/demo

BACH := ../shared/data/bach_iciar2018
bench: $(STAMP)
	$(PY) benchmarks/extract_bench.py $(if $(wildcard $(BACH)/manifest.csv),--accuracy $(BACH))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
