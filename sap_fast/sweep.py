"""Stage 5: choose α on a validation split — one Gram and one spectrum per layer, then one cheap
update and one evaluation per α, with "no projection" as a candidate.

Selection: a candidate replaces the best so far only if it is strictly better, on validation
accuracy first and validation loss second (the reference compares accuracy alone; the loss
tie-break matters on small validation sets where accuracies tie). The unprojected model comes
first, so it is kept unless beaten.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

from torch import nn

from . import distributed
from ._runtime import checks
from ._runtime.evaluate import Evaluation, evaluation_sums
from ._runtime.forward import progress
from .project import Projector, build_projector, given_or_collected, resolve_solver, targets_with_stats
from .stats import Stats

__all__ = ["DEFAULT_ALPHAS", "SweepRow", "SweepResult", "sweep"]

DEFAULT_ALPHAS = tuple(10.0 ** (e / 2) for e in range(2, 13))  # 1e1 … 1e6 in half-decades
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class SweepRow:
    alpha: Optional[float]   # None = no projection
    val_accuracy: float
    val_loss: float
    refined: bool = False    # found by alphas="auto" refinement
    seconds: float = 0.0     # this candidate's update and validation pass


@dataclass
class SweepResult:
    best_alpha: Optional[float]   # None when no α beat the unprojected model
    model: nn.Module              # the corrected copy at best_alpha
    table: List[SweepRow]
    stats: Stats = field(repr=False)
    projector: Projector = field(repr=False)  # the sweep's one decomposition: reuse it (spectra, other α)
    prepare_seconds: float = 0.0  # building the projector: the decompositions (or the solves' set-up)

    @property
    def best(self) -> SweepRow:
        return next(r for r in self.table if r.alpha == self.best_alpha)

    def to_markdown(self) -> str:
        lines = ["| α | val accuracy | val loss |", "|---:|---:|---:|"]
        for r in self.table:
            a = "no projection" if r.alpha is None else f"{r.alpha:.3g}" + (" (refined)" if r.refined else "")
            mark = " **best**" if r.alpha == self.best_alpha else ""
            lines.append(f"| {a}{mark} | {100 * r.val_accuracy:.2f}% | {r.val_loss:.4f} |")
        return "\n".join(lines)


def _is_auto(alphas) -> bool:
    return isinstance(alphas, str) and alphas == "auto"


def _key(e: Evaluation):
    return (e.accuracy, -e.loss)


def _check_alphas(alphas) -> tuple:
    if alphas is None or _is_auto(alphas):
        return DEFAULT_ALPHAS
    if isinstance(alphas, str):
        raise ValueError(f"alphas must be None, 'auto' or a list of numbers > 0, got {alphas!r}")
    alphas = tuple(checks.alpha(a, "each of alphas") for a in alphas)
    if not alphas:
        raise ValueError("alphas is empty; pass numbers > 0, None (the default grid) or 'auto'")
    return alphas


def sweep(model: nn.Module, data, val, *, alphas=None, stats: Optional[Stats] = None,
          layers=None, batch_size: int = 256, device=None, refine_steps: int = 8,
          show_progress: Optional[bool] = None, process_group=None,
          solver: str = "auto", amp=None) -> SweepResult:
    """Pick α on the (noisy) validation split ``val``.

    Args:
        model: the trained model; never modified.
        data: the trusted inputs (or pass ``stats``).
        val: labelled validation data (an (inputs, targets) pair, Dataset or DataLoader).
        alphas: None = 1e1 … 1e6 in half-decades; a list of α; or ``"auto"``: the default grid,
            then a golden-section refinement on log α around the best grid point.
        stats: precomputed :class:`Stats`; layers, batch_size, device: as in :func:`correct`.
        refine_steps: evaluations spent by ``"auto"`` refinement.
        process_group: as in :func:`sap_fast.correct` (``None`` = torch.distributed's default
            group when it is initialised). Distributed: ``data`` and ``val`` are this rank's
            shards (``val`` may also be the whole split on every rank, or empty on some); the
            validation counts are summed over the ranks, so every rank picks the same α and
            ends with identical weights.
        solver: ``"auto"`` (default; :func:`sap_fast.project.resolve_solver`): ``"eigh"`` when
            the sweep applies several α (the default grid: 11), ``"cholesky"`` for a single α;
            ``"eigh"``: one eigendecomposition per layer, then one matmul per layer per α; or
            ``"cholesky"``: one Cholesky solve per layer per α, no eigendecomposition
            (:mod:`sap_fast.solve`). Same weights to round-off; benchmarks/README.md has which
            is faster where.
        amp: ``"bf16"`` or ``"fp16"``: the validation passes run under ``torch.autocast`` in
            that dtype (faster on a GPU; the statistics are never collected under it); None
            (default) runs the model as it is.

    Returns:
        :class:`SweepResult` with the best α (None = no projection won), the corrected copy at
        that α, the table of every candidate's validation accuracy and loss, the statistics, and
        the :class:`~sap_fast.project.Projector` (its spectra for a report, or any other α,
        with no second decomposition).
    """
    grid = _check_alphas(alphas)
    checks.positive_int(refine_steps, "refine_steps", minimum=2)
    solver = resolve_solver(solver, alphas=len(set(grid)) + (refine_steps if _is_auto(alphas) else 0))
    opts = checks.run_options(model, device=device, batch_size=batch_size,
                              process_group=process_group, show_progress=show_progress, amp=amp)
    stats = given_or_collected(model, data, stats, layers, opts)
    started = time.perf_counter()
    projector = build_projector(model, targets_with_stats(model, layers, stats), stats, solver, opts.group)
    prepare_seconds = time.perf_counter() - started
    work = copy.deepcopy(model)
    table: List[SweepRow] = []
    scores = {}

    def local_sums(alpha):
        projector.apply(work, alpha)
        return evaluation_sums(work, val, opts.batch_size, opts.device, what="val",
                               show_progress=opts.show_progress, allow_empty=opts.group is not None,
                               amp=opts.amp, desc="validation" if alpha is None else f"validation α={alpha:.3g}")

    def score(alpha: Optional[float], refined: bool = False):
        started = time.perf_counter()
        if opts.group is None:
            correct, loss, n = local_sums(alpha)
        else:  # every rank sums the same per-rank counts in rank order: the same key everywhere
            sums = distributed.exchange(opts.group, lambda: local_sums(alpha))
            correct, loss, n = (sum(s.correct for s in sums), sum(s.loss for s in sums),
                                sum(s.samples for s in sums))
            if n == 0:
                raise ValueError("val is empty on every rank; pass at least one sample")
        e = Evaluation(correct / n, loss / n, n)
        table.append(SweepRow(alpha, e.accuracy, e.loss, refined, time.perf_counter() - started))
        scores[alpha] = _key(e)
        return scores[alpha]

    best = None  # the unprojected model is scored first and kept unless strictly beaten
    for alpha in progress([None, *grid], desc="α sweep", enabled=opts.show_progress):
        if score(alpha) > scores[best]:
            best = alpha
    if _is_auto(alphas) and best is not None:
        best = _refine(score, scores, best, refine_steps)
    projector.apply(work, best)
    return SweepResult(best, work, table, stats, projector, prepare_seconds)


def _refine(score, scores, best: float, steps: int) -> float:
    """Golden-section search for the best key on log10 α within half a decade of ``best``."""
    lo, hi = math.log10(best) - 0.5, math.log10(best) + 0.5
    a = hi - GOLDEN * (hi - lo)
    b = lo + GOLDEN * (hi - lo)
    fa, fb = score(10 ** a, True), score(10 ** b, True)
    for _ in range(max(0, steps - 2)):
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - GOLDEN * (hi - lo)
            fa = score(10 ** a, True)
        else:
            lo, a, fa = a, b, fb
            b = lo + GOLDEN * (hi - lo)
            fb = score(10 ** b, True)
    for alpha, key in scores.items():  # strictly better than the grid's best, else keep it
        if alpha is not None and key > scores[best]:
            best = alpha
    return best
