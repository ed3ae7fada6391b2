"""SAP and the methods it is compared with, side by side, each with a small hyperparameter search.

The harness; the command that runs it on the digits and writes the table is ``sap-fast compare``
(:mod:`sap_fast.cli.compare`; ``benchmarks/compare_methods.py`` writes it to benchmarks/results/).

**Corrective setting** (the SAP paper's): a model trained on noisy labels; nobody knows which
labels are wrong. Every method gets its retain set from :func:`sap_fast.select_trusted` (lowest
loss, class-balanced) and its forget set from :func:`sap_fast.select_suspects` (highest loss),
tries each point of its grid, and keeps the one with the best accuracy on the *noisy*
validation split (ties: lower loss). Reported: clean test accuracy of the kept model, the number
of trials, and the wall time of the whole search (selection included).

**Privacy setting** (UGradSL's and ManiF-SMC's own task): a model trained on clean labels, a
random 10% of its training set to forget; each method is judged by UA/RA/TA/MIA and by Avg Gap to
a model retrained without the forget set (the literature selects hyperparameters on that gap,
and so does this harness; :mod:`sap_fast.experiments.metrics`).

The protocol, budgets and metrics: ``docs/methods.md#corrective-protocol`` and
``docs/methods.md#unlearning-metrics``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .. import baselines
from .._runtime import checks
from .._runtime.evaluate import evaluate
from .._runtime.forward import progress
from ..select import lowest_per_class, sample_scores
from .metrics import KEYS, avg_gap, unlearning_metrics

__all__ = ["SETTINGS", "SETTING_NAMES", "Corrector", "correctors", "Trial", "Outcome", "validation_score",
           "search", "compare_correctors", "compare_privacy"]

SETTINGS = {"sym10": ("symmetric", 0.10), "sym25": ("symmetric", 0.25), "asym25": ("asymmetric", 0.25)}
SETTING_NAMES = {"sym10": "symmetric 10%", "sym25": "symmetric 25%", "asym25": "asymmetric 25%"}


def _grid(**axes) -> List[dict]:
    """Every combination of the axes, in order (the last axis varies fastest)."""
    points = [{}]
    for name, values in axes.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


@dataclass
class Corrector:
    """A method as the harness runs it: its function, retain/forget budgets, and search grid."""
    name: str
    label: str
    retain: int                  # retain (trusted) samples; SAP: its trusted set
    forget: int = 0              # forget (suspect) samples; 0 = the method uses none
    grid: List[dict] = field(default_factory=lambda: [{}])
    privacy: bool = True         # also judged in the privacy setting
    uses_val: bool = False       # takes val= (Finetune keeps its best-validation epoch)

    @property
    def run(self) -> Optional[Callable]:
        """The baseline (``method(model, retain, forget, **hp)``); None for SAP, run by the harness."""
        return None if self.name == "sap" else baselines.METHODS[self.name]


# Budgets on the digits default (1293 training samples). The SAP paper's CIFAR budgets (45 000
# samples) are Finetune 5000, SSD 5000/1000, SCRUB 1000/200, SAP 1000; scaled to digits: SAP keeps
# the demo's 300 trusted samples, SCRUB 300/60, and Finetune, SSD and the methods with no
# published corrective budget 600/120 (SSD's, as docs/methods.md#corrective-protocol says).
def correctors(budgets: Optional[Dict[str, tuple]] = None) -> Dict[str, Corrector]:
    """The methods as the harness runs them; ``budgets`` overrides sizes: ``{name: (retain, forget)}``."""
    table = _default_correctors()
    for name, budget in (budgets or {}).items():
        if name not in table:
            raise ValueError(f"budget for unknown method {name!r}; choose from {', '.join(table)}")
        retain, forget = budget
        c = table[name]
        checks.positive_int(retain, "the retain budget", where=name)
        if c.forget == 0 and forget:
            raise ValueError(f"{name} uses no forget set; give its budget as {name}={retain}")
        if c.forget:
            checks.positive_int(forget, "the forget budget", where=name)
        table[name] = dataclasses.replace(c, retain=retain, forget=forget if c.forget else 0)
    return table


def _default_correctors() -> Dict[str, Corrector]:
    return {c.name: c for c in [
        Corrector("finetune", "Finetune", 600,
                  grid=_grid(lr=[3e-2, 1e-1, 3e-1], epochs=[10, 20, 40]), uses_val=True),
        Corrector("ssd", "SSD", 600, 120,
                  # α at or above R = #batches(retain+forget)/#batches(forget) (6 here) selects
                  # nothing (see ssd's docstring), so the grid stays below R
                  grid=_grid(selection_weighting=[0.5, 1.0, 3.0, 5.0, 5.7],
                             dampening_constant=[1.0, 3.0, 4.8, 5.7])),
        Corrector("scrub", "SCRUB", 300, 60,
                  grid=_grid(epochs=[3, 5], msteps=[1, 2, 3], lr=[5e-3, 1e-2, 2e-2, 4e-2],
                             kd_weight=[0.001, 0.5])),
        Corrector("gradient_ascent", "GA", 600, 120,
                  grid=_grid(lr=[1e-4, 1e-3, 3e-3, 1e-2], epochs=[5, 10], batch_size=[32], max_grad_norm=[5.0])),
        Corrector("random_labels", "RL", 600, 120,
                  grid=_grid(lr=[3e-3, 1e-2, 3e-2, 1e-1], epochs=[5, 10], batch_size=[64])),
        # UGradSL(+) defaults are unpublished; the grid brackets ours (α −1, β 0.99, lr 0.03)
        Corrector("ugradsl", "UGradSL", 600, 120,
                  grid=_grid(smoothing=[-0.5, -1.0, -2.0], beta=[0.9, 0.99], lr=[0.01, 0.03, 0.1])),
        Corrector("ugradsl_plus", "UGradSL+", 600, 120,
                  grid=_grid(smoothing=[-0.5, -1.0, -2.0], beta=[0.9, 0.99], lr=[0.01, 0.03, 0.1])),
        # the SMC margin costs ~1 s per epoch here, so epochs stop at 5; the loss scale s is
        # left out: under Adam it cancels
        Corrector("manif_smc", "ManiF-SMC", 600, 120,
                  grid=_grid(with_label=[False, True], lr=[5e-4, 2e-3, 5e-3], epochs=[1, 5])),
        Corrector("sap", "SAP", 300, privacy=False),
    ]}


@dataclass
class Trial:
    hyperparameters: dict
    metrics: dict                # what the selection looked at
    error: Optional[str] = None  # a run that diverged counts as a trial and loses
    warnings: List[str] = field(default_factory=list)


@dataclass
class Outcome:
    method: str
    test_accuracy: float
    val_accuracy: float
    trials: int
    seconds: float
    chosen: Optional[dict]
    table: List[Trial]
    extra: dict = field(default_factory=dict)


def validation_score(val) -> Callable[[nn.Module], tuple]:
    """The corrective selection rule: noisy-validation accuracy, then lower loss (as SAP's sweep)."""
    def score(m):
        e = evaluate(m, val, show_progress=False)
        return (e.accuracy, -e.loss), {"val_accuracy": e.accuracy, "val_loss": e.loss}
    return score


def search(corrector: Corrector, model: nn.Module, retain, forget, *, seed: int,
           score: Callable[[nn.Module], tuple], val=None) -> tuple:
    """Run every grid point; return (best model, best hyperparameters, trials). ``score`` maps a
    model to (key to maximise, metrics to record); the first of equal keys is kept."""
    best, best_key, best_hp, trials = None, None, None, []
    extra = {"val": val} if corrector.uses_val else {}
    for hp in progress(corrector.grid, desc=corrector.label, total=len(corrector.grid)):
        with warnings.catch_warnings(record=True) as caught:  # kept with the trial, not printed
            warnings.simplefilter("always")
            try:
                out = corrector.run(model, retain, forget, seed=seed, show_progress=False, **extra, **hp)
            except FloatingPointError as err:  # diverged: a lost trial, as in a real search
                trials.append(Trial(hp, {}, str(err)))
                continue
        key, metrics = score(out)
        trials.append(Trial(hp, metrics, warnings=[str(w.message) for w in caught]))
        if best_key is None or key > best_key:
            best, best_key, best_hp = out, key, hp
    if best is None:  # every trial diverged: the method leaves the model as it was
        best = copy.deepcopy(model)
    return best, best_hp, trials


def _chosen_metrics(trials: List[Trial], chosen) -> Optional[dict]:
    """The metrics recorded when the chosen trial ran (None when no trial was chosen)."""
    return next((t.metrics for t in trials if t.hyperparameters is chosen), None)


def _with_grid(c: Corrector, grid: str) -> Corrector:
    if grid not in ("search", "defaults"):
        raise ValueError(f"grid must be 'search' or 'defaults', got {grid!r}")
    return c if grid == "search" else Corrector(c.name, c.label, c.retain, c.forget, [{}],
                                                c.privacy, c.uses_val)


def compare_correctors(model: nn.Module, train, val, test, *, methods: Optional[List[str]] = None,
                       seed: int = 0, grid: str = "search", alphas=None,
                       budgets: Optional[Dict[str, tuple]] = None) -> Dict[str, Outcome]:
    """Every method of :func:`correctors` (or ``methods``) on one noisy model.

    Args:
        model: trained on the noisy ``train`` labels; never modified.
        train, val, test: ``(inputs, targets)`` pairs: noisy training set, noisy validation split
            (selection), clean test set (only reported).
        grid: ``"search"`` (each method's grid) or ``"defaults"`` (one trial at the defaults).
        alphas: SAP's α candidates (None = its default grid).
        budgets: ``{name: (retain, forget)}`` sample budgets replacing the defaults.
    """
    import sap_fast
    table = correctors(budgets)
    names = list(table) if methods is None else methods
    for n in names:
        if n not in table:
            raise ValueError(f"unknown method {n!r}; choose from {', '.join(table)}")
    results: Dict[str, Outcome] = {}
    # one scoring pass serves every budget (select_suspects / select_trusted rank these scores)
    t = time.perf_counter()
    scores, labels, classes = sample_scores(model, train, show_progress=False)
    score_s = time.perf_counter() - t
    sets_cache: Dict[tuple, tuple] = {}

    def sets(c: Corrector):
        """Retain/forget sets for a budget, and the time the selection took (scoring included)."""
        key = (c.retain, c.forget)
        if key not in sets_cache:
            t = time.perf_counter()
            n = len(train[1])
            if c.forget >= n:
                raise ValueError(f"{c.name}: a forget set of {c.forget} needs more than the {n} training samples")
            f = lowest_per_class(-scores, labels, classes, c.forget) if c.forget else None
            # trusted samples from the rest, so retain and forget never share a sample
            rest = torch.ones(n, dtype=torch.bool)
            if f is not None:
                rest[f] = False
            rest = rest.nonzero().flatten()
            r = rest[lowest_per_class(scores[rest], labels[rest], classes, min(c.retain, rest.numel()))]
            took = time.perf_counter() - t + score_s
            sets_cache[key] = ((train[0][r], train[1][r]), None if f is None else (train[0][f], train[1][f]),
                               took, r, f)
        return sets_cache[key]

    for name in progress(names, desc="methods", total=len(names)):
        c = table[name]
        retain, forget, select_s, r_idx, f_idx = sets(c)
        t = time.perf_counter()
        if c.run is None:  # SAP: statistics once, then its α sweep (identity included)
            stats = sap_fast.collect_stats(model, retain[0], show_progress=False)
            swept = sap_fast.sweep(model, None, val, stats=stats, alphas=alphas, show_progress=False)
            best = swept.model
            trials = [Trial({"alpha": row.alpha}, {"val_accuracy": row.val_accuracy, "val_loss": row.val_loss})
                      for row in swept.table]
            chosen = next(t.hyperparameters for t, row in zip(trials, swept.table) if row is swept.best)
        else:
            best, chosen, trials = search(_with_grid(c, grid), model, retain, forget, seed=seed,
                                          score=validation_score(val), val=val)
        seconds = time.perf_counter() - t + select_s
        metrics = _chosen_metrics(trials, chosen) or {
            "val_accuracy": evaluate(best, val, show_progress=False).accuracy}  # every trial diverged
        results[name] = Outcome(name, evaluate(best, test, show_progress=False).accuracy,
                                metrics["val_accuracy"], len(trials), seconds, chosen, trials,
                                {"retain_idx": r_idx.tolist(),
                                 "forget_idx": None if f_idx is None else f_idx.tolist()})
    return results


def compare_privacy(model: nn.Module, retain, forget, test, retrained: nn.Module, *,
                    methods: Optional[List[str]] = None, seed: int = 0, grid: str = "search",
                    attack: str = "loss") -> Dict[str, Outcome]:
    """The privacy methods on a random-forget request; hyperparameters chosen on Avg Gap to
    ``retrained`` (trained on ``retain`` alone). ``extra`` holds UA/RA/TA/MIA and the gap."""
    table = correctors()
    names = [n for n in (methods or list(table)) if table[n].privacy]
    gold = unlearning_metrics(retrained, retain, forget, test, attack=attack)
    results = {"retrain": Outcome("retrain", gold["TA"] / 100, math.nan, 0, 0.0, None, [],
                                  {"metrics": gold, "avg_gap": 0.0})}

    def gap_score(m):  # smaller gap is better; record every metric
        metrics = unlearning_metrics(m, retain, forget, test, attack=attack)
        gap = avg_gap(metrics, gold)
        return (-gap,), {**metrics, "avg_gap": gap}

    for name in progress(names, desc="methods (privacy)", total=len(names)):
        c = table[name]
        t = time.perf_counter()
        # Finetune's best-epoch choice needs a labelled split: the retain set stands in here
        best, chosen, trials = search(_with_grid(c, grid), model, retain, forget, seed=seed,
                                      score=gap_score, val=retain)
        seconds = time.perf_counter() - t
        m = _chosen_metrics(trials, chosen) or gap_score(best)[1]  # the latter: every trial diverged
        results[name] = Outcome(name, m["TA"] / 100, math.nan, len(trials), seconds, chosen, trials,
                                {"metrics": {k: m[k] for k in KEYS}, "avg_gap": m["avg_gap"]})
    before = unlearning_metrics(model, retain, forget, test, attack=attack)
    results["original"] = Outcome("original", before["TA"] / 100, math.nan, 0, 0.0, None, [],
                                  {"metrics": before, "avg_gap": avg_gap(before, gold)})
    return results
