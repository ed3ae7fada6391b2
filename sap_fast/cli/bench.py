"""``sap-fast bench``: the CPU benchmarks that fit this machine.

The benchmark scripts live in a source checkout's ``benchmarks/``, which a wheel does not carry:
the command runs the checkout the package sits in (a clone, or an editable install of one). An
installed wheel has none, and the command stops with one line saying how to get one (exit status 2).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from ..backends.native import native

SCRIPT = "bench_cpu.py"  # the file that marks a checkout's benchmarks/ folder


__all__ = ["add_arguments", "benchmarks_folder", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument("--tiny", action="store_true", help="smoke run on tiny shapes (seconds)")
    parser.add_argument("--out-dir", help="write the JSON-lines results here instead of benchmarks/results")


class NeedsCheckout(FileNotFoundError):
    """No source checkout with a ``benchmarks/`` folder where the command looked."""


def benchmarks_folder() -> str:
    """``benchmarks/`` of the checkout the package sits in (a clone or an editable install; a
    wheel's site-packages has none: :class:`NeedsCheckout`, one line)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folder = os.path.join(root, "benchmarks")
    if not os.path.isfile(os.path.join(folder, SCRIPT)):
        raise NeedsCheckout("sap-fast bench runs the scripts in a source checkout's benchmarks/, which an "
                            "installed package does not carry: run it from a clone of the repository "
                            "(git clone the sap_fast repository, then pip install -e . in it)")
    return folder


def run(args: argparse.Namespace) -> int:
    folder = benchmarks_folder()
    if torch.cuda.is_available():
        print("a GPU is visible: this runs the CPU suite; the GPU benchmarks are benchmarks/gpu_suite.sh")
    scripts = []
    kernels = ["bench_native_cpu.py"] + (["--tiny"] if args.tiny else ["--quick"] if args.quick else [])
    if native() is not None:
        scripts.append((kernels, "cpu-native.jsonl"))
    else:
        print("note: sap_fast._C is not built; skipping the native kernel benchmark")
    if not args.tiny:
        scripts.append((["bench_cpu.py"] + (["--quick"] if args.quick else []), "cpu-vs-reference.jsonl"))
    for command, result in scripts:
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            command = command + ["--out", os.path.join(args.out_dir, result)]
        print(f"$ python benchmarks/{' '.join(command)}", flush=True)
        code = subprocess.call([sys.executable, os.path.join(folder, command[0]), *command[1:]])
        if code != 0:
            raise RuntimeError(f"benchmarks/{command[0]} failed with status {code}")
    return 0
