"""``sap-fast correct``: correct your own model from the command line.

Select the trusted samples, collect the statistics, choose α on a validation split (or take
``--alpha``), and write the corrected weights, ``report.json`` and ``report.png``.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from typing import List

import torch

import sap_fast

from .._runtime import io
from .._runtime.evaluate import classifier_logits
from ..stats import Stats
from . import report
from .load import LoadError, load_data, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("model")
    what.add_argument("--model", required=True,
                      help="module:factory (called with no arguments), a TorchScript file, or a torch.save'd "
                           "module (a pickle: only files you trust)")
    what.add_argument("--weights", help="state dict to load first: .pt/.pth or .safetensors")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="training data (noisy labels): a folder of images in class "
                                     "sub-folders, or a .pt file with (inputs, targets)")
    data.add_argument("--val", help="validation data (same forms); default: --val-fraction of --data")
    data.add_argument("--val-fraction", type=float, default=0.1)
    data.add_argument("--test", help="clean test data, only reported (never used to choose α)")
    data.add_argument("--image-size", type=int, nargs="+", metavar="N", help="resize images to H W (or N N)")
    data.add_argument("--channels", type=int, default=3, choices=[1, 3], help="image channels (default 3)")
    data.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel")
    data.add_argument("--std", type=float, nargs="+", help="normalisation std per channel")
    sap = parser.add_argument_group("SAP")
    sap.add_argument("--trusted", type=int, default=1000, help="trusted samples (default 1000)")
    sap.add_argument("--alpha", type=float, help="a fixed α (no sweep)")
    sap.add_argument("--alphas", default="grid", help="grid (1e1..1e6), auto, or a comma list like 10,100,1e3")
    sap.add_argument("--solver", choices=("eigh", "cholesky"),
                     help="eigh: one eigendecomposition shared by every α (the sweep's default); "
                          "cholesky: one Cholesky solve per α (the fixed --alpha default)")
    sap.add_argument("--spectra", action="store_true",
                     help="plot the layer spectra in report.png even with the Cholesky solver, which "
                          "does not need them (one eigendecomposition per layer)")
    sap.add_argument("--stats-in", help="statistics saved by --stats-out: skips selection and the forward "
                                        "pass over the training data")
    sap.add_argument("--stats-out", help="save the statistics here for later sweeps")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=os.path.join("sap_fast_out", "correct"),
                     help="folder for the corrected weights and the report (created)")
    run.add_argument("--format", choices=["safetensors", "pt"], default=None,
                     help="weights format (default: that of --weights, else safetensors)")
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--device", default="cpu")
    run.add_argument("--seed", type=int, default=0, help="seed of the validation split")


def _alphas(text: str):
    if text in ("grid", "auto"):
        return None if text == "grid" else "auto"
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas {text!r}: use grid, auto, or numbers like 10,100,1e3") from None


def _check_classes(model, x: torch.Tensor, y: torch.Tensor, classes: List[str], strict: bool, device) -> None:
    """The model must take these inputs and have one output per class (class folders: exactly;
    tensor files, whose class count is only known from the labels: at least)."""
    try:
        with torch.no_grad():
            logits = classifier_logits(model.eval()(x[:2].to(device)), "the model's output")
    except Exception as err:
        first = str(err).strip().splitlines()
        raise LoadError(f"the model does not accept these inputs of shape {tuple(x.shape[1:])} "
                        f"({first[0] if first else type(err).__name__}); check --image-size/--channels") from None
    outputs = logits.shape[-1]
    if (strict and outputs != len(classes)) or outputs <= int(y.max()):
        raise LoadError(f"the model has {outputs} outputs but the data has {len(classes)} "
                        f"classes ({', '.join(classes[:5])}{', …' if len(classes) > 5 else ''})")


def _split(x, y, fraction: float, seed: int):
    """A stratified validation split (fraction of every class) and the rest, by index."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    val = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        val.append(members[:max(1, round(fraction * members.numel()))] if members.numel() > 1 else members[:0])
    val = torch.sort(torch.cat(val)).values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    return (x[keep], y[keep]), (x[val], y[val])


def run(args: argparse.Namespace) -> int:
    times = {}
    if args.data is None and (args.stats_in is None or args.val is None):
        raise ValueError("--data is needed (it may be left out only with both --stats-in and --val)")
    fmt = args.format or ("pt" if args.weights and not args.weights.endswith(".safetensors") else "safetensors")
    os.makedirs(args.out, exist_ok=True)
    model = load_model(args.model, args.weights).to(args.device).eval()
    opts = dict(image_size=args.image_size, channels=args.channels, mean=args.mean, std=args.std)
    if (args.mean is None) != (args.std is None) or (args.mean and len(args.mean) != len(args.std)):
        raise ValueError("--mean and --std go together, with one value per channel each")

    t = time.perf_counter()
    classes = None
    if args.data is not None:
        x, y, classes = load_data(args.data, **opts)
    if args.val is not None:
        vx, vy, val_classes = load_data(args.val, classes=classes, **opts)
        classes = classes or val_classes
        train = (x, y) if args.data is not None else None
    else:
        train, (vx, vy) = _split(x, y, args.val_fraction, args.seed)
    times["load"] = time.perf_counter() - t
    _check_classes(model, vx, vy, classes, os.path.isdir(args.val or args.data), args.device)
    val = (vx, vy)

    if args.stats_in is not None:
        stats = Stats.load(args.stats_in)
        trusted_note = f"statistics from {args.stats_in} ({stats.num_samples} samples)"
    else:
        n = min(args.trusted, len(train[1]))
        if args.trusted > len(train[1]):
            print(f"note: --trusted {args.trusted} > {len(train[1])} training samples; using all of them")
        t = time.perf_counter()
        idx = sap_fast.select_trusted(model, train, n=n, batch_size=args.batch_size, device=args.device)
        times["select"] = time.perf_counter() - t
        t = time.perf_counter()
        stats = sap_fast.collect_stats(model, sap_fast.subset(train[0], idx), batch_size=args.batch_size,
                                       device=args.device)
        times["stats"] = time.perf_counter() - t
        trusted_note = f"{n} trusted samples (lowest loss, class-balanced)"
        if args.stats_out:
            stats.save(args.stats_out)

    t = time.perf_counter()
    before = sap_fast.evaluate(model, val, batch_size=args.batch_size, device=args.device)
    if args.alpha is not None:  # one projector: its decomposition also serves the report
        projector = sap_fast.Projector(model, stats, solver=args.solver or "cholesky")
        fixed = copy.deepcopy(model)
        projector.apply(fixed, args.alpha)
        result, alpha = None, args.alpha
    else:
        result = sap_fast.sweep(model, None, val, stats=stats, alphas=_alphas(args.alphas),
                                batch_size=args.batch_size, device=args.device, solver=args.solver or "eigh")
        fixed, alpha, projector = result.model, result.best_alpha, result.projector
    after = sap_fast.evaluate(fixed, val, batch_size=args.batch_size, device=args.device)
    times["alpha"] = time.perf_counter() - t

    tests = {}
    if args.test is not None:
        tx, ty, _ = load_data(args.test, classes=classes, **opts)
        tests = {name: sap_fast.evaluate(m, (tx, ty), batch_size=args.batch_size, device=args.device).accuracy
                 for name, m in (("before", model), ("after", fixed))}

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in fixed.state_dict().items()}
    weights_path = os.path.join(args.out, f"corrected.{fmt}")
    if fmt == "safetensors":
        io.save_safetensors(weights_path, state)
    else:
        io.save_torch(weights_path, state)
    summary = {"command": "correct", "model": args.model, "weights_in": args.weights, "data": args.data,
               "val": args.val or f"{args.val_fraction} of --data", "classes": classes, "trusted": trusted_note,
               "alpha": alpha, "val_before": before.accuracy, "val_after": after.accuracy,
               "test_before": tests.get("before"), "test_after": tests.get("after"),
               "weights_out": weights_path, "seconds": times}
    # the spectra come free with the eigh route; the solve route computes them only when asked
    spectra = projector.spectra if (projector.has_spectra or args.spectra) else None
    paths = report.write_report(args.out, sweep=result, spectra=spectra, alpha=alpha, extra=summary,
                                title=f"sap-fast correct: {args.model}")
    if paths["png"] is None:
        print("note: no report.png: a fixed --alpha with the Cholesky solver has no sweep and no spectra "
              "to plot (--spectra adds the layer spectra, one eigendecomposition per layer)")
    paths = {k: v for k, v in paths.items() if v is not None}
    chosen = "no projection (no α beat the original on validation)" if alpha is None else f"α = {alpha:.3g}"
    print(f"{trusted_note}; {chosen}")
    print(f"validation accuracy {100 * before.accuracy:.2f}% → {100 * after.accuracy:.2f}%"
          + (f"; test {100 * tests['before']:.2f}% → {100 * tests['after']:.2f}%" if tests else ""))
    print(f"wrote {weights_path}, {', '.join(str(p) for p in paths.values())}")
    return 0


