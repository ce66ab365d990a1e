# histoboost developer tasks. `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# glibc hands large freed buffers back to the OS and re-faults them on every CNN batch; on many VMs
# that halves CNN speed. Keep freed memory in the process instead.
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,dask]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/histoboost demo --out runs/demo

BACH := ../shared/data/bach_iciar2018
bench: $(STAMP)
	$(PY) benchmarks/extract_bench.py $(if $(wildcard $(BACH)/manifest.csv),--accuracy $(BACH))

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
