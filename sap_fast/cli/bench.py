"""``sap-fast bench``: the CPU benchmarks that fit this machine (they live in the source tree's
``benchmarks/``; an installed package without it says so in one line)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from ..backends.native import native


__all__ = ["add_arguments", "benchmarks_folder", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument("--tiny", action="store_true", help="smoke run on tiny shapes (seconds)")
    parser.add_argument("--out-dir", help="write the JSON results here instead of benchmarks/results")


def benchmarks_folder() -> str:
    """The source tree's ``benchmarks/`` (beside the package in a checkout or editable install)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folder = os.path.join(root, "benchmarks")
    if not os.path.isfile(os.path.join(folder, "bench_cpu.py")):
        raise FileNotFoundError("sap-fast bench runs the scripts in the source tree's benchmarks/, which "
                                "an installed package does not carry; run it from a clone of the repository "
                                "(pip install -e .)")
    return folder


def run(args: argparse.Namespace) -> int:
    folder = benchmarks_folder()
    if torch.cuda.is_available():
        print("a GPU is visible: this runs the CPU suite; the GPU benchmarks are benchmarks/gpu_suite.sh")
    scripts = []
    kernels = ["bench_native_cpu.py"] + (["--tiny"] if args.tiny else ["--quick"] if args.quick else [])
    if native() is not None:
        scripts.append((kernels, "cpu-native.json"))
    else:
        print("note: sap_fast._C is not built; skipping the native kernel benchmark")
    if not args.tiny:
        scripts.append((["bench_cpu.py"] + (["--quick"] if args.quick else []), "cpu-vs-reference.json"))
    for command, result in scripts:
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            command = command + ["--out", os.path.join(args.out_dir, result)]
        print(f"$ python benchmarks/{' '.join(command)}", flush=True)
        code = subprocess.call([sys.executable, os.path.join(folder, command[0]), *command[1:]])
        if code != 0:
            raise RuntimeError(f"benchmarks/{command[0]} failed with status {code}")
    return 0
