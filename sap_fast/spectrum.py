"""Stage 3: the spectrum of every layer's Gram, once; every α reuses it.

``G = U diag(e) Uᵀ`` (symmetric eigendecomposition), or, for a record that kept its rows
(fewer rows than width), the thin SVD ``R = P diag(σ) Uᵀ`` with ``e = σ²`` and a thin ``U``.
Normalised energies ``s = e / Σe`` and importances ``λ = α s / ((α − 1) s + 1)`` follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch

from . import backends, distributed
from ._runtime.checks import resolve_group
from .backends.update import importance
from .stats import LayerStats, Stats

__all__ = ["LayerSpectrum", "decompose", "importance", "layer_spectrum", "spectra"]


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


def layer_spectrum(record: LayerStats) -> LayerSpectrum:
    """The spectrum stage, always float64: a Gram's eigendecomposition by
    :func:`sap_fast.backends.eigh` (by default the CMake-built cuSOLVER op for CUDA Grams where
    the extension has CUDA, ``torch.linalg.eigh`` otherwise; ``SAP_FAST_BATCHED_EIGH=cupy``
    selects cuSOLVER's syevjBatched through cupy for CUDA batches of n ≤ 32), or the thin SVD of
    a record that kept its rows.

    A float32 Gram is decomposed in float64 too: its rounding is already done, but a float32
    ``eigh`` would add 10-30x more error on the small eigenvalues that large α depends on.
    """
    if record.mode == "rows":
        _, sigma, vh = torch.linalg.svd(record.rows.double(), full_matrices=False)
        return LayerSpectrum(sigma.square(), vh.transpose(-1, -2))
    gram = record.gram.double()
    gram = (gram + gram.transpose(-1, -2)) / 2  # exact symmetry; eigh reads one triangle anyway
    eigvals, basis = backends.eigh(gram)
    # descending order like the SVD; round-off can leave tiny negatives: they carry no energy
    return LayerSpectrum(eigvals.flip(-1).clamp_min(0), basis.flip(-1))


def _same_statistics(a: LayerStats, b: LayerStats) -> bool:
    """One record, or two Grams with equal entries (cheap fields compared first)."""
    if a is b:
        return True
    if a.mode != "gram" or (a.mode, a.count, a.d, a.groups) != (b.mode, b.count, b.d, b.groups):
        return False
    return torch.equal(a.gram, b.gram)


def spectra(stats: Stats, names: Optional[Iterable[str]] = None,
            process_group=None) -> Dict[str, LayerSpectrum]:
    """Spectra of the named records; records with identical statistics (the q/k/v of a
    self-attention layer) share one decomposition.

    ``process_group`` (see :mod:`sap_fast.distributed`; ``None`` = the default group when
    torch.distributed is initialised): the decompositions are spread over the ranks (largest
    first, to the least-loaded rank) and broadcast, so each is computed once and every rank gets
    bitwise identical spectra. ``stats`` must be the same on every rank (as
    :func:`sap_fast.collect_stats` returns them in a distributed job); this is checked.
    """
    return decompose(stats, list(stats if names is None else names), resolve_group(process_group))


def decompose(stats: Stats, names: List[str], group) -> Dict[str, LayerSpectrum]:
    """:func:`spectra` for a resolved ``group`` (None = this process alone)."""
    if group is not None:
        return _spread_spectra(stats, names, group)
    out: Dict[str, LayerSpectrum] = {}
    done = []  # (record, spectrum) already decomposed
    for name in names:
        record = stats[name]
        for seen, spec in done:
            if _same_statistics(seen, record):
                out[name] = spec
                break
        else:
            out[name] = layer_spectrum(record)
            done.append((record, out[name]))
    return out


def _fingerprint(name: str, record: LayerStats) -> tuple:
    data = record.gram.diagonal(dim1=-2, dim2=-1) if record.mode == "gram" else record.rows.square()
    return name, record.mode, record.count, record.d, record.groups, float(data.double().sum())


def _spread_spectra(stats: Stats, names: list, group) -> Dict[str, LayerSpectrum]:
    prints = distributed.exchange(group, lambda: [_fingerprint(n, stats[n]) for n in names])
    for r, theirs in enumerate(prints):
        if theirs != prints[0]:
            bad = next((a[0] for a, b in zip(prints[0], theirs) if a != b), names[0] if names else "?")
            raise ValueError(f"stats differ between rank 0 and rank {r} (layer '{bad}'); collect them "
                             "with collect_stats on every rank of the group, or pass process_group=False")
    jobs: list = []       # distinct records
    which: Dict[str, int] = {}
    for name in names:
        record = stats[name]
        which[name] = next((i for i, seen in enumerate(jobs) if _same_statistics(seen, record)), len(jobs))
        if which[name] == len(jobs):
            jobs.append(record)
    costs, shapes = [], []
    for rec in jobs:
        r = rec.d if rec.mode == "gram" else rec.count
        costs.append(rec.groups * rec.d * r * r)
        shapes.append([((rec.groups, r), torch.float64, rec.device),
                       ((rec.groups, rec.d, r), torch.float64, rec.device)])

    def compute(i):
        spec = layer_spectrum(jobs[i])
        return [spec.eigvals, spec.basis]

    results = distributed.spread(costs, shapes, compute, group)
    specs = [LayerSpectrum(e, u) for e, u in results]
    return {name: specs[which[name]] for name in names}
