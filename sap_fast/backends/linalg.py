"""The spectrum's eigendecomposition and the solve's Cholesky factorisation: each stage's
implementations, its chooser, and the call.

- :func:`eigh` (the eigh stage, :data:`EIGH`): ``torch.linalg.eigh``'s contract for a batch of
  symmetric Grams. ``"cupy-syevj"``: one cuSOLVER ``syevjBatched`` call through cupy for CUDA
  batches with n ≤ 32 (``SAP_FAST_BATCHED_EIGH=cupy``); ``"native"``: the CMake-built cuSOLVER
  op (batched syevj / syevd on streams) for CUDA Grams; ``"torch"``: ``torch.linalg.eigh``.
  Default: the CMake-built op where the extension has CUDA, else torch.
- :func:`cholesky_ex` (the cholesky stage, :data:`CHOLESKY`): ``torch.linalg.cholesky_ex``'s
  contract. ``"cupy-potrf"``: one ``potrfBatched`` call through cupy for CUDA batches
  (``SAP_FAST_BATCHED_CHOLESKY=cupy``); ``"torch"``: ``torch.linalg.cholesky_ex`` (default).

:mod:`.batched_linalg` holds the cupy calls and their switches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import batched_linalg, dispatch
from .dispatch import Implementation, Stage
from .native import why_not as native_why_not

__all__ = ["EIGH", "CHOLESKY", "LinalgCall", "eigh", "cholesky_ex", "eigh_call", "cholesky_call"]


@dataclass(frozen=True)
class LinalgCall:
    """One call of the eigh or cholesky stage: the batch's device, matrix size n and dtype, the
    stage's switch, and the tensor (None where :func:`sap_fast.backend_info` asks the chooser)."""
    device_type: str
    n: int
    dtype: torch.dtype
    choice: str
    matrices: Optional[torch.Tensor] = None

    def describe(self) -> str:
        """One line: the device, the size class (n ≤ 32 is where syevjBatched can serve) and dtype."""
        size = f"n ≤ {batched_linalg.MAX_JACOBI_SIZE}" if self.n <= batched_linalg.MAX_JACOBI_SIZE else \
            f"n > {batched_linalg.MAX_JACOBI_SIZE}"
        return f"{self.device_type} batch of {size} {str(self.dtype).replace('torch.', '')} matrices"


def eigh_call(gram: Optional[torch.Tensor], device_type: Optional[str] = None, n: Optional[int] = None,
              dtype: Optional[torch.dtype] = None) -> LinalgCall:
    """The eigh stage's :class:`LinalgCall` for ``gram``, or for a batch described by
    ``device_type``, ``n`` and ``dtype``."""
    return _call(gram, device_type, n, dtype, batched_linalg.eigh_choice())


def cholesky_call(m: Optional[torch.Tensor], device_type: Optional[str] = None, n: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None) -> LinalgCall:
    """The cholesky stage's :class:`LinalgCall` (as :func:`eigh_call`)."""
    return _call(m, device_type, n, dtype, batched_linalg.cholesky_choice())


def _call(t, device_type, n, dtype, choice) -> LinalgCall:
    if t is not None:
        device_type, n, dtype = t.device.type, t.shape[-1], t.dtype
    return LinalgCall(device_type, n, dtype, choice, t)


def _native_cuda_reasons(call: LinalgCall) -> List[str]:
    if call.device_type != "cuda":
        return [f"the CMake-built cuSOLVER op runs on CUDA tensors, not {call.device_type}"]
    why = native_why_not(cuda=True)
    return [why] if why else []


EIGH = Stage("eigh", (
    Implementation("cupy-syevj", "cupy: cuSOLVER syevjBatched (one call per batch)",
                   lambda c: batched_linalg.eigh_reasons(c.device_type, c.n, c.choice, dtype=c.dtype),
                   lambda c: batched_linalg.eigh(c.matrices)),
    Implementation("native", "native: cuSOLVER syevd / batched syevj", _native_cuda_reasons,
                   lambda c: torch.ops.sap_fast.eigh(c.matrices)),
    Implementation("torch", "portable: torch.linalg.eigh", lambda c: [],
                   lambda c: torch.linalg.eigh(c.matrices)),
))

CHOLESKY = Stage("cholesky", (
    Implementation("cupy-potrf", "cupy: cuSOLVER potrfBatched (one call per batch)",
                   lambda c: batched_linalg.cholesky_reasons(c.device_type, c.choice, dtype=c.dtype),
                   lambda c: batched_linalg.cholesky_ex(c.matrices)),
    Implementation("torch", "portable: torch.linalg.cholesky_ex", lambda c: [],
                   lambda c: torch.linalg.cholesky_ex(c.matrices)),
))


def eigh(gram: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(gram)`` (ascending eigenvalues, eigenvectors as columns) of a batch of
    symmetric matrices, by the implementation :data:`EIGH` chooses for it."""
    return dispatch.call(EIGH, eigh_call(gram))


def cholesky_ex(m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex(m)`` (L, info; no host synchronisation) of a batch, by the
    implementation :data:`CHOLESKY` chooses for it."""
    return dispatch.call(CHOLESKY, cholesky_call(m))
