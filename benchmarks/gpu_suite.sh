#!/usr/bin/env bash
# Every GPU benchmark, in phases of at most about ten minutes each:
#
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh tests     # build (if needed) + info + GPU tests
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh gram      # Gram accumulation: benchmarks/gpu_gram.py
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh e2e       # end to end: benchmarks/gpu_e2e.py
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh bench     # the pytest-benchmark suite (test_gpu.py)
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh cupy      # the cupy backend: tests/backends/test_nvrtc.py
#                                                       # + benchmarks/gpu_cupy.py (about 5 min)
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh           # all of them in order (about 30 min)
#
# Every phase builds the extension first unless a CUDA build is already there (a device machine
# that went idle comes back bare). Results go under $OUT (default benchmarks/results/gpu-run):
# versions.txt, build.log, backend_info.json, gpu-tests.{txt,xml}, gpu-gram.json, gpu-e2e.json,
# gpu-bench.json, cupy-tests.{txt,xml}, gpu-cupy.json, and each phase's log. Commit the JSON to benchmarks/results/ with the device
# name in the file name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" SAP_FAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"

ensure_built() {
  if python -c "import sap_fast._C as c, sys; sys.exit(0 if c.build_info()['cuda'] else 1)" 2>/dev/null; then
    return 0
  fi
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -2
  } >"$OUT/versions.txt" 2>&1
  local start; start=$(date +%s)
  pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  python -m sap_fast.info | tee "$OUT/backend_info.json"
}

phase() {
  case "$1" in
    tests)
      python -m pytest -q tests/backends/test_cuda_ops.py tests/backends/test_triton_update.py tests/backends/test_triton_gram.py \
        tests/backends/test_native_cpu.py tests/core/test_solve.py tests/core/test_no_sync.py \
        --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.txt" | tail -15 ;;
    gram) python benchmarks/gpu_gram.py --out "$OUT/gpu-gram.json" 2>&1 | tee "$OUT/gram.log" | tail -20 ;;
    e2e) python benchmarks/gpu_e2e.py --out "$OUT/gpu-e2e.json" 2>&1 | tee "$OUT/e2e.log" | tail -20 ;;
    bench)
      python -m pytest benchmarks/test_gpu.py --benchmark-only --benchmark-group-by=group \
        --benchmark-json="$OUT/gpu-bench.json" 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
    cupy)
      # A device machine reaches no package index: without cupy, install it from wheels carried
      # in build/wheels (`pip download -d build/wheels cupy-cuda13x cuda-pathfinder` beforehand).
      python -c "import cupy" 2>/dev/null || { [[ -d build/wheels ]] && \
        pip install -q --no-index --find-links build/wheels cupy-cuda13x; }
      python -m pytest -q -rs tests/backends/test_nvrtc.py --junitxml="$OUT/cupy-tests.xml" 2>&1 \
        | tee "$OUT/cupy-tests.txt" | tail -15
      python benchmarks/gpu_cupy.py --out "$OUT/gpu-cupy.json" 2>&1 | tee "$OUT/cupy.log" | tail -30 ;;
    *) echo "unknown phase '$1': use tests, gram, e2e, bench or cupy"; exit 2 ;;
  esac
}

ensure_built
for p in "${@:-tests gram e2e bench cupy}"; do
  for q in $p; do
    echo "== $q"; phase "$q"
  done
done
