"""``sap-fast compare``: SAP and the methods it is compared with on the digits default, as a
table (``compare.md``), every trial (``compare.json``) and a bar chart (``compare.png``).

    sap-fast compare [--settings sym10 sym25 asym25] [--seeds 0 1 2] [--methods ...]
                     [--budget sap=600 ...] [--grid search|defaults] [--no-privacy]
                     [--out sap_fast_out/compare]
    (benchmarks/compare_methods.py runs the full table and writes it to benchmarks/results/)

The harness itself (budgets, grids, selection rules) is :mod:`sap_fast.experiments.compare`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Optional

import torch

from .._runtime import io
from ..experiments import digits
from ..experiments.compare import (SETTING_NAMES, SETTINGS, Corrector, compare_correctors,
                                   compare_privacy, correctors)
from ..experiments.metrics import KEYS


__all__ = ["add_arguments", "run", "markdown", "plot"]


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
    cache = None if args.no_cache else (args.cache or digits.default_cache_dir())
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()

    corrective: Dict[str, Dict[str, list]] = {}  # setting → method → per-seed records
    for setting in args.settings:
        kind, rate = SETTINGS[setting]
        for seed in args.seeds:
            d = digits.noisy_model(seed, kind, rate, args.epochs, cache)
            train = (d["x_train"], d["y_train_noisy"])
            val, test = (d["x_val"], d["y_val_noisy"]), (d["x_test"], d["y_test"])
            out = compare_correctors(d["model"], train, val, test, methods=methods, seed=seed, grid=args.grid,
                                     budgets=budgets)
            rows = corrective.setdefault(setting, {})
            rows.setdefault("vanilla", []).append({"seed": seed, "test": d["test_acc"], "trials": 0})
            rows.setdefault("retrain", []).append(
                {"seed": seed, "test": digits.retrain_accuracy(d, kind, rate, args.epochs, cache), "trials": 0})
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
            d = digits.noisy_model(seed, "symmetric", 0.0, args.epochs, cache)
            keep, drop = _privacy_split(len(d["y_train"]), args.forget_fraction, seed)
            x, y = d["x_train"], d["y_train"]
            retain, forget, test = (x[keep], y[keep]), (x[drop], y[drop]), (d["x_test"], d["y_test"])
            # Retrain = the same recipe without the forget set (the demo's Retrain drops "corrupted")
            retrained = digits.retrain_model({**d, "corrupted_train": _mask(len(y), drop)}, "forget",
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
