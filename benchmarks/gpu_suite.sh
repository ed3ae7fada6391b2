#!/usr/bin/env bash
# Everything the GPU machine should do in one device session: build the extension with its CUDA
# kernels, report the backends, run the GPU tests (and the native CPU ones, as a sanity check of
# the build there). Results go under $OUT (default: benchmarks/results/gpu-run). The GPU
# benchmarks join this script in the GPU issues (4, 5).
#
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh
#
# Prepared in the native-extension issue; the GPU issues run it and commit what it writes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" SAP_FAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
} >"$OUT/versions.txt" 2>&1
start=$(date +%s)
pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python -m sap_fast.info | tee "$OUT/backend_info.json"
python -m pytest -q tests/test_cuda_ops.py tests/test_triton_update.py tests/test_native_cpu.py \
  --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.txt" | tail -15
