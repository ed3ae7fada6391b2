"""SAP and the methods it is compared with, side by side, each with a small hyperparameter search.

    sap-fast compare [--settings sym10 sym25 asym25] [--seeds 0 1 2] [--methods ...]
                     [--budget sap=600 ...] [--grid search|defaults] [--no-privacy]
                     [--out sap_fast_out/compare]
    (benchmarks/compare_methods.py runs the full table and writes it to benchmarks/results/)

**Corrective setting** (the SAP paper's): a model trained on noisy labels; nobody knows which
labels are wrong. Every method gets its retain set from :func:`sap_fast.select_trusted` (lowest
loss, class-balanced) and its forget set from :func:`sap_fast.select_suspects` (highest loss),
tries each point of its grid, and keeps the one with the best accuracy on the *noisy*
validation split (ties: lower loss). Reported: clean test accuracy of the kept model, the number
of trials, and the wall time of the whole search (selection included).

**Privacy setting** (UGradSL's and ManiF-SMC's own task): a model trained on clean labels, a
random 10% of its training set to forget; each method is judged by UA/RA/TA/MIA and by Avg Gap to
a model retrained without the forget set (the literature selects hyperparameters on that gap,
and so does this harness; :mod:`sap_fast.unlearning_metrics`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import baselines, io
from .evaluate import evaluate
from .forward import progress
from .select import lowest_per_class, sample_scores
from .unlearning_metrics import KEYS, avg_gap, unlearning_metrics

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
# published corrective budget 600/120 (methods.md: "reuse SSD's ... and report the choice").
def correctors(budgets: Optional[Dict[str, tuple]] = None) -> Dict[str, Corrector]:
    """The methods as the harness runs them; ``budgets`` overrides sizes: ``{name: (retain, forget)}``."""
    table = _default_correctors()
    for name, budget in (budgets or {}).items():
        if name not in table:
            raise ValueError(f"budget for unknown method {name!r}; choose from {', '.join(table)}")
        retain, forget = budget
        c = table[name]
        if isinstance(retain, bool) or not isinstance(retain, int) or retain < 1:
            raise ValueError(f"{name}: the retain budget must be a positive int, got {retain!r}")
        if c.forget == 0 and forget:
            raise ValueError(f"{name} uses no forget set; give its budget as {name}={retain}")
        if c.forget and (isinstance(forget, bool) or not isinstance(forget, int) or forget < 1):
            raise ValueError(f"{name}: the forget budget must be a positive int, got {forget!r}; "
                             f"give it as {name}={retain}/<forget>")
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


# ---- the digits comparison (CLI and benchmarks/compare_methods.py) ---------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="noise settings: sym10, sym25 (symmetric 10%%/25%%), asym25 (asymmetric 25%%)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"subset of: {', '.join(correctors())} (default: all)")
    parser.add_argument("--budget", action="append", default=[], metavar="METHOD=RETAIN[/FORGET]",
                        help="sample budget of a method, e.g. sap=600 or scrub=600/120 (repeatable)")
    parser.add_argument("--grid", choices=["search", "defaults"], default="search",
                        help="search: each method's small grid; defaults: one trial per method")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs of the noisy/clean CNNs")
    parser.add_argument("--no-privacy", action="store_true", help="skip the random-forget (privacy) table")
    parser.add_argument("--forget-fraction", type=float, default=0.1,
                        help="privacy setting: share of the training set to forget (default 0.1)")
    parser.add_argument("--out", default=os.path.join("sap_fast_out", "compare"),
                        help="folder for compare.json, compare.md and compare.png (created)")
    parser.add_argument("--cache", default=None, help="trained-model cache (default: the demo's)")
    parser.add_argument("--no-cache", action="store_true")


def _budgets(items: List[str]) -> Dict[str, tuple]:
    """``["sap=600", "scrub=600/120"]`` → ``{"sap": (600, 0), "scrub": (600, 120)}``."""
    out = {}
    for item in items:
        name, _, sizes = item.partition("=")
        try:
            retain, _, forget = sizes.partition("/")
            out[name.strip()] = (int(retain), int(forget) if forget else 0)
        except ValueError:
            raise ValueError(f"--budget {item!r}: use METHOD=RETAIN or METHOD=RETAIN/FORGET, "
                             "e.g. sap=600 or scrub=600/120") from None
    return out


def _mean_std(values: List[float], scale: float = 100.0) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _privacy_split(n: int, fraction: float, seed: int):
    gen = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(n, generator=gen)
    k = max(1, round(fraction * n))
    return torch.sort(perm[k:]).values, torch.sort(perm[:k]).values


def run(args: argparse.Namespace) -> int:
    """The ``compare`` command (arguments from :func:`add_arguments`)."""
    from . import demo
    budgets = _budgets(args.budget)
    table = correctors(budgets)
    methods = args.methods or list(table)
    for m in methods:
        if m not in table:
            raise ValueError(f"--methods: unknown method {m!r}; choose from {', '.join(table)}")
    if not 0 < args.forget_fraction < 1:
        raise ValueError(f"--forget-fraction must be in (0, 1), got {args.forget_fraction}")
    if args.epochs < 1:
        raise ValueError("--epochs must be positive")
    # tiny tensors: one thread is as fast as two here and does not stall on shared cores; it also
    # makes every number independent of the machine's core count
    torch.set_num_threads(1)
    cache = None if args.no_cache else (args.cache or demo.default_cache_dir())
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()

    corrective: Dict[str, Dict[str, list]] = {}  # setting → method → per-seed records
    for setting in args.settings:
        kind, rate = SETTINGS[setting]
        for seed in args.seeds:
            d = demo.noisy_model(seed, kind, rate, args.epochs, cache)
            train = (d["x_train"], d["y_train_noisy"])
            val, test = (d["x_val"], d["y_val_noisy"]), (d["x_test"], d["y_test"])
            out = compare_correctors(d["model"], train, val, test, methods=methods, seed=seed, grid=args.grid,
                                     budgets=budgets)
            rows = corrective.setdefault(setting, {})
            rows.setdefault("vanilla", []).append({"seed": seed, "test": d["test_acc"], "trials": 0})
            rows.setdefault("retrain", []).append(
                {"seed": seed, "test": demo.retrain_accuracy(d, kind, rate, args.epochs, cache), "trials": 0})
            corrupted = d["corrupted_train"]
            for name, o in out.items():
                f = o.extra["forget_idx"]
                rows.setdefault(name, []).append({
                    "seed": seed, "test": o.test_accuracy, "val": o.val_accuracy, "trials": o.trials,
                    "seconds": o.seconds, "chosen": o.chosen,
                    "retain_clean": 1 - float(corrupted[o.extra["retain_idx"]].float().mean()),
                    "forget_corrupted": None if f is None else float(corrupted[f].float().mean()),
                    "table": [t.__dict__ for t in o.table]})
            print(f"{setting} seed {seed}: " + ", ".join(
                f"{table[n].label if n in table else n} {100 * rows[n][-1]['test']:.1f}"
                for n in ["vanilla", "retrain", *methods]), flush=True)

    privacy: Dict[str, list] = {}
    if not args.no_privacy:
        for seed in args.seeds:
            d = demo.noisy_model(seed, "symmetric", 0.0, args.epochs, cache)
            keep, drop = _privacy_split(len(d["y_train"]), args.forget_fraction, seed)
            x, y = d["x_train"], d["y_train"]
            retain, forget, test = (x[keep], y[keep]), (x[drop], y[drop]), (d["x_test"], d["y_test"])
            # Retrain = the same recipe without the forget set (the demo's Retrain drops "corrupted")
            retrained = demo.retrain_model({**d, "corrupted_train": _mask(len(y), drop)}, "forget",
                                           args.forget_fraction, args.epochs, cache)
            out = compare_privacy(d["model"], retain, forget, test, retrained, methods=methods, seed=seed,
                                  grid=args.grid)
            for name, o in out.items():
                privacy.setdefault(name, []).append({"seed": seed, "trials": o.trials, "seconds": o.seconds,
                                                     "chosen": o.chosen, **o.extra["metrics"],
                                                     "avg_gap": o.extra["avg_gap"]})
            gaps = ", ".join(f"{n} gap {o.extra['avg_gap']:.2f}" for n, o in out.items())
            print(f"privacy seed {seed}: {gaps}", flush=True)

    md = markdown(corrective, privacy, methods, args, table)
    print("\n" + md)
    result = {"command": "compare", "settings": {s: SETTINGS[s] for s in args.settings}, "seeds": args.seeds,
              "grid": args.grid, "epochs": args.epochs, "forget_fraction": args.forget_fraction,
              "budgets": {n: {"retain": table[n].retain, "forget": table[n].forget} for n in methods},
              "grids": {n: table[n].grid for n in methods}, "corrective": corrective, "privacy": privacy,
              "environment": _environment(), "seconds": time.perf_counter() - started}
    paths = {"json": os.path.join(args.out, "compare.json"), "md": os.path.join(args.out, "compare.md")}
    io.save_json(paths["json"], result)
    text = (md + "\n").encode()
    io.atomic_write(paths["md"], lambda f: f.write(text))
    png = plot(corrective, methods, os.path.join(args.out, "compare.png"))
    if png:
        paths["png"] = png
    print(f"wrote {', '.join(paths.values())}")
    return 0


def _mask(n: int, idx: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m


def _environment() -> dict:
    import platform
    import sys
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    command = (["python", *sys.argv] if script.endswith(".py") and script != "__main__.py"
               else ["sap-fast", *sys.argv[1:]])
    return {"command": " ".join(command),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def markdown(corrective, privacy, methods, args, table: Dict[str, Corrector]) -> str:
    lines = []
    if corrective:
        settings = list(corrective)
        lines.append(f"Clean test accuracy (%), mean ± std over seeds {', '.join(map(str, args.seeds))}; "
                     "hyperparameters chosen on the noisy validation split.\n")
        lines.append("| method | " + " | ".join(SETTING_NAMES[s] for s in settings) +
                     " | trials | search time / run | retain / forget |")
        lines.append("|---|" + "---:|" * len(settings) + "---:|---:|---|")
        for name in ["vanilla", "retrain", *methods]:
            label = {"vanilla": "Vanilla (noisy model)", "retrain": "Retrain (clean subset, oracle)"}.get(
                name, table[name].label if name in table else name)
            cells = [_mean_std([r["test"] for r in corrective[s][name]]) for s in settings]
            runs = [r for s in settings for r in corrective[s][name]]
            trials = runs[0]["trials"] if runs else 0
            secs = [r["seconds"] for r in runs if "seconds" in r]
            budget = "—" if name not in table else (f"{table[name].retain} trusted" if table[name].run is None
                                                    else f"{table[name].retain} / {table[name].forget or '—'}")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {trials or '—'} | "
                         f"{f'{statistics.mean(secs):.2f} s' if secs else '—'} | {budget} |")
    if privacy:
        lines.append(f"\nRandom forgetting ({100 * args.forget_fraction:.0f}% of the clean training set), "
                     "mean ± std over seeds; hyperparameters chosen on Avg Gap to Retrain; MIA = "
                     "loss-threshold attack, share of the forget set called non-member.\n")
        lines.append("| method | UA | RA | TA | MIA | Avg Gap ↓ | trials | search time / run |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        order = ["retrain", "original", *[n for n in methods if n in privacy]]
        for name in order:
            if name not in privacy:
                continue
            runs = privacy[name]
            label = {"retrain": "Retrain (gold standard)", "original": "Original (no unlearning)"}.get(
                name, table[name].label if name in table else name)
            cells = [_mean_std([r[k] for r in runs], 1.0) for k in KEYS]
            gap = _mean_std([r["avg_gap"] for r in runs], 1.0)
            secs = statistics.mean(r["seconds"] for r in runs)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {gap} | {runs[0]['trials'] or '—'} | "
                         f"{f'{secs:.2f} s' if runs[0]['trials'] else '—'} |")
    return "\n".join(lines)


def plot(corrective, methods, path: str) -> Optional[str]:
    """Grouped bars: test accuracy per method per setting (mean, std as error bars)."""
    if not corrective:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table = correctors()
    names = ["vanilla", *methods, "retrain"]
    settings = list(corrective)
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(names) * len(settings)), 4))
    width = 0.8 / len(settings)
    for i, s in enumerate(settings):
        means = [100 * statistics.mean(r["test"] for r in corrective[s][n]) for n in names]
        stds = [100 * statistics.stdev(r["test"] for r in corrective[s][n]) if len(corrective[s][n]) > 1 else 0
                for n in names]
        xs = [j + (i - (len(settings) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, means, width, yerr=stds, label=SETTING_NAMES.get(s, s), capsize=2)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([{"vanilla": "Vanilla", "retrain": "Retrain"}.get(n, table[n].label if n in table else n)
                        for n in names], rotation=30, ha="right")
    lo = min(100 * min(r["test"] for s in settings for n in names for r in corrective[s][n]) - 5, 90)
    ax.set_ylim(max(0, lo), 100)
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title("digits: correctors on noisy-label models")
    ax.legend(title="label noise", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    io.save_figure(path, fig)
    plt.close(fig)
    return path
