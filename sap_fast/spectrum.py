"""Stage 3: the spectrum of every layer's Gram, once; every α reuses it.

``G = U diag(e) Uᵀ`` (symmetric eigendecomposition), or, for a record that kept its rows
(fewer rows than width), the thin SVD ``R = P diag(σ) Uᵀ`` with ``e = σ²`` and a thin ``U``.
Normalised energies ``s = e / Σe`` and importances ``λ = α s / ((α − 1) s + 1)`` follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch

from . import backend
from .stats import LayerStats, Stats


@dataclass
class LayerSpectrum:
    """``eigvals`` ``(groups, r)`` (≥ 0, descending) and ``basis`` ``(groups, d, r)``.

    ``r == d`` for a Gram (full orthonormal basis); ``r == rows < d`` for a thin record, whose
    basis spans only the rows: directions outside it get λ = 0.
    """
    eigvals: torch.Tensor
    basis: torch.Tensor

    @property
    def full(self) -> bool:
        return self.basis.shape[-1] == self.basis.shape[-2]

    @property
    def energies(self) -> torch.Tensor:
        """``s = e / Σe`` per group; an all-zero input (no energy) gives s = 0."""
        total = self.eigvals.sum(-1, keepdim=True)
        return torch.where(total > 0, self.eigvals / total.clamp_min(torch.finfo(total.dtype).tiny),
                           torch.zeros_like(self.eigvals))


def importance(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """λ = α s / ((α − 1) s + 1): ≈ 1 where s ≫ 1/α, ≈ α s where s ≪ 1/α."""
    return alpha * s / ((alpha - 1.0) * s + 1.0)


def layer_spectrum(record: LayerStats) -> LayerSpectrum:
    """Dispatch point of the spectrum stage, always float64: the native cuSOLVER entry point for
    CUDA Grams when the extension has CUDA, torch.linalg otherwise.

    A float32 Gram is decomposed in float64 too: its rounding is already done, but a float32
    ``eigh`` would add 10-30x more error on the small eigenvalues that large α depends on.
    """
    if record.mode == "rows":
        _, sigma, vh = torch.linalg.svd(record.rows.double(), full_matrices=False)
        return LayerSpectrum(sigma.square(), vh.transpose(-1, -2))
    gram = record.gram.double()
    gram = (gram + gram.transpose(-1, -2)) / 2  # exact symmetry; eigh reads one triangle anyway
    if gram.is_cuda and backend.native_cuda():  # cuSOLVER: batched syevj / syevd on streams
        eigvals, basis = torch.ops.sap_fast.eigh(gram)
    else:
        eigvals, basis = torch.linalg.eigh(gram)
    # descending order like the SVD; round-off can leave tiny negatives: they carry no energy
    return LayerSpectrum(eigvals.flip(-1).clamp_min(0), basis.flip(-1))


def _same_statistics(a: LayerStats, b: LayerStats) -> bool:
    """One record, or two Grams with equal entries (cheap fields compared first)."""
    if a is b:
        return True
    if a.mode != "gram" or (a.mode, a.count, a.d, a.groups) != (b.mode, b.count, b.d, b.groups):
        return False
    return torch.equal(a.gram, b.gram)


def spectra(stats: Stats, names: Optional[Iterable[str]] = None) -> Dict[str, LayerSpectrum]:
    """Spectra of the named records; records with identical statistics (the q/k/v of a
    self-attention layer) share one decomposition."""
    out: Dict[str, LayerSpectrum] = {}
    done = []  # (record, spectrum) already decomposed
    for name in (stats if names is None else names):
        record = stats[name]
        for seen, spec in done:
            if _same_statistics(seen, record):
                out[name] = spec
                break
        else:
            out[name] = layer_spectrum(record)
            done.append((record, out[name]))
    return out
