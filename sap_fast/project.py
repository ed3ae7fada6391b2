"""Stage 4: the update ``W ← W Wpᵀ`` with ``Wp = U diag(λ) Uᵀ``; :class:`Projector` and :func:`correct`.

``Wp`` is never formed: ``W Wp = (W U) diag(λ) Uᵀ``, so a thin basis (wide, short layer)
never costs a ``d × d`` temporary. With a full basis the numerically careful form
``W − (W U) diag(1 − λ) Uᵀ`` is used: at large α most λ are ≈ 1 and ``1 − λ`` is small.
``W U`` is computed once per layer, so each further α costs one matmul per layer.

:class:`Projector` owns the one decomposition of a run: built once from the statistics, it gives
the corrected weights at any α (:meth:`Projector.weights`), writes them into a model
(:meth:`Projector.apply`), and hands out the spectra for reports (:attr:`Projector.spectra`),
computing them only when the solve route was used and only when asked. :func:`build_projector`
builds every projector, on arguments checked once at the public boundary (:class:`Projector`,
:func:`correct`, :func:`sap_fast.sweep`); :func:`resolve_solver` holds the one rule for
``solver="auto"``, the default everywhere.
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional

__all__ = ["Projector", "correct", "resolve_solver", "build_projector", "projected_weight",
           "targets_with_stats", "given_or_collected", "check_given_stats"]

import torch
from torch import nn

from . import backends, distributed, solve
from ._runtime import checks
from ._runtime.checks import RunOptions
from .targets import Target, select_targets
from .accumulate import collect, first_non_finite
from .spectrum import LayerSpectrum, decompose
from .stats import Stats


def projected_weight(weight: torch.Tensor, spectrum: LayerSpectrum, alpha: float,
                     weight_basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W Wpᵀ`` for ``weight`` ``(groups, out, d)`` (float64 in, float64 out).

    The project stage: :func:`sap_fast.backends.projected_update` (the fused Triton kernel for
    CUDA tensors where Triton runs, torch matmuls otherwise; the kernel's tests hold it to the
    torch path)."""
    u = spectrum.basis
    wu = weight @ u if weight_basis is None else weight_basis
    return backends.projected_update(weight, wu, u, spectrum.eigvals, spectrum.energies, alpha,
                                     full=spectrum.full)


def resolve_solver(solver: str, *, alphas: Optional[int], spectra: bool = False) -> str:
    """The solver a run uses: ``"eigh"`` or ``"cholesky"`` as given, or the one for ``"auto"``.

    The rule for ``"auto"`` (the default of :func:`correct`, :func:`sap_fast.sweep`,
    :class:`Projector` and ``sap-fast correct``): ``"cholesky"`` where exactly one α is applied
    and no spectrum is reported, ``"eigh"`` everywhere else. The eigendecomposition is the one
    α-independent cost that several α share (after it each α is one matmul per layer), and it
    is the spectrum a report plots; the Cholesky route pays its factorisation per α and has no
    spectrum. Measured on a 2-core CPU (``benchmarks/results/solvers-cpu.json``, float64,
    d = 576 to 4608): for one α Cholesky is 5.6 to 9.6× faster; over the 11-α default grid the
    two are about even (Cholesky 0.95 to 1.47× as fast), and there the spectra come free with
    the eigendecomposition, while on the Cholesky route they cost it on top.

    Args:
        solver: ``"auto"``, ``"eigh"`` or ``"cholesky"`` (checked here).
        alphas: how many α the run applies; None = any number, on demand (a :class:`Projector`).
        spectra: whether the run reports the layers' spectra.
    """
    solver = checks.solver(solver)
    if solver != "auto":
        return solver
    return "cholesky" if alphas == 1 and not spectra else "eigh"


class Projector:
    """SAP's projection of one model, prepared once from its statistics; any α on demand.

    Args:
        model: the model the statistics were collected from (its weights are read, never changed).
        stats: :class:`Stats` from :func:`sap_fast.collect_stats`.
        layers: which layers to project (None = every covered layer the stats hold).
        solver: ``"auto"`` (default; :func:`resolve_solver`): ``"eigh"`` here, since a projector
            serves any number of α and its spectra; ``"eigh"``: one eigendecomposition per
            layer, computed here, then one matmul per layer per α; or ``"cholesky"``: ``G/trG``
            and ``G/trG · Wᵀ`` per layer, then one Cholesky solve per layer per α
            (:mod:`sap_fast.solve`), no eigendecomposition.
        process_group: as in :func:`sap_fast.correct` (the decompositions or solves are spread
            over the ranks and broadcast, so every rank gets identical weights).

    :meth:`weights` (name → corrected weight) and :meth:`apply` (into a model) take ``alpha``
    (None = the original weights). :attr:`spectra` are the layers' spectra: already there with
    ``solver="eigh"``, computed on first access (and then kept) with ``"cholesky"``;
    :attr:`has_spectra` tells which, so a report can skip a decomposition nobody asked for.
    """

    targets: List[Target]
    solver: str  # "eigh" or "cholesky", as resolve_solver resolved it
    group: object

    def __init__(self, model: nn.Module, stats: Stats, *, layers=None, solver: str = "auto",
                 process_group=None):
        checks.finite_parameters(checks.plain_model(model))
        check_given_stats(stats)
        built = build_projector(model, targets_with_stats(model, layers, stats), stats,
                                resolve_solver(solver, alphas=None), checks.resolve_group(process_group))
        vars(self).update(vars(built))  # this projector takes the built one's state

    # -- spectra -----------------------------------------------------------------------------
    @property
    def has_spectra(self) -> bool:
        """Whether :attr:`spectra` is already computed (always with ``solver="eigh"``)."""
        return self._spectra is not None

    @property
    def spectra(self) -> Dict[str, LayerSpectrum]:
        """Layer name → :class:`~sap_fast.spectrum.LayerSpectrum`; with ``solver="cholesky"`` the
        eigendecompositions run here, on first access."""
        if self._spectra is None:
            self._spectra = decompose(self._stats, [t.name for t in self.targets], self.group)
        return self._spectra

    # -- weights -----------------------------------------------------------------------------
    def weights(self, alpha: Optional[float]) -> Dict[str, torch.Tensor]:
        """Target name → corrected weight ``(groups, out, d)`` (float64) at ``alpha``;
        ``alpha=None`` gives the original weights."""
        if alpha is None:
            return dict(self._original)
        alpha = checks.alpha(alpha)
        if self.solver == "cholesky":
            return self._solve_all(alpha)
        return {t.name: projected_weight(self._original[t.name], self._spectra[t.name], alpha,
                                         self._weight_bases[t.name]) for t in self.targets}

    def apply(self, model: nn.Module, alpha: Optional[float]) -> None:
        """Write the weights at ``alpha`` into ``model`` (the same architecture), in place."""
        new = self.weights(alpha)  # everything computed before anything is written
        modules = dict(model.named_modules())
        for t in self.targets:
            t.write(modules, new[t.name].to(t.weight(modules).device))

    def _solved(self, name: str, alpha: float):
        if name not in self._solves:  # prepared on first use: in a distributed job, on its owner only
            record = self._stats[name]
            key = id(record)  # q/k/v of one self-attention share one record, so one G/trG
            if key not in self._normalised:
                self._normalised[key] = solve.normalise(record)
            self._solves[name] = solve.prepare(self._normalised[key], self._original[name])
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
        original = self._original
        costs = [float(original[n].shape[-1]) ** 3 * original[n].shape[0] for n in names]
        shapes = [[(tuple(original[n].shape), torch.float64, original[n].device)] for n in names]

        def compute(i):
            weight, info = self._solved(names[i], alpha)
            solve.check_infos([names[i]], [info], alpha)
            return [weight]

        results = distributed.spread(costs, shapes, compute, self.group)
        return {n: r[0] for n, r in zip(names, results)}


def build_projector(model: nn.Module, targets: List[Target], stats: Stats, solver: str,
                    group) -> Projector:
    """The one builder of a :class:`Projector`, on arguments checked and resolved at the public
    boundary (:class:`Projector`, :func:`correct`, :func:`sap_fast.sweep`): ``targets`` from
    :func:`targets_with_stats`, ``solver`` from :func:`resolve_solver` (``"eigh"`` or
    ``"cholesky"``), ``group`` a resolved process group or None. With ``"eigh"`` the
    decompositions run here; with ``"cholesky"`` the solves are set up on first use."""
    projector = Projector.__new__(Projector)
    modules = dict(model.named_modules())
    projector.targets = targets
    projector.solver = solver
    projector.group = group
    projector._stats = stats
    projector._spectra = decompose(stats, [t.name for t in targets], group) if solver == "eigh" else None
    projector._original = {}
    projector._weight_bases = {}
    projector._solves = {}
    projector._normalised = {}
    spectra = projector._spectra
    for t in targets:
        device = stats[t.name].device if spectra is None else spectra[t.name].basis.device
        w = t.weight(modules).detach().to(device=device, dtype=torch.float64)
        projector._original[t.name] = w
        if spectra is not None:
            projector._weight_bases[t.name] = w @ spectra[t.name].basis
    return projector


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


def given_or_collected(model: nn.Module, data, stats: Optional[Stats], layers, opts: RunOptions) -> Stats:
    """The statistics a correction works from: ``stats`` as given, or collected from ``data``
    (exactly one of the two), after checking that the model's weights are finite."""
    checks.finite_parameters(model)
    if stats is None:
        if data is None:
            raise ValueError("pass the trusted samples as data= or precomputed stats=")
        return collect(model, data, opts, layers=layers)
    if data is not None:
        raise ValueError("pass either the trusted samples (data=) or precomputed stats=, not both")
    return check_given_stats(stats)


def check_given_stats(stats) -> Stats:
    """``stats`` if it is a :class:`Stats` whose records are all finite (one host read per device)."""
    if not isinstance(stats, Stats):
        raise TypeError(f"stats must be a sap_fast.Stats, got {type(stats).__name__}")
    bad = first_non_finite(dict(stats))
    if bad is not None:
        raise ValueError(f"statistics: the stats of layer '{bad}' hold non-finite values (NaN/Inf); "
                         "collect them again (collect_stats) from finite inputs")
    return stats


def correct(model: nn.Module, data=None, *, alpha: float = 30000.0, stats: Optional[Stats] = None,
            layers=None, inplace: bool = False, batch_size: int = 256, device=None,
            process_group=None, solver: str = "auto") -> nn.Module:
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
        solver: ``"auto"`` (default; :func:`resolve_solver`): ``"cholesky"`` here, since one α
            is applied and no spectrum is reported; ``"cholesky"``: one Cholesky solve per
            layer, no eigendecomposition (:mod:`sap_fast.solve`); or ``"eigh"``: the
            eigendecomposition route. Both give the same weights to round-off (the test
            suite's ``test_solve.py``).

    Returns:
        The corrected model (``model`` itself when ``inplace=True``). For the projector itself
        (its spectra, or several α), build a :class:`Projector`.
    """
    alpha = checks.alpha(alpha)
    solver = resolve_solver(solver, alphas=1)
    opts = checks.run_options(model, device=device, batch_size=batch_size, process_group=process_group)
    stats = given_or_collected(model, data, stats, layers, opts)
    projector = build_projector(model, targets_with_stats(model, layers, stats), stats, solver, opts.group)
    out = model if inplace else copy.deepcopy(model)
    projector.apply(out, alpha)
    return out
