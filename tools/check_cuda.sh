#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU and without linking: every csrc/cuda/*.cu, plus
# each csrc/cuda/*.cuh on its own (a generated .cu that includes it and, for the conv Gram
# kernels, instantiates them for float and double). Then the kernel sources the cupy backend
# compiles at run time, through NVRTC as it does (tools/check_nvrtc.py: one line per file and
# architecture; it installs cupy-cuda13x and the NVRTC wheel into $PYTHON when they are missing).
# Last, the kernels' machine code for sm_90 (tools/check_cuda_sass.py: registers, spills, and the
# DMMA instructions of the FP64 tensor-core tiles, read with cuobjdump -sass).
# Catches syntax, type and template errors on a CPU-only machine; says nothing about numerics
# (the GPU tests do that).
#
#   tools/check_cuda.sh                      # from anywhere; one line per file, exit 1 on failure
#
# Environment:
#   SAP_FAST_CHECK_ARCH    GPU arch(s) to compile for, TORCH_CUDA_ARCH_LIST style
#                          ("9.0", "8.0;9.0", "sm_90"); default sm_90.
#   SAP_FAST_CUDA_HEADERS  a directory holding cusolverDn.h / cublas_api.h (skips the fetch).
#   SAP_FAST_HEADER_CACHE  where fetched headers go; default build/cuda-headers.
#   NVCC                   the nvcc to use; default nvcc on PATH.
#   SAP_FAST_NVRTC_ARCH    architectures of the NVRTC check; default "sm_80 sm_90".
#   SAP_FAST_SASS_ARCH     architectures of the machine-code check; default "sm_90".
#   CUOBJDUMP              the cuobjdump to read it with; default beside nvcc, else Triton's copy.
#
# The cuSOLVER/cuBLAS headers are not part of the nvcc-only toolkit on the CPU machines. When the
# toolkit lacks them, they are taken from the nvidia-cusolver / nvidia-cublas wheels (CUDA 13
# builds keep them under nvidia/cu13/include) with `pip download`, unpacked once and reused.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python}"
CACHE="${SAP_FAST_HEADER_CACHE:-$ROOT/build/cuda-headers}"

command -v "$NVCC" >/dev/null || { echo "check_cuda: $NVCC not found (set NVCC=/path/to/nvcc)" >&2; exit 2; }

# --- arch flags: "9.0;8.0+PTX" or "sm_90" -> -gencode pairs -------------------------------------
arch_flags=()
IFS=';, ' read -r -a arch_names <<<"${SAP_FAST_CHECK_ARCH:-sm_90}"
for name in "${arch_names[@]}"; do
  [[ -z "$name" ]] && continue
  number="${name%+PTX}"; number="${number#sm_}"; number="${number#compute_}"; number="${number/./}"
  arch_flags+=("-gencode=arch=compute_${number},code=sm_${number}")
  [[ "$name" == *+PTX ]] && arch_flags+=("-gencode=arch=compute_${number},code=compute_${number}")
done
((${#arch_flags[@]})) || { echo "check_cuda: SAP_FAST_CHECK_ARCH is empty" >&2; exit 2; }

# --- include paths: torch, Python, and the cuSOLVER/cuBLAS headers --------------------------------
torch_include_list="$("$PYTHON" -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))")" \
  || { echo "check_cuda: cannot import torch with $PYTHON (set PYTHON=...)" >&2; exit 2; }
mapfile -t torch_includes <<<"$torch_include_list"
python_include="$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
# The toolkit's own include dir, as nvcc resolves it (nvcc may be a wrapper script).
toolkit_include="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 \
  | sed -n '/^#\$ INCLUDES="-I/{s/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p;q}' || true)"

solver_include=""
if [[ -n "${SAP_FAST_CUDA_HEADERS:-}" ]]; then
  solver_include="$SAP_FAST_CUDA_HEADERS"
  [[ -f "$solver_include/cusolverDn.h" ]] || { echo "check_cuda: no cusolverDn.h in SAP_FAST_CUDA_HEADERS=$solver_include" >&2; exit 2; }
elif [[ -n "$toolkit_include" && -f "$toolkit_include/cusolverDn.h" ]]; then
  : # a full toolkit: nvcc finds them by itself
elif [[ -f "$CACHE/nvidia/cu13/include/cusolverDn.h" && -f "$CACHE/nvidia/cu13/include/cublas_api.h" ]]; then
  solver_include="$CACHE/nvidia/cu13/include"
else
  echo "check_cuda: fetching cuSOLVER/cuBLAS headers into $CACHE (once)"
  mkdir -p "$CACHE/wheels"
  "$PYTHON" -m pip download --quiet --no-deps -d "$CACHE/wheels" nvidia-cusolver nvidia-cublas || {
    echo "check_cuda: could not download the nvidia-cusolver/nvidia-cublas wheels; point" \
      "SAP_FAST_CUDA_HEADERS at a directory with cusolverDn.h and cublas_api.h instead" >&2
    exit 2
  }
  for wheel in "$CACHE"/wheels/nvidia_cusolver-*.whl "$CACHE"/wheels/nvidia_cublas-*.whl; do
    echo "check_cuda: headers from $(basename "$wheel")"
    # Only the headers: the wheels are mostly shared libraries (hundreds of MB).
    "$PYTHON" - "$wheel" "$CACHE" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith("nvidia/cu13/include/")]
    if not members:
        sys.exit(f"check_cuda: {wheel} has no nvidia/cu13/include/ (not a CUDA 13 build?)")
    z.extractall(dest, members)
EOF
  done
  rm -rf "$CACHE/wheels"
  solver_include="$CACHE/nvidia/cu13/include"
  [[ -f "$solver_include/cusolverDn.h" ]] || { echo "check_cuda: cusolverDn.h missing after the fetch" >&2; exit 2; }
fi

flags=(-c -o /dev/null -std=c++20 "${arch_flags[@]}"
  # torch.utils.cpp_extension.COMMON_NVCC_FLAGS, as a torch extension build passes them.
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  # CPU torch wheels ship c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h
  # (it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows): skip its include.
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
  -DSAP_FAST_WITH_CUDA=1 -Xcompiler -fPIC -I"$ROOT/csrc" -I"$ROOT/csrc/cuda" -isystem "$python_include")
for dir in "${torch_includes[@]}"; do flags+=(-isystem "$dir"); done
[[ -n "$solver_include" ]] && flags+=(-isystem "$solver_include")

# --- the files ----------------------------------------------------------------------------------
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# A .cuh must stand alone: include it first, and instantiate the Gram kernels for every
# (input, accumulation) pair the binding uses.
for header in "$ROOT"/csrc/cuda/*.cuh; do
  [[ -e "$header" ]] || continue
  name="$(basename "$header" .cuh)"
  {
    echo "#include \"$header\""
    if [[ "$name" == conv_gram_kernels ]]; then
      cat <<'EOF'
namespace sc = sap_fast::cuda;
using Tiling = sc::DefaultGramTiling;
template void sc::tile_grid_size<Tiling>(const sc::ConvGramShape&, int64_t, int64_t*);
void* const kKernels[] = {
    reinterpret_cast<void*>(&sc::conv_gram_tile_kernel<float, float, Tiling>),
    reinterpret_cast<void*>(&sc::conv_gram_tile_kernel<float, double, Tiling>),
    reinterpret_cast<void*>(&sc::conv_gram_tile_kernel<double, double, Tiling>),
    reinterpret_cast<void*>(&sc::conv_gram_tile_kernel<double, float, Tiling>),
    reinterpret_cast<void*>(&sc::conv_gram_dmma_kernel<float, Tiling>),
    reinterpret_cast<void*>(&sc::conv_gram_dmma_kernel<double, Tiling>),
    reinterpret_cast<void*>(&sc::mirror_upper_to_lower_kernel<float>),
    reinterpret_cast<void*>(&sc::mirror_upper_to_lower_kernel<double>),
};
EOF
    fi
  } >"$scratch/$name.header_check.cu"
done

failed=0
check() {  # check <label> <file.cu>
  local label="$1" source="$2" start status=OK log="$scratch/log"
  start=$(date +%s%N)
  "$NVCC" "${flags[@]}" "$source" >"$log" 2>&1 || status=FAIL
  local tenths=$((($(date +%s%N) - start) / 100000000))
  printf '%-7s %-44s %4d.%d s\n' "$status" "$label" $((tenths / 10)) $((tenths % 10))
  if [[ "$status" == FAIL ]]; then
    sed 's/^/    /' "$log"
    failed=1
  fi
}

# One file at a time: nvcc on torch headers takes a few GiB and a core each.
for generated in "$scratch"/*.header_check.cu; do
  [[ -e "$generated" ]] || continue
  check "csrc/cuda/$(basename "$generated" .header_check.cu).cuh (standalone)" "$generated"
done
for source in "$ROOT"/csrc/cuda/*.cu; do
  [[ -e "$source" ]] || continue
  check "csrc/cuda/$(basename "$source")" "$source"
done

# The same kernels as the cupy backend builds them (NVRTC: no host headers, device code only).
"$PYTHON" "$ROOT/tools/check_nvrtc.py" || failed=1

# Their machine code: registers and spills of each kernel, DMMA in the tensor-core tiles.
NVCC="$NVCC" "$PYTHON" "$ROOT/tools/check_cuda_sass.py" ${SAP_FAST_SASS_ARCH:-sm_90} || failed=1

exit "$failed"
