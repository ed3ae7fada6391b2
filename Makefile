# Two commands for a fresh machine (Python 3.11, no torch needed beforehand):
#   make demo   set everything up, then run the digits demo (noisy labels -> SAP repair)
#   make test   set everything up, then run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup demo test bench

setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q "setuptools>=64" wheel
	$(PIP) install -q --no-build-isolation -e ".[demo,test]"

demo: setup
	$(PYTHON) -m sap_fast.demo

test: setup
	$(PYTHON) -m pytest -q tests

bench: setup
	$(PYTHON) benchmarks/bench_cpu.py
