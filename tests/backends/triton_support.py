"""The one preamble of every test module of a Triton kernel: import the kernel module where it
can run, or skip the whole module saying why.

Without CUDA the kernels run in Triton's CPU interpreter. ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel module is imported, so tests/conftest.py sets it before any
test module is imported; a kernel module imported before that (by a plugin, or with the
variable set to something else) cannot run here, and the skip reason says so.
"""
from __future__ import annotations

import importlib
import os
from typing import List, Tuple

import pytest

from cases import triton_devices


def kernel_module(name: str) -> Tuple[object, List[str]]:
    """``(sap_fast.backends.triton.<name>, devices)``: the devices its tests run on
    (tests/cases.py: ``"cpu"`` under the interpreter, ``"cuda"`` where a GPU is visible). Skips the calling test module
    when Triton is missing or there is nowhere to run."""
    full = f"sap_fast.backends.triton.{name}"
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    module = importlib.import_module(full)
    devices = triton_devices(module)
    if not devices:
        why = (f"{full} was imported before TRITON_INTERPRET=1 was set (set it in tests/conftest.py or "
               "the environment)" if os.environ.get("TRITON_INTERPRET") == "1" else "TRITON_INTERPRET is not 1")
        pytest.skip(f"no CUDA and no Triton interpreter: {why}", allow_module_level=True)
    return module, devices


def update_stage_that_fails_to_compile():
    """An update stage whose Triton implementation fails as ptxas does (out of shared memory)
    ahead of a torch one that returns ``"torch"``: the chooser's compile fallback under test."""
    from sap_fast.backends.dispatch import Implementation, Stage

    OutOfResources = pytest.importorskip("triton.runtime.errors").OutOfResources

    def refused(inputs):
        raise OutOfResources(300000, 232448, "shared memory")

    return Stage("update", (Implementation("triton", "triton", lambda inputs: [], refused, triton_kernel="update"),
                            Implementation("torch", "torch", lambda inputs: [], lambda inputs: "torch")))
