#!/usr/bin/env bash
# The native build with SAP_FAST_CUDA=ON, configured, compiled and linked on a machine without a
# GPU, the way a GPU user's `pip install` runs it (setup.py's configure command, CMakeLists.txt):
# against the torch of the GPU machines (2.11.0+cu130, its CMake files, headers and libraries)
# and the CUDA 13.0 component wheels that torch pins (cuSOLVER, cuBLAS headers, NVRTC, runtime),
# laid out as pip installs them (site-packages/torch, site-packages/nvidia/cu13), beside an
# nvcc-only toolkit. The wheels are fetched once with `pip download --no-deps` into
# build/cuda-build/wheels and unpacked (only what the build reads) into build/cuda-build/site;
# nothing is installed.
#
# Proves: torch's CUDA CMake config loads beside this toolkit; CMake finds cusolverDn.h,
# libcusolver and libnvrtc in the nvidia wheels; every csrc/cuda/*.cu compiles for the asked
# architectures with the flags torch adds; build_info()'s SAP_FAST_CUDA_ARCHS names exactly those
# architectures; _C links, and every symbol it needs (but Python's) is defined by the libraries
# it records (torch, c10_cuda, the CUDA runtime, cuSOLVER, the C/C++ runtime).
# Does not prove: that _C loads or runs (no driver, no GPU), nor its numerics (the GPU tests).
#
#   tools/check_cuda_build.sh          # one line per step, exit 1 on a failure
#
# Environment:
#   SAP_FAST_CHECK_ARCH   TORCH_CUDA_ARCH_LIST to build for; default "9.0" (H100)
#   SAP_FAST_CHECK_DIR    where wheels, the unpacked site and the build go; default build/cuda-build
#   NVCC                  default: nvcc on PATH
#   PYTHON                default: python3 (needs pybind11, cmake and ninja; its torch is not used)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
NVCC="${NVCC:-nvcc}"
ARCHS="${SAP_FAST_CHECK_ARCH:-9.0}"
DIR="${SAP_FAST_CHECK_DIR:-$ROOT/build/cuda-build}"
TORCH_PIN="torch==2.11.0"  # the GPU machines' torch (+cu130 on PyPI), and what its cuda-toolkit 13.0.2 pins:
CUDA_PINS=(nvidia-cusolver==12.0.4.66 nvidia-cublas==13.1.0.3 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96)

command -v "$NVCC" >/dev/null || { echo "check_cuda_build: $NVCC not found (set NVCC=/path/to/nvcc)" >&2; exit 2; }
NVCC="$(command -v "$NVCC")"
start_all=$(date +%s)
step() {  # step <label> <start seconds>
  printf '%-7s %-58s %4d s\n' OK "$1" $(($(date +%s) - $2))
}
fail() {
  printf '%-7s %s\n' FAIL "$1"
  [[ -n "${2:-}" && -f "$2" ]] && tail -n 40 "$2" | sed 's/^/    /'
  exit 1
}

# --- the wheels, once ----------------------------------------------------------------------------
t=$(date +%s)
mkdir -p "$DIR/wheels"
PINS="$TORCH_PIN ${CUDA_PINS[*]}"
if [[ "$(cat "$DIR/wheels/.pins" 2>/dev/null)" != "$PINS" ]]; then
  rm -rf "$DIR/wheels" "$DIR/site"
  mkdir -p "$DIR/wheels"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$DIR/wheels" "$TORCH_PIN" "${CUDA_PINS[@]}" \
    >"$DIR/download.log" 2>&1 || fail "pip download $PINS" "$DIR/download.log"
  echo "$PINS" >"$DIR/wheels/.pins"
fi
step "wheels: $TORCH_PIN, ${CUDA_PINS[*]}" "$t"

# --- site-packages as pip lays it out, with only what the build reads ------------------------------
t=$(date +%s)
SITE="$DIR/site"
if [[ ! -f "$SITE/.complete" ]]; then
  rm -rf "$SITE"
  mkdir -p "$SITE"
  "$PYTHON" - "$DIR/wheels" "$SITE" <<'EOF' || fail "unpack the wheels into $SITE"
import glob, os, sys, zipfile
wheels, site = sys.argv[1], sys.argv[2]
# torch: CMake files, headers, the libraries its CMake targets name (the rest, e.g. cuDNN, is
# loaded at run time only)
torch_keep = ("torch/share/", "torch/include/", "torch/version.py")
torch_libs = {"libc10.so", "libc10_cuda.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so",
              "libtorch_nvshmem.so", "libtorch_global_deps.so", "libshm.so", "libtorch_python.so",
              "libcaffe2_nvrtc.so"}
nvidia_libs = ("libcusolver.so.", "libnvrtc.so.", "libcudart.so.")
for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("/") and (
            n.startswith(torch_keep) or (n.startswith("torch/lib/") and os.path.basename(n) in torch_libs)
            or n.startswith("nvidia/cu13/include/")
            or (n.startswith("nvidia/cu13/lib/") and os.path.basename(n).startswith(nvidia_libs)))]
        z.extractall(site, names)
EOF
  touch "$SITE/.complete"
fi
for need in torch/share/cmake/Torch/TorchConfig.cmake nvidia/cu13/include/cusolverDn.h; do
  [[ -f "$SITE/$need" ]] || fail "unpacked site lacks $need"
done
step "site: torch $(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$SITE/torch/version.py") + nvidia/cu13 in ${SITE#$ROOT/}" "$t"

# --- configure with setup.py's own command --------------------------------------------------------
t=$(date +%s)
BUILD="$DIR/native"
OUT="$DIR/out"
rm -rf "$BUILD" "$OUT"
"$PYTHON" - "$ROOT" "$BUILD" "$OUT" "$SITE/torch/share/cmake" "$NVCC" "$ARCHS" >"$DIR/configure.log" 2>&1 <<'EOF' \
  || fail "configure (SAP_FAST_CUDA=ON, TORCH_CUDA_ARCH_LIST=$ARCHS): ${DIR#$ROOT/}/configure.log" "$DIR/configure.log"
import importlib.util, os, shutil, sys
root, build, out, prefix, nvcc, archs = sys.argv[1:]
spec = importlib.util.spec_from_file_location("sap_fast_setup", os.path.join(root, "setup.py"))
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)  # the module's functions only: setup() runs under __main__
names = [a for a in archs.replace(",", ";").replace(" ", ";").split(";") if a]
args, env = setup.cmake_configure(build, out, prefix, True, nvcc, names)
setup.run_cmake_configure(shutil.which("cmake"), [*args, "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"], {**os.environ, **env})
EOF
grep -h "^sap_fast:\|-- sap_fast:" "$DIR/configure.log" | sed 's/^-- /    /; s/^sap_fast/    sap_fast/'
step "configure: torch's CUDA CMake, cuSOLVER + NVRTC found" "$t"

# --- the architectures asked, flagged and reported agree -----------------------------------------
"$PYTHON" - "$BUILD" "$ARCHS" <<'EOF' || fail "architectures"
import json, os, re, sys
build, archs = sys.argv[1:]
want = set()
for name in (a for a in archs.replace(",", ";").replace(" ", ";").split(";") if a):
    number = name.replace("+PTX", "").replace(".", "")
    want.add(f"sm_{number}")
    if name.endswith("+PTX"):
        want.add(f"compute_{number}")
cache = open(os.path.join(build, "CMakeCache.txt")).read()
reported = re.search(r"^SAP_FAST_CUDA_ARCHS:INTERNAL=(.*)$", cache, re.M).group(1)
commands = [e["command"] for e in json.load(open(os.path.join(build, "compile_commands.json")))
            if e["file"].endswith(".cu")]
problems = []
if set(reported.split(",")) != want:
    problems.append(f"build_info would report {reported!r}, asked {sorted(want)}")
for command in commands:
    flagged = set()
    for code in re.findall(r"(?<![\w-])code=(\[[^\]]*\]|[^ \"]+)", command):
        flagged.update(code.strip("[]").split(","))
    if flagged != want:
        problems.append(f"nvcc is given {sorted(flagged)}, asked {sorted(want)}: {command[:200]}")
    if f'-DSAP_FAST_CUDA_ARCHS=\\"{reported}\\"' not in command:
        problems.append(f"SAP_FAST_CUDA_ARCHS={reported} is not defined for {command[-80:]}")
if problems:
    sys.exit("\n".join("    " + p for p in problems))
print(f"OK      build_info() cuda_archs = {reported!r}, as asked and as nvcc is flagged ({len(commands)} .cu)")
EOF

# --- compile and link -----------------------------------------------------------------------------
t=$(date +%s)
cmake --build "$BUILD" ${MAX_JOBS:+--parallel "$MAX_JOBS"} >"$DIR/build.log" 2>&1 \
  || fail "build: ${DIR#$ROOT/}/build.log" "$DIR/build.log"
awk 'NR > 1 && $4 ~ /\.(cu|cpp)\.o$|\.so$/ {printf "    %5.1f s  %s\n", ($2 - $1) / 1000, $4}' "$BUILD/.ninja_log" \
  | sed "s|$ROOT/||; s|CMakeFiles/_C.dir/||"
step "compile every .cu and .cpp, link _C" "$t"

# --- every symbol _C needs is defined by what it links --------------------------------------------
t=$(date +%s)
SO="$(ls "$OUT"/_C*.so)"
"$PYTHON" - "$SO" "$SITE" <<'EOF' || fail "undefined symbols"
import os, subprocess, sys
so, site = sys.argv[1:]
def symbols(path, defined):
    out = subprocess.run(["nm", "-D", "--defined-only" if defined else "--undefined-only", path],
                         check=True, capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if defined or parts[0] == "U":  # weak references may stay unresolved
            found.add(parts[-1].split("@")[0])
    return found
needed_libs = [l.split("[")[1].rstrip("]") for l in subprocess.run(["readelf", "-d", so], check=True,
               capture_output=True, text=True).stdout.splitlines() if "(NEEDED)" in l]
search = [os.path.join(site, "torch", "lib"), os.path.join(site, "nvidia", "cu13", "lib")]
paths = []
for name in needed_libs:
    local = [os.path.join(d, name) for d in search if os.path.exists(os.path.join(d, name))]
    if not local:
        system = subprocess.run(["gcc", "-print-file-name=" + name], capture_output=True, text=True).stdout.strip()
        local = [os.path.realpath(system)] if os.path.isabs(system) else []
    if not local:  # e.g. ld-linux-x86-64.so.2
        local = [p for p in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout.split()
                 if p.endswith("/" + name)]
    if not local:
        sys.exit(f"    _C needs {name}, found neither in {search} nor on the system")
    paths.append(local[0])
defined = set()
for path in paths:
    defined |= symbols(path, True)
missing = sorted(s for s in symbols(so, False) - defined if not s.startswith(("Py", "_Py")))
if missing:
    sys.exit("    undefined in every library _C records:\n" + "\n".join("      " + s for s in missing[:40]))
print(f"OK      every symbol of _C but Python's is defined by {', '.join(needed_libs)}")
EOF
step "symbols" "$t"
echo "check_cuda_build: all OK in $(($(date +%s) - start_all)) s"
