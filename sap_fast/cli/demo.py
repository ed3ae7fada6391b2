"""``sap-fast demo``: the embedded digits demo, label noise repaired by SAP, as a table and a report.

    sap-fast demo [--seeds 0 1 2] [--noise symmetric|asymmetric|hierarchical] [--rate 0.25]
                  [--trusted 300] [--alphas grid|auto] [--out sap_fast_out/demo] [--no-retrain]

Per seed (:func:`sap_fast.experiments.demo.run_seed`): noisy labels, a CNN that fits them
(cached, so a second run skips training), the "Retrain" reference on the clean subset, SAP with
α chosen on the *noisy* validation split; the table shows clean test accuracy, how much of the
corrupted training data the model still fits, and time per stage. Writes ``report.json`` and
``report.png`` (accuracy per α, per-layer spectra with λ) to ``--out``. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from ..experiments import digits
from ..experiments.demo import run_seed
from ..experiments.noise import NOISE_KINDS
from . import report


__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", choices=NOISE_KINDS, default="symmetric",
                        help="label-noise protocol (asymmetric: the CIFAR-10 class map on digit "
                             "indices; hierarchical: within look-alike digit groups)")
    parser.add_argument("--rate", type=float, default=0.25, help="label-noise rate (default 0.25)")
    parser.add_argument("--trusted", type=int, default=300, help="number of trusted samples")
    parser.add_argument("--alphas", choices=["grid", "auto"], default="grid",
                        help="grid: 1e1..1e6 in half-decades; auto: grid + golden-section refinement")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs of the noisy CNN")
    parser.add_argument("--no-retrain", action="store_true", help="skip the Retrain reference (faster)")
    parser.add_argument("--out", default=os.path.join("sap_fast_out", "demo"),
                        help="folder for report.json and report.png (created)")
    parser.add_argument("--cache", default=None,
                        help=f"trained-model cache folder (default $SAP_FAST_CACHE or {digits.default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="always train, never read or write the cache")
    parser.add_argument("--show-sweep", action="store_true", help="print every seed's α table")


def _pct(values) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}%"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}%"


def _memorised(before: dict, after: dict) -> str:
    """Share of the corrupted training samples predicted with their wrong label, before → after."""
    if before["memorised"] is None:  # no corrupted samples (rate 0)
        return "—"
    return f"{100 * before['memorised']:.1f}% → {100 * after['memorised']:.1f}%"


def run(args: argparse.Namespace) -> int:
    """The ``demo`` command (arguments from :func:`add_arguments`)."""
    if not 0 <= args.rate < 1:
        raise ValueError(f"--rate must be in [0, 1), got {args.rate}")
    if args.trusted < 1 or args.epochs < 1:
        raise ValueError("--trusted and --epochs must be positive")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.makedirs(args.out, exist_ok=True)
    cache = None if args.no_cache else (args.cache or digits.default_cache_dir())
    alphas = None if args.alphas == "grid" else "auto"
    retrain = not args.no_retrain

    print(f"digits, {100 * args.rate:.0f}% {args.noise} label noise, {args.trusted} trusted samples, "
          "α chosen on the noisy validation split\n")
    header = ["seed", "fits noisy train", "vanilla test", "SAP test"] + (["Retrain test"] if retrain else []) + \
        ["chosen α", "noisy val before → after", "trusted set clean", "memorised before → after",
         "time (train / SAP)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    runs = []
    for seed in args.seeds:
        r = run_seed(seed, args.rate, args.trusted, alphas, kind=args.noise, epochs=args.epochs,
                     retrain=retrain, cache=cache)
        runs.append(r)
        sap_time = r["times"]["select"] + r["times"]["stats"] + r["times"]["sweep"]
        alpha = "none" if r["alpha"] is None else f"{r['alpha']:.3g}"
        cells = [str(seed), f"{100 * r['train_acc_noisy']:.1f}%", f"{100 * r['vanilla_test']:.2f}%",
                 f"{100 * r['sap_test']:.2f}%"] + ([f"{100 * r['retrain_test']:.2f}%"] if retrain else []) + \
            [alpha, f"{100 * r['val_before']:.1f}% → {100 * r['val_after']:.1f}%",
             f"{100 * r['trusted_clean']:.1f}%",
             _memorised(r["train_before"], r["train_after"]),
             f"{r['times']['train']:.1f}s / {sap_time:.2f}s"]
        print("| " + " | ".join(cells) + " |", flush=True)
        if args.show_sweep:
            print("\n" + r["sweep"].to_markdown() + "\n")
    summary = {"vanilla_test": _pct([r["vanilla_test"] for r in runs]),
               "sap_test": _pct([r["sap_test"] for r in runs])}
    if retrain:
        summary["retrain_test"] = _pct([r["retrain_test"] for r in runs])
    print(f"\nclean test accuracy over {len(runs)} seed(s): vanilla {summary['vanilla_test']} → SAP "
          f"{summary['sap_test']}" + (f" (Retrain on the clean subset: {summary['retrain_test']})" if retrain else ""))
    stages = {k: statistics.mean(r["times"][k] for r in runs) for k in ("select", "stats", "sweep")}
    print("mean SAP time per seed: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()))

    first = runs[0]
    per_seed = [{k: v for k, v in r.items() if k not in ("sweep", "test_per_alpha")} for r in runs]
    paths = report.write_report(
        args.out, sweep=first["sweep"], spectra=first["sweep"].projector.spectra, alpha=first["alpha"],
        test_accuracy=first["test_per_alpha"],
        title=f"digits, {100 * args.rate:.0f}% {args.noise} noise, seed {first['seed']}",
        extra={"command": "demo", "noise": args.noise, "rate": args.rate, "trusted": args.trusted,
               "seeds": args.seeds, "summary": summary, "per_seed": per_seed,
               "mean_stage_seconds": stages})
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
