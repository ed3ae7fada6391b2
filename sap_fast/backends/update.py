"""The project stage's update ``Ŵ = W U diag(λ) Uᵀ``: its implementations, its chooser, and the
call (:func:`projected_update`).

- ``"triton"``: the λ-scaled update fused with its two products (:mod:`.triton.update`; λ is
  formed inside the kernel), for CUDA tensors where Triton runs; a kernel that fails to compile
  here falls through to torch (:mod:`.dispatch`);
- ``"torch"``: torch matmuls, ``W − (W U) diag(1 − λ) Uᵀ`` with a full basis (at large α most λ
  are ≈ 1 and ``1 − λ`` is small), ``(W U) diag(λ) Uᵀ`` with a thin one. The kernel's tests hold
  it to this path.

Default: Triton on CUDA tensors, torch elsewhere; ``SAP_FAST_BACKEND=portable`` selects torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from . import dispatch, triton
from .dispatch import Implementation, Stage

__all__ = ["UPDATE", "UpdateCall", "projected_update", "importance"]


def importance(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """λ = α s / ((α − 1) s + 1): ≈ 1 where s ≫ 1/α, ≈ α s where s ≪ 1/α."""
    return alpha * s / ((alpha - 1.0) * s + 1.0)


@dataclass(frozen=True)
class UpdateCall:
    """One call of the update stage: ``weight`` ``W`` ``(groups, out, d)``, ``wu`` ``W U``,
    ``basis`` ``U`` ``(groups, d, r)``, ``eigvals`` ``e`` and ``energies`` ``s = e / Σe``
    ``(groups, r)``, ``alpha``, ``full`` (``r == d``: the careful form). Tensors may be None
    where :func:`sap_fast.backend_info` asks the chooser (``device_type`` then says where)."""
    device_type: str
    alpha: float = 1.0
    full: bool = True
    weight: Optional[torch.Tensor] = None
    wu: Optional[torch.Tensor] = None
    basis: Optional[torch.Tensor] = None
    eigvals: Optional[torch.Tensor] = None
    energies: Optional[torch.Tensor] = None

    def describe(self) -> str:
        return f"{self.device_type} update, {'full' if self.full else 'thin'} basis"


def _triton_reasons(call: UpdateCall) -> List[str]:
    if call.device_type != "cuda":
        return [f"the fused update runs on CUDA tensors, not {call.device_type}"]
    why = triton.why_not("update", "cuda")
    return [why] if why else []


def _run_triton(call: UpdateCall) -> torch.Tensor:
    return triton.load("update")[0].scaled_update(call.weight, call.wu, call.basis, call.eigvals, call.alpha,
                                                  full=call.full)


def _run_torch(call: UpdateCall) -> torch.Tensor:
    lam = importance(call.energies, call.alpha).unsqueeze(-2)  # (groups, 1, r)
    if call.full:
        return call.weight - (call.wu * (1.0 - lam)) @ call.basis.transpose(-1, -2)
    return (call.wu * lam) @ call.basis.transpose(-1, -2)


UPDATE = Stage("update", (
    Implementation("triton", "triton: fused λ-scaled update", _triton_reasons, _run_triton,
                   triton_kernel="update"),
    Implementation("torch", "portable: torch matmuls", lambda call: [], _run_torch),
))


def projected_update(weight: torch.Tensor, wu: torch.Tensor, basis: torch.Tensor, eigvals: torch.Tensor,
                     energies: torch.Tensor, alpha: float, full: bool) -> torch.Tensor:
    """``W U diag(λ) Uᵀ`` ``(groups, out, d)`` with ``λ = importance(energies, alpha)``, by the
    implementation :data:`UPDATE` chooses (see the module docstring)."""
    return dispatch.call(UPDATE, UpdateCall(weight.device.type, alpha, full, weight, wu, basis, eigvals,
                                            energies))
