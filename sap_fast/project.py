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

from . import backend, distributed, solve
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
    """What every α needs, computed once for a model's targets; applies any α to a model copy.

    ``solver="eigh"``: the spectra (:mod:`sap_fast.spectrum`) and ``W U`` per layer, then one
    matmul per layer per α. ``solver="cholesky"``: ``G/trG`` and ``G/trG · Wᵀ`` per layer, then
    one Cholesky solve per layer per α (:mod:`sap_fast.solve`); ``spectra`` is None.
    """

    def __init__(self, model: nn.Module, targets: List[Target], stats: Stats, process_group=None,
                 solver: str = "eigh"):
        modules = dict(model.named_modules())
        self.targets = targets
        self.solver = solve.check_solver(solver)
        self.group = distributed.resolve_group(process_group)
        self.weights: Dict[str, torch.Tensor] = {}
        self.weight_bases: Dict[str, torch.Tensor] = {}
        self.spectra: Optional[Dict[str, LayerSpectrum]] = None
        if solver == "cholesky":
            self._solves: Dict[str, solve.LayerSolve] = {}
            self._normalised: Dict[int, tuple] = {}
            self._records = {t.name: stats[t.name] for t in targets}
            for t in targets:
                record = self._records[t.name]
                self.weights[t.name] = t.weight(modules).detach().to(device=record.device,
                                                                      dtype=torch.float64)
            return
        self.spectra = spectra(stats, [t.name for t in targets], process_group)
        for t in targets:
            spec = self.spectra[t.name]
            w = t.weight(modules).detach().to(device=spec.basis.device, dtype=spec.basis.dtype)
            self.weights[t.name] = w
            self.weight_bases[t.name] = w @ spec.basis

    def _solved(self, name: str, alpha: float):
        if name not in self._solves:  # prepared on first use: in a distributed job, on its owner only
            record = self._records[name]
            key = id(record)  # q/k/v of one self-attention share one record, so one G/trG
            if key not in self._normalised:
                self._normalised[key] = solve.normalise(record)
            self._solves[name] = solve.prepare(self._normalised[key], self.weights[name])
        return solve.solved_weight(self._solves[name], alpha)

    def _solve_all(self, alpha: float) -> Dict[str, torch.Tensor]:
        names = [t.name for t in self.targets]
        if self.group is None:
            new, infos = {}, []
            for name in names:
                new[name], info = self._solved(name, alpha)
                infos.append(info)
            solve.check_infos(names, infos, alpha)
            return new
        # distributed: each layer solved on one rank (balanced by d³), broadcast to all, so every
        # rank ends with bitwise identical weights
        costs = [float(self.weights[n].shape[-1]) ** 3 * self.weights[n].shape[0] for n in names]
        shapes = [[(tuple(self.weights[n].shape), torch.float64, self.weights[n].device)] for n in names]

        def compute(i):
            weight, info = self._solved(names[i], alpha)
            solve.check_infos([names[i]], [info], alpha)
            return [weight]

        results = distributed.spread(costs, shapes, compute, self.group)
        return {n: r[0] for n, r in zip(names, results)}

    def new_weights(self, alpha: Optional[float]) -> Dict[str, torch.Tensor]:
        """Target name → corrected weight; ``alpha=None`` gives the original weights."""
        if alpha is None:
            return dict(self.weights)
        if self.solver == "cholesky":
            return self._solve_all(alpha)
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
            process_group=None, solver: str = "cholesky") -> nn.Module:
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
        solver: ``"cholesky"`` (default: one Cholesky solve per layer, no eigendecomposition;
            :mod:`sap_fast.solve`) or ``"eigh"`` (the eigendecomposition route). Both give the
            same weights to round-off (tests/test_solve.py).

    Returns:
        The corrected model (``model`` itself when ``inplace=True``).
    """
    alpha = check_alpha(alpha)
    solve.check_solver(solver)
    check_batch_size(batch_size)
    stats = _stats_for(model, data, stats, layers, batch_size, device, process_group=process_group)
    targets = targets_with_stats(model, layers, stats)
    projector = Projector(model, targets, stats, process_group, solver)
    out = model if inplace else copy.deepcopy(model)
    projector.apply(out, alpha)
    return out
