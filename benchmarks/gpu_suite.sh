#!/usr/bin/env bash
# The GPU suite, one phase per call, each sized to a device lease: it ends within its budget
# (540 s by default, the build included), writes at most 7 files under $OUT, and writes each
# result as soon as it is measured, so a timeout or a crash keeps everything before it.
#
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh tests    # probe, build, the GPU tests (pytest, 120 s per test)
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh gram     # probe, build, Gram per precision (benchmarks/gpu_gram.py)
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh e2e      # probe, build, correct()/sweep() (benchmarks/gpu_e2e.py)
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh cupy     # probe, build, NVRTC + batched cuSOLVER (tests + gpu_cupy.py)
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh bench    # probe, build, pytest-benchmark (benchmarks/test_gpu.py)
#   bash benchmarks/gpu_suite.sh --dry-run all         # every phase on the CPU at smoke size (CI)
#
# Every phase starts the same way: benchmarks/gpu_probe.py (what the machine holds; one line per
# missing thing) -> probe.txt; the native CUDA build, capped at $BUILD_CAP seconds, unless the
# probe found something missing or a CUDA build is already there -> build.log (its last lines);
# python3 -m sap_fast.info -> backend_info.json. A failed or skipped build is said in one line and
# the phase carries on with the Triton, cupy and portable routes. It ends with
# benchmarks/verdicts.py -> verdicts.txt (also printed): each measured item against its target.
#
# Files per phase (at most 7): probe.txt build.log backend_info.json verdicts.txt and
#   tests: tests.xml tests.txt        gram: gram.jsonl gram-results.jsonl gram.log
#   e2e:   e2e.jsonl e2e-results.jsonl e2e.log   cupy: cupy.xml cupy.txt cupy-results.jsonl   bench: bench.json bench.log
#
# Environment: OUT (default benchmarks/results/gpu-run), PHASE_BUDGET (seconds, default 540),
# BUILD_CAP (default 240), MODELS (gram: resnet50; e2e: resnet50,vit_b_16), MODES (gram:
# fp64,fp32,tf32,bf16), OFFICIAL_S (the official approach's time cap per model: gram 60, e2e 45),
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 16).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
PHASES=("$@")
[[ ${#PHASES[@]} -eq 0 || "${PHASES[0]}" == all ]] && PHASES=(tests gram e2e cupy bench)
for p in "${PHASES[@]}"; do
  case "$p" in tests|gram|e2e|cupy|bench) ;; *) echo "gpu_suite: unknown phase '$p': use tests, gram, e2e, cupy, bench or all" >&2; exit 2 ;; esac
done
if (( ${#PHASES[@]} > 1 && ! DRY )); then
  echo "gpu_suite: one phase per call on a device (each fits one lease); got ${PHASES[*]}" >&2; exit 2
fi

OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$OUT"
BUDGET="${PHASE_BUDGET:-540}"
BUILD_CAP="${BUILD_CAP:-240}"
export SAP_FAST_DEADLINE=$(( START + BUDGET - 15 ))   # the Python scripts skip what would not fit
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the package from this tree, built in place
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
SMOKE=()
if (( DRY )); then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  SMOKE=(--tiny --device cpu)
fi

left() { echo $(( SAP_FAST_DEADLINE - $(date +%s) )); }

prepare() {
  python3 benchmarks/gpu_probe.py >"$OUT/probe.txt" 2>&1
  local can_build=$?
  grep -E '^(missing|native)' "$OUT/probe.txt"
  if (( DRY )); then
    echo "build: skipped (dry run: the CPU build in place)" | tee "$OUT/build.log"
  elif python3 -c "import sap_fast._C as c, sys; sys.exit(0 if c.build_info()['cuda'] else 1)" 2>/dev/null; then
    echo "build: a CUDA build is already here" | tee "$OUT/build.log"
  elif (( can_build != 0 )); then
    echo "build: skipped, the probe found something missing (probe.txt)" | tee "$OUT/build.log"
  else
    local t0=$SECONDS log; log=$(mktemp)
    SAP_FAST_CUDA=1 timeout "$BUILD_CAP" python3 setup.py build_ext --inplace >"$log" 2>&1
    local rc=$?
    { tail -n 150 "$log"; echo; echo "exit status $rc after $(( SECONDS - t0 )) s"; } >"$OUT/build.log"
    rm -f "$log"
    if (( rc == 124 )); then echo "build: stopped at the ${BUILD_CAP} s cap; carrying on with the Triton, cupy and portable routes"
    elif (( rc != 0 )); then echo "build: failed (build.log); carrying on with the Triton, cupy and portable routes"
    else echo "build: ok in $(( SECONDS - t0 )) s"; fi
  fi
  python3 -m sap_fast.info >"$OUT/backend_info.json" 2>&1 || echo "sap_fast.info failed (backend_info.json)"
}

# pytest with a time limit per test (pytest-timeout) and for the whole run
run_pytest() {
  local name=$1; shift
  local limit=(); python3 -c "import pytest_timeout" 2>/dev/null && limit=(--timeout=120)
  timeout "$(left)" python3 -m pytest -q -rs -p no:cacheprovider "${limit[@]}" --junitxml="$OUT/$name.xml" "$@" \
    >"$OUT/$name.txt" 2>&1
  local rc=$?; tail -n 5 "$OUT/$name.txt"; (( rc == 124 )) && echo "$name: stopped at the phase's time budget"
  return 0
}

phase() {
  echo "== $1 ($(left) s left)"
  case "$1" in
    tests)
      # the dry run: the files whose tests are quick on the CPU (CI runs them all in make test)
      if (( DRY )); then
        run_pytest tests tests/backends/test_cuda_ops.py tests/backends/test_native_cpu.py tests/core/test_solve.py
      else
        run_pytest tests tests/backends/test_cuda_ops.py tests/backends/test_triton_update.py \
          tests/backends/test_triton_gram.py tests/backends/test_nvrtc.py tests/backends/test_native_cpu.py \
          tests/core/test_solve.py tests/core/test_no_sync.py
      fi ;;
    gram)
      timeout "$(left)" python3 benchmarks/gpu_gram.py --models "${MODELS:-resnet50}" \
        --modes "${MODES:-$( ((DRY)) && echo fp64,fp32,tf32,bf16,fp64-fma,fp64-triton,fp32-triton,fp64-shift,fp32-shift || echo fp64,fp32,tf32,bf16,fp64-fma)}" \
        --official-seconds "${OFFICIAL_S:-60}" "${SMOKE[@]}" \
        --jsonl "$OUT/gram.jsonl" --out "$OUT/gram-results.jsonl" >"$OUT/gram.log" 2>&1
      echo "gpu_gram.py: exit status $?"; tail -n 20 "$OUT/gram.log" ;;
    e2e)
      local sizes=(--pool 2000 --val 1000)
      (( DRY )) && sizes=()
      timeout "$(left)" python3 benchmarks/gpu_e2e.py --models "${MODELS:-resnet50,vit_b_16}" "${sizes[@]}" \
        --official-seconds "${OFFICIAL_S:-45}" "${SMOKE[@]}" \
        --jsonl "$OUT/e2e.jsonl" --out "$OUT/e2e-results.jsonl" >"$OUT/e2e.log" 2>&1
      echo "gpu_e2e.py: exit status $?"; tail -n 12 "$OUT/e2e.log" ;;
    cupy)
      if (( DRY )); then run_pytest cupy tests/backends/test_nvrtc.py -k "stream or route or batched"
      else run_pytest cupy tests/backends/test_nvrtc.py; fi
      local plan=(); (( DRY )) && plan=(--plan)
      { timeout "$(left)" python3 benchmarks/gpu_cupy.py "${plan[@]}" --out "$OUT/cupy-results.jsonl"; \
        echo "gpu_cupy.py: exit status $?"; } >>"$OUT/cupy.txt" 2>&1
      tail -n 15 "$OUT/cupy.txt" ;;
    bench)
      local only=(--benchmark-only); (( DRY )) && only=(--benchmark-disable)
      timeout "$(left)" python3 -m pytest -q -p no:cacheprovider benchmarks/test_gpu.py "${only[@]}" \
        --benchmark-group-by=group --benchmark-json="$OUT/bench.json" >"$OUT/bench.log" 2>&1
      echo "bench: exit status $?"; tail -n 25 "$OUT/bench.log" ;;
  esac
}

prepare
for p in "${PHASES[@]}"; do
  (( DRY )) && export SAP_FAST_DEADLINE=$(( $(date +%s) + BUDGET - 15 ))  # the dry run: each phase its own budget
  phase "$p"
done
python3 benchmarks/verdicts.py "$OUT" | tee "$OUT/verdicts.txt"
status=${PIPESTATUS[0]}
echo "gpu_suite: ${PHASES[*]} in $(( $(date +%s) - START )) s; files in $OUT: $(ls "$OUT" | wc -l)"
exit "$status"
