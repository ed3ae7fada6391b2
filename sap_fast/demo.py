"""The embedded demo: label noise damages a digits CNN, SAP repairs it.

    sap-fast demo [--seeds 0 1 2] [--noise symmetric|asymmetric|hierarchical] [--rate 0.25]
                  [--trusted 300] [--alphas grid|auto] [--out sap_fast_out/demo] [--no-retrain]
    (also: python -m sap_fast demo, python -m sap_fast.demo)

Per seed: split the 1797 scikit-learn digits, corrupt 25% of the training and validation labels,
train a small CNN until it fits the noisy labels (cached, so a second run skips training),
train the "Retrain" reference on the clean subset, select the trusted samples by loss, collect
statistics once, sweep α on the *noisy* validation split, and report clean test accuracy, how
much of the corrupted training data the model still fits, and time per stage. Writes
``report.json`` and ``report.png`` (accuracy per α, per-layer spectra with λ) to ``--out``.
Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import statistics
import sys
import time
from typing import Optional

import torch

import sap_fast
from sap_fast import digits, io, report
from sap_fast.evaluate import evaluate, noise_metrics, trusted_set_quality
from sap_fast.noise import NOISE_KINDS
from sap_fast.project import Projector, targets_with_stats

CACHE_VERSION = 1  # bump when the training recipe changes


def default_cache_dir() -> str:
    return os.environ.get("SAP_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sap_fast")


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
                        help=f"trained-model cache folder (default $SAP_FAST_CACHE or {default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="always train, never read or write the cache")
    parser.add_argument("--show-sweep", action="store_true", help="print every seed's α table")


def _cached(cache: Optional[str], key: dict, build):
    """``build()`` → state dict, memoised in ``cache`` under a hash of ``key`` (written atomically)."""
    if cache is None:
        return build()
    name = hashlib.sha1(repr(sorted(key.items())).encode()).hexdigest()[:16]
    path = os.path.join(cache, f"digits-{key['what']}-{name}.pt")
    if os.path.isfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            pass  # a damaged cache entry: train again and overwrite it
    state = build()
    os.makedirs(cache, exist_ok=True)
    io.save_torch(path, state)
    return state


def noisy_model(seed: int, noise: str, rate: float, epochs: int, cache: Optional[str]) -> dict:
    """``digits.make_noisy_model``, with the trained weights cached (splits and noise are
    deterministic functions of the seed, so only the weights need storing)."""
    key = dict(what="noisy", seed=seed, noise=noise, rate=rate, epochs=epochs, version=CACHE_VERSION)
    trained = {}

    def build():
        trained.update(digits.make_noisy_model(seed, noise_rate=rate, noise_kind=noise, epochs=epochs))
        return {k: v.clone() for k, v in trained["model"].state_dict().items()}

    state = _cached(cache, key, build)
    if trained:
        return trained
    return digits.make_noisy_model(seed, noise_rate=rate, noise_kind=noise, epochs=epochs, weights=state)


def retrain_model(demo: dict, noise: str, rate: float, epochs: int, cache: Optional[str]):
    """The Retrain reference (trained on the samples not marked ``corrupted_train``), cached."""
    key = dict(what="retrain", seed=demo["seed"], noise=noise, rate=rate, epochs=epochs, version=CACHE_VERSION)

    def build():
        return digits.retrain_reference(demo, epochs=epochs).state_dict()

    model = digits.SmallCNN(digits.NUM_CLASSES)
    model.load_state_dict(_cached(cache, key, build))
    return model.eval()


def retrain_accuracy(demo: dict, noise: str, rate: float, epochs: int, cache: Optional[str]) -> float:
    model = retrain_model(demo, noise, rate, epochs, cache)
    return digits.accuracy(model, demo["x_test"], demo["y_test"])


def run_seed(seed: int, noise: float = 0.25, trusted: int = 300, alphas=None, *, kind: str = "symmetric",
             epochs: int = 100, retrain: bool = False, cache: Optional[str] = None) -> dict:
    """One seed of the demo. ``noise`` is the rate, ``kind`` the protocol."""
    times = {}
    t = time.perf_counter()
    demo = noisy_model(seed, kind, noise, epochs, cache)
    times["train"] = time.perf_counter() - t
    model = demo["model"]
    train = (demo["x_train"], demo["y_train_noisy"])
    val = (demo["x_val"], demo["y_val_noisy"])
    test = (demo["x_test"], demo["y_test"])

    t = time.perf_counter()
    idx = sap_fast.select_trusted(model, train, n=trusted)
    times["select"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = sap_fast.collect_stats(model, sap_fast.subset(demo["x_train"], idx))
    times["stats"] = time.perf_counter() - t
    t = time.perf_counter()
    result = sap_fast.sweep(model, None, val, stats=stats, alphas=alphas)
    times["sweep"] = time.perf_counter() - t

    # test accuracy at every α of the sweep, for the report's curve (never used to choose α)
    projector = Projector(model, targets_with_stats(model, None, stats), stats)
    work = copy.deepcopy(model)
    test_per_alpha = {}
    for row in result.table:
        projector.apply(work, row.alpha)
        test_per_alpha[row.alpha] = evaluate(work, test, show_progress=False).accuracy

    corrupted = demo["corrupted_train"]
    before = noise_metrics(model, demo["x_train"], demo["y_train_noisy"], demo["y_train"], corrupted)
    after = noise_metrics(result.model, demo["x_train"], demo["y_train_noisy"], demo["y_train"], corrupted)
    out = {
        "seed": seed,
        "train_acc_noisy": demo["train_acc_noisy"],
        "vanilla_test": demo["test_acc"],
        "sap_test": evaluate(result.model, test, show_progress=False).accuracy,
        "alpha": result.best_alpha,
        "val_before": result.table[0].val_accuracy,
        "val_after": result.best.val_accuracy,
        "trusted_clean": 1.0 - float(corrupted[idx].float().mean()),
        "trusted_set": trusted_set_quality(idx, corrupted),
        "train_before": before,
        "train_after": after,
        "test_per_alpha": test_per_alpha,
        "spectra": projector.spectra,  # decomposed once here, reused by the report
        "times": times,
        "sweep": result,
    }
    if retrain:
        t = time.perf_counter()
        out["retrain_test"] = retrain_accuracy(demo, kind, noise, epochs, cache)
        times["retrain"] = time.perf_counter() - t
    return out


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
    cache = None if args.no_cache else (args.cache or default_cache_dir())
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
    per_seed = [{k: v for k, v in r.items() if k not in ("sweep", "spectra", "test_per_alpha")} for r in runs]
    paths = report.write_report(
        args.out, sweep=first["sweep"], spectra=first["spectra"], alpha=first["alpha"],
        test_accuracy=first["test_per_alpha"],
        title=f"digits, {100 * args.rate:.0f}% {args.noise} noise, seed {first['seed']}",
        extra={"command": "demo", "noise": args.noise, "rate": args.rate, "trusted": args.trusted,
               "seeds": args.seeds, "summary": summary, "per_seed": per_seed,
               "mean_stage_seconds": stages})
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv=None) -> int:
    from .cli import main as cli_main
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
