"""The conv Gram kernels in GPU machine code, compiled by nvcc without a GPU.

Compiles every kernel of ``sap_fast.backends.nvrtc.KERNEL_SOURCES`` (the one list of kernels and
instantiations; here nvcc instantiates each by taking its address) to a cubin for each
architecture, reads ptxas's register and spill counts and the SASS (``cuobjdump -sass``), and
prints one line per kernel:

    OK      conv_gram_dmma_kernel<float>               sm_90  regs  80  spill 0/0  DMMA 32  DFMA 0

It fails (exit 1) when a kernel spills, when a tensor-core kernel (``conv_gram_dmma_kernel``)
holds no DMMA instruction or still multiplies with DFMA, or when an FMA kernel holds a DMMA.

    python tools/check_cuda_sass.py [ARCH ...]     # default: sm_90 (the H100/H200)

Environment: ``NVCC`` (default nvcc on PATH); ``CUOBJDUMP`` (default: beside nvcc, on PATH, else
the copy Triton ships in ``triton/backends/nvidia/bin``). Run by tools/check_cuda.sh.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = "conv_gram_kernels.cuh"


def cuobjdump(nvcc: str) -> str:
    """The cuobjdump to read the cubin with; exits with one line when there is none."""
    found = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump", path=os.path.dirname(os.path.realpath(nvcc)))
    found = found or shutil.which("cuobjdump")
    if not found:
        try:
            import triton
            bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            found = bundled if os.path.exists(bundled) else None
        except ImportError:
            pass
    if not found:
        sys.exit("check_cuda_sass: no cuobjdump beside nvcc, on PATH or in Triton; set CUOBJDUMP=/path/to/cuobjdump")
    return found


def instantiations(expressions) -> str:
    """A translation unit that instantiates each kernel (taking a __global__ template's address
    instantiates it) and nothing else."""
    lines = [f'#include "{os.path.join(ROOT, "csrc", "cuda", SOURCE)}"', "void* const kKernels[] = {"]
    lines += [f"    reinterpret_cast<void*>(&{e})," for e in expressions]
    return "\n".join(lines + ["};", ""])


def ptxas_usage(log: str) -> dict:
    """mangled name -> (registers, spill stores, spill loads), from ptxas -v."""
    usage, current = {}, None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            current = entry.group(1)
            usage[current] = [None, None, None]
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills and current:
            usage[current][1:] = [int(spills.group(1)), int(spills.group(2))]
        regs = re.search(r"Used (\d+) registers", line)
        if regs and current:
            usage[current][0] = int(regs.group(1))
    return usage


def sass_counts(sass: str) -> dict:
    """mangled name -> {opcode: count} for DMMA and DFMA."""
    counts = {}
    for name, body in re.findall(r"Function : (\w+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S):
        ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", body, re.M)
        counts[name] = {op: ops.count(op) for op in ("DMMA", "DFMA")}
    return counts


def short_name(expression: str) -> str:
    """``conv_gram_dmma_kernel<float>`` from the full name expression."""
    text = expression.replace("sap_fast::cuda::", "")
    return re.sub(r",\s*DefaultGramTiling>", ">", text)


def verdict(expression: str, regs, stores, loads, counts) -> str:
    if regs is None or stores is None:
        return "ptxas reported no usage"
    if stores or loads:
        return "spills"
    if "conv_gram_dmma_kernel" in expression:
        if not counts["DMMA"]:
            return "no DMMA instruction"
        if counts["DFMA"]:
            return "DFMA beside DMMA"
    elif counts["DMMA"]:
        return "DMMA in an FMA kernel"
    return ""


def check(arch: str, nvcc: str, tool: str, expressions) -> int:
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        source, cubin = os.path.join(scratch, "kernels.cu"), os.path.join(scratch, "kernels.cubin")
        with open(source, "w") as f:
            f.write(instantiations(expressions))
        start = time.perf_counter()
        proc = subprocess.run([nvcc, "-cubin", "-o", cubin, f"-arch={arch}", "-std=c++17", "-O3",
                               "-Xptxas", "-v", source], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"FAIL    {SOURCE} nvcc {arch}\n" + "\n".join("    " + l for l in proc.stderr.splitlines()))
            return 1
        usage = ptxas_usage(proc.stderr)
        sass = sass_counts(subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout)
        seconds = time.perf_counter() - start
    for expression in expressions:
        mangled = next((m for m in usage if _mangled_part(expression) in m), None)
        regs, stores, loads = usage.get(mangled, (None, None, None))
        counts = sass.get(mangled, {"DMMA": 0, "DFMA": 0})
        why = verdict(expression, regs, stores, loads, counts)
        failed |= bool(why)
        print(f"{'FAIL' if why else 'OK':<7} {short_name(expression):<42} {arch}  regs {regs!s:>3}  "
              f"spill {stores}/{loads}  DMMA {counts['DMMA']:<3} DFMA {counts['DFMA']:<4}"
              + (f" {why}" if why else ""), flush=True)
    print(f"check_cuda_sass: {arch}, {len(expressions)} kernels, nvcc and cuobjdump {seconds:.1f} s", flush=True)
    return failed


def _mangled_part(expression: str) -> str:
    """The piece of a name expression's Itanium mangling that tells it from the others: the
    kernel's name and its float/double template arguments ("21conv_gram_tile_kernelIfd")."""
    kernel = re.search(r"::(\w+)<", expression).group(1)
    args = [a.strip() for a in expression.split("<", 1)[1].rstrip(">").split(",")]
    codes = "".join({"float": "f", "double": "d"}[a] for a in args if a in ("float", "double"))
    return f"{len(kernel)}{kernel}I{codes}"


def main(argv) -> int:
    archs = argv or ["sm_90"]
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        sys.exit("check_cuda_sass: nvcc not found (set NVCC=/path/to/nvcc)")
    tool = cuobjdump(nvcc)
    sys.path.insert(0, ROOT)
    from sap_fast.backends import nvrtc
    expressions = nvrtc.KERNEL_SOURCES[SOURCE]
    failed = 0
    for arch in archs:
        failed |= check(nvrtc.gpu_arch(arch), nvcc, tool, expressions)
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
