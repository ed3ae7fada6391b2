"""What a user looks at after a run: ``report.json`` (numbers) and ``report.png`` (two panels).

* :func:`report_data` — a JSON-friendly summary: the chosen α, the sweep table, per-layer
  spectrum figures, and whatever the caller adds (test accuracies, timings, noise info).
* :func:`plot_report` — a matplotlib figure (Agg canvas, no pyplot, never shown): accuracy vs α,
  and the layers' normalised spectra with λ(α*) overlaid.
* :func:`write_report` — both files, written atomically into an existing folder.

Per-layer figures (``report_data()["layers"][name]``), all from ``s = e / Σe`` of the layer's
spectrum (:class:`sap_fast.spectrum.LayerSpectrum`):

====================  =================================================================================
``d``, ``groups``     input width per group, and the number of groups (conv ``groups``)
``r``, ``basis``      eigenvalues kept (``d`` for a Gram: ``"full"``; the row count for a thin SVD
                      of a rows-mode record: ``"thin"``, its other ``d − r`` directions have s = 0)
``rank``              eigenvalues ``e > rank_rtol · max(e)`` (default ``rank_rtol`` = 1e-12, above
                      the ~``d``·1e-16 round-off of a float64 Gram for ``d`` up to ~10⁴)
``effective_rank``    ``exp(−Σ s log s)`` (entropy effective rank, Roy & Vetterli 2007): ``k`` for
                      ``k`` equal energies, 0 for a layer that saw no energy
``energy_top_1pct``   share of the energy in the ``ceil(0.01 d)`` strongest directions (at least 1)
``energy_top_10pct``  the same for ``ceil(0.10 d)``
``lambda_gt_half``    directions with λ(α*) > ½, i.e. ``s > 1/(α*+1)``: what SAP keeps (None when
                      there is no α*: nothing given and no sweep, or "no projection" won)
``lambda_mean``       mean λ(α*) over all ``d`` directions: the fraction of the layer that survives
====================  =================================================================================

**Grouped layers** (``groups > 1``): each figure is computed per group, on that group's own ``s``
(the ``s`` its λ is computed from), then **averaged over the groups**; counts then may be
fractional. The figure likewise plots the group-average of the sorted ``s`` and of λ at each rank.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .._runtime import checks
from .._runtime.io import save_figure, save_json, to_jsonable
from ..spectrum import LayerSpectrum, importance
from ..stats import Stats
from ..sweep import SweepResult

FORMAT = "sap_fast.report"
VERSION = 1
RANK_RTOL = 1e-12
MAX_LAYERS_PLOTTED = 12
S_FLOOR = 1e-17   # below float64 resolution of a Gram's energies: the spectrum plot's floor

__all__ = ["report_data", "plot_report", "write_report", "layer_summary"]


# -- inputs --------------------------------------------------------------------------------------
def _chosen_alpha(sweep, alpha) -> Tuple[Optional[float], Optional[str]]:
    """α* and where it came from: ``alpha`` when given, else the sweep's best (None = no projection)."""
    if alpha is not None:
        alpha = checks.alpha(alpha)
        return alpha, "sweep" if sweep is not None and alpha == sweep.best_alpha else "given"
    if sweep is not None:
        return sweep.best_alpha, "sweep"
    return None, None


def _check_inputs(sweep, spectra) -> None:
    if sweep is not None and not isinstance(sweep, SweepResult):
        raise TypeError(f"sweep must be the SweepResult that sap_fast.sweep returns, got {type(sweep).__name__}")
    if isinstance(spectra, Stats):
        raise TypeError("spectra must be name → LayerSpectrum: pass sap_fast.spectrum.spectra(stats), "
                        "not the Stats themselves")
    if spectra is not None:
        if not isinstance(spectra, Mapping):
            raise TypeError(f"spectra must be a dict name → LayerSpectrum, got {type(spectra).__name__}")
        for name, sp in spectra.items():
            if not isinstance(sp, LayerSpectrum):
                raise TypeError(f"spectra[{name!r}] is a {type(sp).__name__}, not a LayerSpectrum "
                                "(pass sap_fast.spectrum.spectra(stats))")


def _label(alpha: Optional[float]) -> str:
    return "no projection" if alpha is None else f"α = {alpha:.3g}"


def _round(x: float) -> float:
    """6 significant digits: readable JSON; the report is a summary, not a checkpoint."""
    return float(f"{x:.6g}")


def _energies(sp: LayerSpectrum) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(e, s, d): eigenvalues and ``s = e/Σe`` per group, float64 on the CPU, sorted descending."""
    e = sp.eigvals.detach().to("cpu", torch.float64).clamp_min(0)
    e = e.sort(-1, descending=True).values
    return e, LayerSpectrum(e, sp.basis).energies, int(sp.basis.shape[-2])


# -- numbers -------------------------------------------------------------------------------------
def layer_summary(sp: LayerSpectrum, alpha: Optional[float] = None,
                  rank_rtol: float = RANK_RTOL) -> Dict[str, Any]:
    """The per-layer figures of the module docstring for one spectrum (averaged over groups)."""
    e, s, d = _energies(sp)
    groups, r = e.shape
    emax = e[:, :1]
    rank = ((e > rank_rtol * emax) & (emax > 0)).sum(-1).double()
    entropy = -torch.where(s > 0, s * s.clamp_min(1e-300).log(), torch.zeros_like(s)).sum(-1)
    erank = torch.where(s.sum(-1) > 0, entropy.exp(), torch.zeros_like(entropy))

    def top(fraction: float) -> torch.Tensor:
        k = min(max(1, math.ceil(fraction * d - 1e-9)), r)
        return s[:, :k].sum(-1)

    def mean(x: torch.Tensor, count: bool = False):
        v = float(x.double().mean())
        return int(round(v)) if count and groups == 1 else _round(v)

    out = {"d": d, "groups": groups, "r": r, "basis": "full" if r == d else "thin",
           "rank": mean(rank, count=True), "effective_rank": mean(erank),
           "energy_top_1pct": mean(top(0.01)), "energy_top_10pct": mean(top(0.10)),
           "lambda_gt_half": None, "lambda_mean": None}
    if alpha is not None:
        lam = importance(s, alpha)
        out["lambda_gt_half"] = mean((lam > 0.5).sum(-1), count=True)
        out["lambda_mean"] = mean(lam.sum(-1) / d)
    return out


def report_data(*, sweep=None, spectra: Optional[Mapping[str, LayerSpectrum]] = None,
                alpha: Optional[float] = None, extra: Optional[Mapping[str, Any]] = None,
                test_accuracy: Optional[Mapping[Optional[float], float]] = None,
                rank_rtol: float = RANK_RTOL) -> Dict[str, Any]:
    """A JSON-friendly summary of a run (every value already plain JSON: nan/inf → None).

    Args:
        sweep: the :class:`sap_fast.SweepResult` of :func:`sap_fast.sweep` (optional).
        spectra: name → :class:`LayerSpectrum`, as :func:`sap_fast.spectrum.spectra` returns.
        alpha: α* for the λ figures; default: the sweep's best α (None there = no projection won).
        extra: anything else to record (test accuracies, timings, noise info), under ``"extra"``,
            converted by :func:`sap_fast._runtime.io.to_jsonable`.
        test_accuracy: α → test accuracy (fractions in [0, 1]; key None = no projection),
            recorded under ``"test_accuracy"``.
        rank_rtol: the relative eigenvalue threshold of ``rank``.

    Returns:
        ``{"format", "version", "alpha", "alpha_source", "alpha_label", "rank_rtol",
        "sweep": {"best_alpha", "rows": [{"alpha", "label", "val_accuracy", "val_loss",
        "refined", "best"}, ...]} | None, "test_accuracy": [{"alpha", "label", "accuracy"}] | None,
        "layers": {name: {...}} | None, "extra": {...} | None}``; α = None reads "no projection".
    """
    _check_inputs(sweep, spectra)
    chosen, source = _chosen_alpha(sweep, alpha)
    out: Dict[str, Any] = {"format": FORMAT, "version": VERSION, "alpha": chosen, "alpha_source": source,
                           "alpha_label": None if source is None else _label(chosen),
                           "rank_rtol": rank_rtol, "sweep": None, "test_accuracy": None,
                           "layers": None, "extra": None}
    if sweep is not None:
        out["sweep"] = {"best_alpha": sweep.best_alpha, "rows": [
            {"alpha": row.alpha, "label": _label(row.alpha), "val_accuracy": row.val_accuracy,
             "val_loss": row.val_loss, "refined": row.refined, "best": row.alpha == sweep.best_alpha}
            for row in sweep.table]}
    if test_accuracy:
        out["test_accuracy"] = [{"alpha": a, "label": _label(a), "accuracy": float(v)}
                                for a, v in _sorted_alphas(test_accuracy)]
    if spectra is not None:
        out["layers"] = {name: layer_summary(sp, chosen, rank_rtol) for name, sp in spectra.items()}
    if extra is not None:
        out["extra"] = dict(extra)
    return to_jsonable(out, "report")


def _sorted_alphas(values: Mapping) -> List[Tuple[Optional[float], float]]:
    """(α, value) pairs, "no projection" (None) first, then by α."""
    items = [(None if a is None else float(a), v) for a, v in values.items()]
    return sorted(items, key=lambda av: (av[0] is not None, av[0] or 0.0))


# -- figure --------------------------------------------------------------------------------------
def _pick(names: List[str], cap: int) -> List[str]:
    """At most ``cap`` names, evenly spread over the list (first and last always in)."""
    if len(names) <= cap:
        return list(names)
    idx = sorted({round(i * (len(names) - 1) / (cap - 1)) for i in range(cap)})
    return [names[i] for i in idx]


def _colors(n: int) -> list:
    import matplotlib

    tab = matplotlib.colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # the 10 strong colours first
    return [tab(order[i % 20]) for i in range(n)]


def _accuracy_panel(ax, sweep, chosen, source, test_accuracy) -> None:
    val_color, test_color, pick_color = "C0", "C1", "C3"
    if sweep is not None:
        rows = sorted((r for r in sweep.table if r.alpha is not None), key=lambda r: r.alpha)
        ax.plot([r.alpha for r in rows], [100 * r.val_accuracy for r in rows], "o-", color=val_color,
                ms=4, label="validation")
        refined = [r for r in rows if r.refined]
        if refined:
            ax.plot([r.alpha for r in refined], [100 * r.val_accuracy for r in refined], "o",
                    color=val_color, mfc="white", ms=6, label="validation (refined α)")
        base = next((r for r in sweep.table if r.alpha is None), None)
        if base is not None:
            ax.axhline(100 * base.val_accuracy, color=val_color, ls="--", lw=1.2,
                       label=f"no projection, validation ({100 * base.val_accuracy:.1f}%)")
    if test_accuracy:
        pts = _sorted_alphas(test_accuracy)
        xs = [a for a, _ in pts if a is not None]
        if xs:
            ax.plot(xs, [100 * v for a, v in pts if a is not None], "s-", color=test_color, ms=4,
                    label="test")
        base = [v for a, v in pts if a is None]
        if base:
            ax.axhline(100 * base[0], color=test_color, ls="--", lw=1.2,
                       label=f"no projection, test ({100 * base[0]:.1f}%)")
    if chosen is not None:
        ax.axvline(chosen, color=pick_color, ls=":", lw=1.5, label=f"chosen α* = {chosen:.3g}")
        row = None if sweep is None else next((r for r in sweep.table if r.alpha == chosen), None)
        if row is not None:
            ax.plot([chosen], [100 * row.val_accuracy], "*", color=pick_color, ms=14, zorder=5)
    shown = {a for a in ([r.alpha for r in sweep.table] if sweep is not None else []) + list(test_accuracy or ())
             if a is not None} | ({chosen} if chosen is not None else set())
    if len(shown) == 1:  # one α: a decade either side, not a zero-width axis
        only = shown.pop()
        ax.set_xlim(only / 10, only * 10)
    ax.set_xscale("log")
    ax.set_xlabel("α (log scale)")
    ax.set_ylabel("accuracy (%)")
    what = "" if source is None else f" — chosen: {_label(chosen).replace('α', 'α*')}"
    ax.set_title("accuracy vs α" + what)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.legend(fontsize="small", loc="best")


def _spectra_panel(ax, spectra, chosen) -> None:
    names = _pick(list(spectra), MAX_LAYERS_PLOTTED)
    colors = _colors(len(names))
    curves = []
    floor = 1.0
    for name, color in zip(names, colors):
        _, s, d = _energies(spectra[name])
        groups = s.shape[0]
        mean_s = s.mean(0)
        x = (torch.arange(1, s.shape[1] + 1, dtype=torch.float64) / d).numpy()
        shown = torch.where(mean_s > S_FLOOR, mean_s, torch.full_like(mean_s, float("nan")))
        if bool((mean_s > S_FLOOR).any()):
            floor = min(floor, float(mean_s[mean_s > S_FLOOR].min()))
        label = f"{name} (d={d}" + (f", {groups} groups" if groups > 1 else "") + ")"
        ax.plot(x, shown.numpy(), color=color, lw=1.5, label=label)
        curves.append((x, s, color))
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(floor / 2, S_FLOOR))
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("direction rank / width d (strongest first)")
    ax.set_ylabel("normalised energy s = e / Σe (solid)")
    capped = f" ({len(names)} of {len(spectra)} layers)" if len(names) < len(spectra) else ""
    handles_ax = ax
    if chosen is not None:
        ax.axhline(1.0 / (chosen + 1.0), color="0.4", ls=":", lw=1.2,
                   label="s = 1/(α*+1), where λ = ½")
        twin = ax.twinx()
        for x, s, color in curves:
            twin.plot(x, importance(s, chosen).mean(0).numpy(), color=color, ls="--", lw=1.1)
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("importance λ(α*) (dashed)")
        ax.set_title(f"layer spectra and λ at α* = {chosen:.3g}{capped}")
        handles_ax = twin  # the legend goes on the top axes, or the dashed lines would cross it
    else:
        ax.set_title(f"layer spectra{capped}")
    ax.grid(True, which="major", alpha=0.4)
    handles, labels = ax.get_legend_handles_labels()
    handles_ax.legend(handles, labels, fontsize="x-small", loc="lower left",
                      ncol=2 if len(handles) > 7 else 1, framealpha=0.9)


def plot_report(*, sweep=None, spectra: Optional[Mapping[str, LayerSpectrum]] = None,
                alpha: Optional[float] = None,
                test_accuracy: Optional[Mapping[Optional[float], float]] = None,
                title: Optional[str] = None):
    """The report figure (a ``matplotlib.figure.Figure`` on an Agg canvas; never shown, no pyplot
    state: save it with :func:`sap_fast._runtime.io.save_figure` or ``fig.savefig``).

    Panel "accuracy vs α" (when ``sweep`` or ``test_accuracy`` is given): validation accuracy per
    α on a log-x axis, "no projection" as a horizontal dashed line, α* as a dotted vertical line
    and a star, and test accuracy per α (``test_accuracy``: α → fraction, key None = no
    projection) in a second colour.

    Panel "layer spectra" (when ``spectra`` is given): per layer, ``s = e/Σe`` sorted descending
    (log-y) against rank / d, one colour per layer (at most 12 layers, evenly picked; legend with
    names and widths); with an α*, λ(α*) = α s/((α−1)s+1) dashed on a twin 0..1 axis in the same
    colours, and the level s = 1/(α*+1) where λ crosses ½ dotted. Grouped layers: group averages.

    α* is ``alpha`` if given, else the sweep's best α (no λ overlay when "no projection" won).
    Axes: one per panel, plus the λ twin axis. Raises ValueError when there is nothing to plot.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_report needs matplotlib: pip install matplotlib") from e
    _check_inputs(sweep, spectra)
    chosen, source = _chosen_alpha(sweep, alpha)
    has_acc = sweep is not None or bool(test_accuracy)
    has_spec = bool(spectra)
    if not (has_acc or has_spec):
        raise ValueError("plot_report: nothing to plot; pass sweep=, spectra= and/or test_accuracy=")
    panels = int(has_acc) + int(has_spec)
    fig = Figure(figsize=(6.6 * panels, 5.0))
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if has_acc:
        _accuracy_panel(axes.pop(0), sweep, chosen, source, test_accuracy)
    if has_spec:
        _spectra_panel(axes.pop(0), spectra, chosen)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- files ---------------------------------------------------------------------------------------
def write_report(folder: str | os.PathLike, *, sweep=None,
                 spectra: Optional[Mapping[str, LayerSpectrum]] = None, alpha: Optional[float] = None,
                 test_accuracy: Optional[Mapping[Optional[float], float]] = None,
                 extra: Optional[Mapping[str, Any]] = None, title: Optional[str] = None
                 ) -> Dict[str, Optional[str]]:
    """Write ``report.json`` (:func:`report_data`, plus ``"title"``) and ``report.png``
    (:func:`plot_report`, 120 dpi) atomically into ``folder``, which must exist.

    Returns ``{"json": path, "png": path}``; ``"png"`` is None when there is nothing to plot
    (no sweep, spectra or test accuracy: only ``extra``).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"report folder {folder!r} does not exist (create it first)")
    data = report_data(sweep=sweep, spectra=spectra, alpha=alpha, extra=extra,
                       test_accuracy=test_accuracy)
    data["title"] = title
    paths: Dict[str, Optional[str]] = {"json": os.path.join(folder, "report.json"), "png": None}
    if sweep is not None or spectra or test_accuracy:
        fig = plot_report(sweep=sweep, spectra=spectra, alpha=alpha, test_accuracy=test_accuracy,
                          title=title)
        paths["png"] = os.path.join(folder, "report.png")
        save_figure(paths["png"], fig, dpi=120)
    save_json(paths["json"], data)
    return paths
