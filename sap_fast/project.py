"""Stage 4: the update ``W ← W Wpᵀ`` with ``Wp = U diag(λ) Uᵀ``, and :func:`correct`.

``Wp`` is never formed: ``W Wp = (W U) diag(λ) Uᵀ``, so a thin basis (wide, short layer)
never costs a ``d × d`` temporary. With a full basis the numerically careful form
``W − (W U) diag(1 − λ) Uᵀ`` is used: at large α most λ are ≈ 1 and ``1 − λ`` is small.
``W U`` is computed once per layer, so each further α costs one matmul per layer.
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from . import backend
from .accumulate import collect_stats
from .forward import check_alpha, check_batch_size, resolve_device
from .layers import Target, select_targets
from .spectrum import LayerSpectrum, importance, spectra
from .stats import Stats


def projected_weight(weight: torch.Tensor, spectrum: LayerSpectrum, alpha: float,
                     weight_basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W Wpᵀ`` for ``weight`` ``(groups, out, d)`` (float64 in, float64 out).

    Dispatch point of the project stage: the Triton kernel for CUDA tensors when Triton is
    available, torch matmuls otherwise (the kernel's tests hold it to this path)."""
    u = spectrum.basis
    wu = weight @ u if weight_basis is None else weight_basis
    kernels = backend.triton_update() if weight.is_cuda else None
    if kernels is not None:  # λ formed inside the kernel, fused with the two products
        return kernels.scaled_update(weight, wu, u, spectrum.eigvals, alpha, full=spectrum.full)
    lam = importance(spectrum.energies, alpha).unsqueeze(-2)  # (groups, 1, r)
    if spectrum.full:
        return weight - (wu * (1.0 - lam)) @ u.transpose(-1, -2)
    return (wu * lam) @ u.transpose(-1, -2)


class Projector:
    """The spectra and original weights of a model's targets; applies any α to a model copy."""

    def __init__(self, model: nn.Module, targets: List[Target], stats: Stats, process_group=None):
        modules = dict(model.named_modules())
        self.targets = targets
        self.spectra = spectra(stats, [t.name for t in targets], process_group)
        self.weights: Dict[str, torch.Tensor] = {}
        self.weight_bases: Dict[str, torch.Tensor] = {}
        for t in targets:
            spec = self.spectra[t.name]
            w = t.weight(modules).detach().to(device=spec.basis.device, dtype=spec.basis.dtype)
            self.weights[t.name] = w
            self.weight_bases[t.name] = w @ spec.basis

    def new_weights(self, alpha: Optional[float]) -> Dict[str, torch.Tensor]:
        """Target name → corrected weight; ``alpha=None`` gives the original weights."""
        if alpha is None:
            return dict(self.weights)
        return {t.name: projected_weight(self.weights[t.name], self.spectra[t.name], alpha,
                                         self.weight_bases[t.name]) for t in self.targets}

    def apply(self, model: nn.Module, alpha: Optional[float]) -> None:
        new = self.new_weights(alpha)  # everything computed before anything is written
        modules = dict(model.named_modules())
        for t in self.targets:
            t.write(modules, new[t.name].to(t.weight(modules).device))


def targets_with_stats(model: nn.Module, layers, stats: Stats) -> List[Target]:
    """The selected targets that ``stats`` covers; a mismatch in width or groups is an error."""
    targets = select_targets(model, layers)
    usable = []
    for t in targets:
        record = stats.get(t.name)
        if record is None:
            continue
        if (record.d, record.groups) != (t.d, t.groups):
            raise ValueError(f"stats for layer '{t.name}' have width {record.d} x {record.groups} "
                             f"group(s) but the model's layer needs {t.d} x {t.groups}; collect the "
                             "stats from this model")
        usable.append(t)
    missing = [t.name for t in targets if t.name not in stats]
    if not usable:
        raise ValueError("stats cover none of the selected layers; collect them from this model "
                         "with the same layers=")
    if missing and layers is not None:
        raise ValueError(f"stats have no record for the requested layer(s) {missing[:5]}; "
                         "collect stats with these layers")
    if missing:
        warnings.warn(f"{len(missing)} covered layer(s) never ran on the trusted data and stay "
                      f"unchanged: {missing[:5]}", stacklevel=3)
    return usable


def _stats_for(model, data, stats, layers, batch_size, device, what="data", process_group=None) -> Stats:
    if stats is None:
        if data is None:
            raise ValueError("pass the trusted samples as data= or precomputed stats=")
        return collect_stats(model, data, layers=layers, batch_size=batch_size, device=device,
                             process_group=process_group)
    if data is not None:
        raise ValueError("pass either the trusted samples (data=) or precomputed stats=, not both")
    if not isinstance(stats, Stats):
        raise TypeError(f"stats must be a sap_fast.Stats, got {type(stats).__name__}")
    resolve_device(model, device)
    return stats


def correct(model: nn.Module, data=None, *, alpha: float = 30000.0, stats: Optional[Stats] = None,
            layers=None, inplace: bool = False, batch_size: int = 256, device=None,
            process_group=None) -> nn.Module:
    """SAP: project every covered layer's weight onto the trusted samples' activation space.

    Args:
        model: the trained (noisy-label) model.
        data: the trusted inputs (see :func:`sap_fast.select_trusted`); or pass ``stats``.
        alpha: the scale α > 0 (the paper sweeps 1e4 to 1e6; small data often wants 1e2 to 1e3).
        stats: precomputed :class:`Stats` (from :func:`collect_stats`) instead of ``data``.
        layers: which layers (None = all covered).
        inplace: write into ``model`` itself; otherwise a corrected copy is returned and
            ``model`` is never touched.
        batch_size, device: as in :func:`collect_stats`.
        process_group: ``None`` = torch.distributed's default group when it is initialised (else
            local), ``False`` = local, ``True`` or a ``ProcessGroup`` = that group. Distributed:
            ``data`` is this rank's shard of the trusted samples (or ``stats`` the Stats every rank
            got from :func:`collect_stats`), the spectra are spread over the ranks and broadcast,
            and every rank gets identical weights (the model must be the same on every rank).

    Returns:
        The corrected model (``model`` itself when ``inplace=True``).
    """
    alpha = check_alpha(alpha)
    check_batch_size(batch_size)
    stats = _stats_for(model, data, stats, layers, batch_size, device, process_group=process_group)
    targets = targets_with_stats(model, layers, stats)
    projector = Projector(model, targets, stats, process_group)
    out = model if inplace else copy.deepcopy(model)
    projector.apply(out, alpha)
    return out
