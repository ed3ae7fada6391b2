"""The device × dtype axis of the kernel tests, stated once: where a kernel runs, what it
multiplies and accumulates in, and how close it must come to the float64 oracle.

Devices (:data:`DEVICES`): ``"cpu"`` always, ``"cuda"`` where a GPU is visible. A Triton kernel
runs on the CPU only under Triton's interpreter (:func:`triton_devices`); the C++ CPU kernels
only on the CPU (:data:`CPU`).

Modes (:data:`MODES`, the Triton kernels' ``precision``): what the inputs are rounded to and
what the products are summed in (:data:`DTYPE`). Tolerances (:data:`TOL`), against the float64
oracle of the mode's own inputs (rounded as the mode rounds them):

- ``fp64``: float32 or float64 inputs, float64 sums: 1e-12 (fp32 products are exact in fp64;
  only the sums round, in another order; observed ~1e-16);
- ``fp32``: float32 sums: 1e-5 (a few hundred fp32 products per entry: γ_n ≈ n·6e-8 worst
  case, observed ~1e-7);
- ``tf32``, ``bf16``: inputs rounded to 11 / 8 significant bits (:data:`SIGNIFICANT_BITS`),
  float32 sums: 1e-5 (products of rounded values are exact in fp32, so the fp32 bound holds).

Two tighter comparisons, by output dtype: a twin that evaluates the same formula in the same
dtype, only summing in another order (:data:`SAME_FORMULA_TOL`: 1e-12 in float64, 1e-6 in
float32), and a float64 result rounded once to the output dtype (:data:`ONE_ROUNDING_TOL`:
1e-14, 1e-7). The pipeline's corrected weights against the oracle's (tests/core/
test_vs_reference.py) are held to :data:`WEIGHT_TOL` (relative, every weight): float64
accumulation 1e-8, float32 accumulation 1e-3 at α = 1e3.

Kernel tests parametrize over :func:`devices_param` (``device``) and :func:`modes_param`
(``precision``) or :func:`dtypes_param` (``dtype``), so a new device or mode reaches all of them.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

import pytest
import torch

DEVICES: List[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CPU: List[str] = ["cpu"]

MODES = ("fp64", "fp32", "tf32", "bf16")
DTYPE = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32, "bf16": torch.float32}
SIGNIFICANT_BITS = {"tf32": 11, "bf16": 8}
TOL = {"fp64": 1e-12, "fp32": 1e-5, "tf32": 1e-5, "bf16": 1e-5}

DTYPES = (torch.float64, torch.float32)  # the accumulation dtypes: fp64 and fp32 modes
MODE_OF = {torch.float64: "fp64", torch.float32: "fp32"}
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32"}
SAME_FORMULA_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
ONE_ROUNDING_TOL = {torch.float64: 1e-14, torch.float32: 1e-7}
WEIGHT_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}


def tol(mode_or_dtype) -> float:
    """:data:`TOL` of a mode (``"fp32"``) or an accumulation dtype (``torch.float32``)."""
    return TOL[MODE_OF.get(mode_or_dtype, mode_or_dtype)]


def triton_devices(module) -> List[str]:
    """The devices a Triton kernel module runs on: the CPU under the interpreter, CUDA where
    visible."""
    return [d for d in DEVICES if d != "cpu" or module.interpreted()]


def devices_param(devices: Sequence[str] = DEVICES):
    return pytest.mark.parametrize("device", list(devices))


def modes_param(modes: Iterable[str] = MODES):
    return pytest.mark.parametrize("precision", list(modes))


def dtypes_param(dtypes: Iterable[torch.dtype] = DTYPES):
    dtypes = list(dtypes)
    return pytest.mark.parametrize("dtype", dtypes, ids=[DTYPE_IDS[d] for d in dtypes])
