"""Stages 3 + 4 without an eigendecomposition: the solve route (``solver="cholesky"``).

With ``G̃ = G / tr G`` (eigenvalues ``s``, the normalised energies), SAP's projection
``Wp = U diag(λ) Uᵀ``, ``λ = α s / ((α − 1) s + 1)``, is that same rational function applied to
``G̃`` as a matrix function::

    Wp = α G̃ M⁻¹,   M = (α − 1) G̃ + I

``M`` is symmetric positive definite for every α > 0 (eigenvalues between min(1, α) and
max(1, α)), and ``G̃`` and ``M`` commute, so ``Ŵ = W Wpᵀ = α (M⁻¹ G̃ Wᵀ)ᵀ``: one Cholesky
factorisation (d³/3) and two triangular solves per α, all BLAS-3, instead of one
eigendecomposition (about 9d³, and latency-bound on a GPU) shared by every α. ``G̃ Wᵀ`` does not
depend on α and is computed once per layer.

A record that kept its rows (``m < d`` of them) never forms a d × d matrix, by the push-through
identity ``G̃ M⁻¹ = Rᵀ K⁻¹ R / t`` with ``K = ((α − 1)/t) R Rᵀ + I`` (m × m) and ``t = ‖R‖²_F``.

A group with no energy (``tr G = 0``, all-zero inputs) gets ``Ŵ = 0``, as in the eigen route.
No spectrum comes out of this route: reports and plots use :mod:`sap_fast.spectrum`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from . import backends
from .stats import LayerStats

__all__ = ["LayerSolve", "check_infos", "normalise", "prepare", "solved_weight"]


@dataclass
class LayerSolve:
    """What one layer's solve needs at any α, float64.

    ``gram`` mode: ``normalised`` is ``G̃`` ``(groups, d, d)`` and ``rhs`` is ``G̃ Wᵀ``
    ``(groups, d, out)``. ``rows`` mode: ``normalised`` is ``R Rᵀ / t`` ``(groups, m, m)``,
    ``rows`` is ``R / √t`` and ``rhs`` is ``R Wᵀ / √t`` ``(groups, m, out)``.
    """
    mode: str
    normalised: torch.Tensor
    rhs: torch.Tensor
    rows: Optional[torch.Tensor] = None


def _trace_scale(trace: torch.Tensor) -> torch.Tensor:
    """``tr`` with zeros replaced by 1: a zero Gram stays zero, so its update comes out 0."""
    return torch.where(trace > 0, trace, torch.ones_like(trace))


def normalise(record: LayerStats, dtype: torch.dtype = torch.float64):
    """``("gram", G/trG)`` or ``("rows", R/√t)``: the α- and weight-independent part of a record,
    shared by the targets that read one record (self-attention's q/k/v)."""
    if record.mode == "rows":
        rows = record.rows.to(dtype)
        return "rows", rows / _trace_scale(rows.square().sum((-2, -1))).sqrt()[:, None, None]
    gram = record.gram.to(dtype)
    gram = (gram + gram.transpose(-1, -2)) / 2
    return "gram", gram / _trace_scale(gram.diagonal(dim1=-2, dim2=-1).sum(-1))[:, None, None]


def prepare(record, weight: torch.Tensor) -> LayerSolve:
    """The α-independent part for ``weight`` ``(groups, out, d)`` (float64); ``record`` is a
    :class:`LayerStats` or what :func:`normalise` returned for it."""
    mode, data = normalise(record, weight.dtype) if isinstance(record, LayerStats) else record
    if mode == "rows":  # after scaling, t = ‖R‖²_F is 1
        return LayerSolve("rows", data @ data.transpose(-1, -2), data @ weight.transpose(-1, -2), data)
    return LayerSolve("gram", data, data @ weight.transpose(-1, -2))


def _factor(prep: LayerSolve, alpha: float):
    """Cholesky factor of ``(α − 1) N + I`` (``N`` = ``normalised``) and its info (0 = success);
    ``cholesky_ex`` so that no host synchronisation happens here: :func:`sap_fast.backends.cholesky_ex`
    (``torch.linalg.cholesky_ex`` by default; ``SAP_FAST_BATCHED_CHOLESKY=cupy`` selects cuSOLVER's
    potrfBatched through cupy for CUDA batches)."""
    m = prep.normalised * (alpha - 1.0)
    m.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return backends.cholesky_ex(m)


def solved_weight(prep: LayerSolve, alpha: float):
    """``(Ŵ, info)`` at ``alpha``: ``Ŵ`` ``(groups, out, d)``; ``info`` nonzero where the
    factorisation failed (checked by the caller, once per α: see :func:`check_infos`)."""
    factor, info = _factor(prep, alpha)
    x = torch.cholesky_solve(prep.rhs, factor)  # M⁻¹ G̃ Wᵀ, or K⁻¹ R Wᵀ / √t
    if prep.mode == "rows":
        return alpha * x.transpose(-1, -2) @ prep.rows, info
    return alpha * x.transpose(-1, -2), info


def check_infos(names: List[str], infos: List[torch.Tensor], alpha: float) -> None:
    """One host synchronisation per α: raise if any factorisation failed."""
    if not infos:
        return
    failed = torch.stack([i.reshape(-1).ne(0).any() for i in infos]).cpu()
    if failed.any():
        name = names[int(failed.nonzero()[0])]
        raise ValueError(f"the Cholesky factorisation of (α−1)·G/trG + I failed for layer '{name}' at "
                         f"α={alpha:g} (α far below 1 leaves it numerically singular); use solver='eigh'")
