"""Compile-check the CUDA kernel sources with NVRTC, as the cupy backend compiles them at run time.

Compiles every source of ``sap_fast.backends.nvrtc.KERNEL_SOURCES`` (the files and template
instantiations the backend uses: one list, so the check cannot drift from the backend) to a cubin
for each architecture, and prints one line per file and architecture:

    OK      csrc/cuda/conv_gram_kernels.cuh nvrtc sm_80      1.4 s

or ``FAIL`` followed by NVRTC's log, and exits 1. NVRTC needs no GPU and no driver: only cupy's
NVRTC binding and the NVRTC library. When they do not import, this installs them into the current
Python first (cupy-cuda13x and the CUDA 13 nvidia-cuda-nvrtc wheel; for an installed cupy-cuda12x,
the CUDA 12 NVRTC wheel), then runs again.

    python tools/check_nvrtc.py [ARCH ...]     # default: $SAP_FAST_NVRTC_ARCH, else sm_80 sm_90

Run by tools/check_cuda.sh (``make check-cuda``) after the nvcc checks.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARCHS = ("sm_80", "sm_90")
_RERUN = "SAP_FAST_CHECK_NVRTC_INSTALLED"  # set once the install has been tried


def _nvrtc_loads() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return True
    except Exception:
        return False


def _packages_to_install() -> list:
    """What makes cupy's NVRTC binding load here, keeping a cupy flavour that is installed."""
    installed = set()
    for name in ("cupy-cuda13x", "cupy-cuda12x"):
        try:
            importlib.metadata.version(name)
            installed.add(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "cupy-cuda12x" in installed and "cupy-cuda13x" not in installed:
        return ["nvidia-cuda-nvrtc-cu12"]
    return (["cupy-cuda13x"] if not installed else []) + ["nvidia-cuda-nvrtc>=13,<14"]


def ensure_nvrtc() -> None:
    if _nvrtc_loads():
        return
    if os.environ.get(_RERUN):
        sys.exit("check_nvrtc: cupy's NVRTC still does not load after installing "
                 f"{_packages_to_install()}; install cupy-cuda13x and nvidia-cuda-nvrtc by hand")
    packages = _packages_to_install()
    print(f"check_nvrtc: installing {' '.join(packages)} (once) for the NVRTC compile check", flush=True)
    status = subprocess.call([sys.executable, "-m", "pip", "install", "-q", *packages])
    if status != 0:
        sys.exit(f"check_nvrtc: pip install {' '.join(packages)} failed (exit {status})")
    # a fresh interpreter: a failed import of cupy's NVRTC binding is not retried in this one
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, _RERUN: "1"})


def main(argv) -> int:
    archs = argv or [a for a in os.environ.get("SAP_FAST_NVRTC_ARCH", "").replace(",", " ").replace(";", " ").split()
                     if a] or list(DEFAULT_ARCHS)
    ensure_nvrtc()
    sys.path.insert(0, ROOT)  # the checkout's sap_fast and csrc/, whatever is installed
    from sap_fast.backends import nvrtc

    failed = 0
    for name in nvrtc.KERNEL_SOURCES:
        label = os.path.relpath(nvrtc.source_path(name, [nvrtc.CHECKOUT_SOURCE_DIR]), ROOT)
        for arch in archs:
            start = time.perf_counter()
            try:
                nvrtc.compile_source(name, arch, [nvrtc.CHECKOUT_SOURCE_DIR])
                status, log = "OK", ""
            except nvrtc.CompileError as err:
                status, log = "FAIL", str(err)
            text = f"{label} nvrtc {nvrtc.gpu_arch(arch)}"
            print(f"{status:<7} {text:<44} {time.perf_counter() - start:6.1f} s", flush=True)
            if log:
                print("\n".join("    " + line for line in log.splitlines()), flush=True)
                failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
