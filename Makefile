# Two commands for a fresh machine (Python 3.11, no torch needed beforehand):
#   make demo   set everything up, then run the digits demo (noisy labels -> SAP repair)
#   make test   set everything up (native extension included), then run the test suite
# and, for the CUDA sources on a machine without a GPU:
#   make check-cuda   compile every csrc/cuda/*.cu with nvcc (no GPU, no link)
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup demo test check-cuda bench

# torch first (the CPU wheel here; a GPU machine keeps its own), then the build tools, then the
# package without build isolation so the extension compiles against that torch.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q "setuptools>=64" wheel pybind11 ninja
	command -v cmake >/dev/null || $(PIP) install -q "cmake>=3.18"
	$(PIP) install -q --no-build-isolation -e ".[demo,cli,test]"

demo: setup
	$(PYTHON) -m sap_fast demo

# SAP_FAST_REQUIRE_NATIVE: a missing extension fails the native tests instead of skipping them
test: setup
	SAP_FAST_REQUIRE_NATIVE=1 $(PYTHON) -m pytest -q tests

check-cuda:
	PYTHON=$(PYTHON) bash tools/check_cuda.sh

bench: setup
	$(PYTHON) benchmarks/bench_cpu.py
	$(PYTHON) benchmarks/bench_native_cpu.py
