"""What a GPU machine holds for sap_fast, one line per item, before anything is built or run.

    python3 benchmarks/gpu_probe.py            # prints the lines; exit 0 when the native CUDA build can run
    python3 benchmarks/gpu_probe.py --json F   # also writes them as JSON

Items: the GPU (torch's name, multiprocessors, compute capability), the driver's CUDA version
(nvidia-smi), nvcc, cuSOLVER's header ``cusolverDn.h`` and library ``libcusolver``, the NVRTC
library ``libnvrtc``, cmake and ninja, and the versions of torch (with its CUDA), Triton and cupy.
The native CUDA build needs nvcc, the cuSOLVER header and library, NVRTC, cmake, ninja and a
CUDA build of torch; each one missing is one ``missing:`` line that says what it stops, and
the exit status is 3 (benchmarks/gpu_suite.sh then skips the build and carries on with the
Triton, cupy and portable routes). Nothing here fails: a probe that cannot answer says so.

The headers and libraries are looked for where the CMake build looks: the toolkit of nvcc
(``CUDA_HOME``, else nvcc's own folder), then the NVIDIA wheels beside torch
(``site-packages/nvidia/cu13``, ``nvidia/cusolver``, ``nvidia/cuda_nvrtc``, ...).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
from typing import List, Optional


def _run(argv: List[str]) -> Optional[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def toolkit_roots() -> List[str]:
    """The CUDA toolkit folders to search: CUDA_HOME/CUDA_PATH, nvcc's parent, /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    roots.append("/usr/local/cuda")
    return [r for i, r in enumerate(roots) if r and os.path.isdir(r) and r not in roots[:i]]


def wheel_roots() -> List[str]:
    """The NVIDIA component wheels' folders in every site-packages (torch's CUDA wheels use them)."""
    out = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        for root in sorted(glob.glob(os.path.join(base, "nvidia", "*"))):
            if os.path.isdir(root):
                out.append(root)
    return out


def locate(patterns: List[str], subdirs: List[str]) -> Optional[str]:
    """The first file matching one of ``patterns`` in ``subdirs`` of a toolkit or wheel root."""
    for root in toolkit_roots() + wheel_roots():
        for sub in subdirs:
            for pattern in patterns:
                hits = sorted(glob.glob(os.path.join(root, sub, pattern)))
                if hits:
                    return hits[0]
    return None


INCLUDE = ["include", "targets/x86_64-linux/include", "targets/sbsa-linux/include"]
LIB = ["lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"]


def probe() -> dict:
    items, missing = {}, []

    def need(key: str, value: Optional[str], stops: str) -> None:
        items[key] = value
        if not value:
            missing.append(f"{key} ({stops})")

    try:
        import torch
        items["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            items["gpu"] = f"{p.name}, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"
        else:
            items["gpu"] = None
            missing.append("gpu (torch sees no GPU: every GPU phase measures nothing)")
        if torch.version.cuda is None:
            missing.append("a CUDA build of torch (the native CUDA build and every GPU route)")
    except Exception as err:  # noqa: BLE001 - the probe reports, never fails
        items["torch"] = None
        missing.append(f"torch ({type(err).__name__}: {err})")
    for name in ("triton", "cupy"):
        try:
            items[name] = importlib.import_module(name).__version__
        except Exception as err:  # noqa: BLE001
            items[name] = None
            missing.append(f"{name} ({type(err).__name__}: the {name} routes are off)")
    smi = _run(["nvidia-smi"])
    driver = re.search(r"CUDA Version:\s*([\d.]+)", smi or "")
    items["driver_cuda"] = driver.group(1) if driver else None
    nvcc = shutil.which("nvcc")
    version = re.search(r"release ([\d.]+)", _run([nvcc, "--version"]) or "") if nvcc else None
    need("nvcc", f"{version.group(1) if version else '?'} ({nvcc})" if nvcc else None, "no native CUDA build")
    need("cusolverDn.h", locate(["cusolverDn.h"], INCLUDE), "no native CUDA build: the cuSOLVER eigh")
    need("libcusolver", locate(["libcusolver.so*"], LIB), "no native CUDA build: the cuSOLVER eigh")
    need("libnvrtc", locate(["libnvrtc.so*"], LIB), "no native CUDA build, and cupy cannot compile the Gram kernel")
    need("cmake", shutil.which("cmake"), "no native build")
    need("ninja", shutil.which("ninja"), "no native build")
    build_blockers = [m for m in missing if "native" in m or "CUDA build of torch" in m]
    return {"items": items, "missing": missing, "native_cuda_build": not build_blockers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = probe()
    for key, value in result["items"].items():
        print(f"{'ok' if value else '--':<3} {key}: {value if value else 'not found'}")
    for line in result["missing"]:
        print(f"missing: {line}")
    print("native CUDA build: " + ("can run" if result["native_cuda_build"] else
                                   "skipped (see the missing lines); carrying on with Triton, cupy and portable"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0 if result["native_cuda_build"] else 3


if __name__ == "__main__":
    sys.exit(main())
