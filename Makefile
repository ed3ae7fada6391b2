# Two commands for a fresh machine (Python 3.11, no torch needed beforehand):
#   make demo        set up what the demo needs, then run the digits demo (noisy labels -> SAP repair)
#   make test        set up the test stack (native extension included), then run the whole suite
# and:
#   make test-fast   the suite without the tests marked slow
#   make check-cuda  compile every CUDA source with nvcc, then through NVRTC, then read the Gram
#                    kernels' sm_90 machine code: registers, spills, DMMA (no GPU, no link)
#   make check-cuda-build  the SAP_FAST_CUDA=ON build itself, configured, compiled and linked
#                    against the GPU machines' torch and CUDA wheels (downloaded, not installed)
#   make check-triton  compile every Triton launch for sm_90 with the installed Triton and with
#                      the GPU machine's (3.6.0); fails on a compile error or a spilling default
#   make gpu-dry-run   every phase of benchmarks/gpu_suite.sh on the CPU at smoke size
#   make bench       the CPU benchmarks
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# pytest-xdist: one worker process per core; tests marked with one xdist_group run on one worker
PYTEST := $(PYTHON) -m pytest -q -n auto --dist loadgroup

.PHONY: tools setup setup-demo demo test test-fast check-cuda check-cuda-build check-triton gpu-dry-run bench

# torch first (the CPU wheel here; a GPU machine keeps its own), then the build tools; the package
# is installed without build isolation so its extension compiles against that torch
tools:
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "==> torch 2.13.0 (CPU wheel)"; $(PIP) install -q torch==2.13.0; }
	@echo "==> build tools: setuptools, wheel, pybind11, ninja (and cmake if none is on the PATH)"
	@$(PIP) install -q "setuptools>=64" wheel pybind11 ninja
	@command -v cmake >/dev/null || $(PIP) install -q "cmake>=3.18"

setup-demo: tools
	@echo "==> sap_fast[demo]: compiling the native extension (C++, about 40 s on 2 cores), scikit-learn, matplotlib"
	@$(PIP) install -q --no-build-isolation -e ".[demo]"

setup: tools
	@echo "==> sap_fast[test]: compiling the native extension (C++, about 40 s on 2 cores), then the test stack (triton, pytest, ...)"
	@$(PIP) install -q --no-build-isolation -e ".[test]"

demo: setup-demo
	$(PYTHON) -m sap_fast demo

# SAP_FAST_REQUIRE_NATIVE: a missing extension fails the native tests instead of skipping them
test: setup
	SAP_FAST_REQUIRE_NATIVE=1 $(PYTEST) tests

test-fast: setup
	SAP_FAST_REQUIRE_NATIVE=1 $(PYTEST) -m "not slow" tests

check-cuda:
	PYTHON=$(PYTHON) bash tools/check_cuda.sh

# needs pybind11, cmake and ninja (make tools) and about 1.3 GB of wheels in build/cuda-build
check-cuda-build:
	PYTHON=$(PYTHON) bash tools/check_cuda_build.sh

# the Triton of the GPU machine's torch (2.11.0+cu130 pins triton 3.6.0); installed beside the test
# stack into build/triton-3.6.0, never over it
DEVICE_TRITON ?= 3.6.0
check-triton:
	$(PYTHON) tools/check_triton.py --json build/check-triton-installed.jsonl
	$(PYTHON) tools/check_triton.py --triton $(DEVICE_TRITON) --json build/check-triton-$(DEVICE_TRITON).jsonl

gpu-dry-run:
	OUT=build/gpu-dry-run bash benchmarks/gpu_suite.sh --dry-run all

bench: setup
	$(PYTHON) benchmarks/bench_cpu.py
	$(PYTHON) benchmarks/bench_native_cpu.py
