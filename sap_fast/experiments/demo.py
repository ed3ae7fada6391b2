"""One seed of the embedded demo: label noise damages a digits CNN, SAP repairs it.

Split the 1797 scikit-learn digits, corrupt a share of the training and validation labels,
train a small CNN until it fits the noisy labels (cached), select the trusted samples by loss,
collect statistics once, sweep α on the *noisy* validation split, and measure clean test
accuracy, how much of the corrupted training data the model still fits, and the time per
stage. The command around it (``sap-fast demo``) is :mod:`sap_fast.cli.demo`.
"""
from __future__ import annotations

import copy
import time
from typing import Optional

import sap_fast

from .._runtime.evaluate import evaluate
from . import digits
from .metrics import noise_metrics, trusted_set_quality

__all__ = ["run_seed"]


def run_seed(seed: int, noise: float = 0.25, trusted: int = 300, alphas=None, *, kind: str = "symmetric",
             epochs: int = 100, retrain: bool = False, cache: Optional[str] = None) -> dict:
    """One seed of the demo. ``noise`` is the rate, ``kind`` the protocol; ``cache`` the folder
    of trained models (None: train every time)."""
    times = {}
    t = time.perf_counter()
    demo = digits.noisy_model(seed, kind, noise, epochs, cache)
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

    # test accuracy at every α of the sweep, for the report's curve (never used to choose α),
    # from the sweep's own projector: no second decomposition
    work = copy.deepcopy(model)
    test_per_alpha = {}
    for row in result.table:
        result.projector.apply(work, row.alpha)
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
        "times": times,
        "sweep": result,
    }
    if retrain:
        t = time.perf_counter()
        out["retrain_test"] = digits.retrain_accuracy(demo, kind, noise, epochs, cache)
        times["retrain"] = time.perf_counter() - t
    return out
