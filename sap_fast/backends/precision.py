"""Input precisions of the Gram, and the rounding that stands for them.

``input_precision`` (of :func:`sap_fast.collect_stats`): ``"fp32"`` (activations as they are),
``"tf32"`` or ``"bf16"`` (rounded to the tensor-core input formats: 10 or 7 explicit mantissa
bits, round to nearest even). Every kernel and the portable path round the same way, by
:func:`round_inputs`, so a precision mode means one value wherever it runs.
"""
from __future__ import annotations

import torch

__all__ = ["INPUT_PRECISIONS", "round_inputs", "kernel_mode"]

INPUT_PRECISIONS = ("fp32", "tf32", "bf16")


def round_inputs(t: torch.Tensor, precision: str) -> torch.Tensor:
    """The operands of a precision mode: ``"fp64"`` → float64; ``"fp32"`` → float32; ``"tf32"``
    and ``"bf16"`` → the float32 value rounded to nearest even to that format, as float32."""
    if precision == "fp64":
        return t.to(torch.float64)
    t = t.to(torch.float32)
    if precision == "bf16":
        return t.to(torch.bfloat16).to(torch.float32)
    if precision == "tf32":  # round-to-nearest-even on the 13 dropped mantissa bits
        bits = t.contiguous().view(torch.int32)
        bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
        return bits.view(torch.float32)
    return t


def kernel_mode(dtype: torch.dtype, input_precision: str) -> str:
    """The kernels' mode for a Gram dtype and an input precision: ``"fp64"`` (fp32 inputs into a
    float64 Gram), ``"fp32"``, ``"tf32"`` or ``"bf16"``."""
    if input_precision == "fp32":
        return "fp64" if dtype == torch.float64 else "fp32"
    return input_precision
