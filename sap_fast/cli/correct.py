"""``sap-fast correct``: correct your own model from the command line, at any scale.

Select the trusted samples (the lowest-loss ones per class), collect the statistics over them,
choose α on a validation split the model was not trained on (or take ``--alpha``), and write the
corrected weights, ``trusted.pt`` (the scores and the chosen samples), ``report.json`` and
``report.png``.

Every pass streams its data through a DataLoader (``--workers`` decode images in worker
processes), so memory does not grow with the number of training images; the validation and test
images, read once per α, are decoded by their first pass only and kept as uint8 pixels, in memory
or in a memory-mapped file (:mod:`.decoded`). Scoring, the longest pass at
Clothing1M scale, is checkpointed every ``--checkpoint-every`` samples under ``--out``:
``--resume`` continues an interrupted run to the same result. Nothing else is written until the
end: a run that fails leaves no new file or folder behind (only the scoring checkpoint, once
scoring has started, so that it can be resumed), and the outputs appear at once.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import Dataset, Subset

import sap_fast

from .._runtime import io
from .._runtime.checks import first_line
from .._runtime.evaluate import classifier_logits
from .._runtime.forward import SampleBar
from ..select import candidate_ids
from ..stats import Stats
from . import decoded, report
from .data import Preprocess, TensorFile, check_first, loader, open_data
from .load import LoadError, load_model, save_weights

PARTIAL = ".sap_fast-partial"   # the scoring checkpoint's folder inside --out
CHECKPOINT_EVERY = 5000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("model")
    what.add_argument("--model", required=True,
                      help="module:factory (called with no arguments), torchvision:NAME or timm:NAME "
                           "(with --num-classes; never downloaded), hf:DIR (a transformers image "
                           "classifier saved with save_pretrained), or a torch.save'd module (a pickle: "
                           "only files you trust)")
    what.add_argument("--weights", help="the trained weights: a state dict in .pt/.pth or .safetensors "
                                        "(needed unless the model file carries them)")
    what.add_argument("--num-classes", type=int, help="classes of a torchvision:/timm: model")
    what.add_argument("--random-init", action="store_true",
                      help="correct a model with no --weights on purpose (its random initialisation)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="training data (noisy labels): a folder of images in class "
                                     "sub-folders, a .pt file with (inputs, targets), or "
                                     "clothing1m:ROOT[:SPLIT] (SPLIT: noisy_train, the default)")
    data.add_argument("--val", help="validation data the model was NOT trained on (same forms, e.g. "
                                    "clothing1m:ROOT:clean_val): α is chosen on it")
    data.add_argument("--val-indices", metavar="FILE",
                      help="positions in --data that were held out of training (a torch.save'd list or "
                           "tensor, e.g. the official scripts' .corrupt_val_index, a .npy array, or a text "
                           "file of integers): the validation split, taken out of --data")
    data.add_argument("--val-fraction", type=float,
                      help="take a stratified fraction of --data as validation; only right if the model "
                           "was not trained on it (else no α can win)")
    data.add_argument("--test", help="clean test data, only reported per α (never used to choose α)")
    data.add_argument("--preset", choices=["imagenet"],
                      help="imagenet: resize 256, centre crop 224, ImageNet mean/std")
    data.add_argument("--image-size", type=int, nargs="+", metavar="N", help="resize images to H W (or N N)")
    data.add_argument("--channels", type=int, default=3, choices=[1, 3], help="image channels (default 3)")
    data.add_argument("--mean", type=float, nargs="+",
                      help="normalisation mean per channel (pixels are scaled to [0, 1] first; "
                           "default: no normalisation)")
    data.add_argument("--std", type=float, nargs="+", help="normalisation std per channel")
    data.add_argument("--workers", type=int, default=0,
                      help="DataLoader worker processes that decode images (default 0: in the main process)")
    sap = parser.add_argument_group("SAP")
    sap.add_argument("--trusted", type=int, default=1000, help="trusted samples (default 1000)")
    sap.add_argument("--candidates", type=int,
                     help="score only this many random training samples (seeded by --seed) and pick "
                          "the trusted ones among them (default: score every sample)")
    sap.add_argument("--score", choices=["loss", "curvature"], default="loss",
                     help="how samples are ranked (default loss)")
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
                     help="folder for the corrected weights and the report (created at the end)")
    run.add_argument("--format", choices=["safetensors", "pt"], default=None,
                     help="weights format (default: that of --weights, else safetensors)")
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--device", default="cpu")
    run.add_argument("--amp", choices=["bf16", "fp16"],
                     help="mixed precision for the passes that only rank or evaluate (scoring, "
                          "validation, test); the statistics stay in full precision")
    run.add_argument("--seed", type=int, default=0, help="seed of --candidates and --val-fraction")
    run.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="N",
                     help=f"save the scores under --out every N samples, in whole batches (default {CHECKPOINT_EVERY})")
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted scoring saved under --out")
    decoded.add_arguments(run)


# ---- arguments ----------------------------------------------------------------------------------

def _alphas(text: str):
    if text in ("grid", "auto"):
        return None if text == "grid" else "auto"
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas {text!r}: use grid, auto, or numbers like 10,100,1e3") from None


def _carries_weights(spec: str) -> bool:
    """Model specs whose file holds the weights (a pickled module, a saved HF directory)."""
    return spec.startswith("hf:") or (os.path.isfile(spec) and ":" not in os.path.basename(spec))


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be said wrong before any file is read: one line each (exit 2)."""
    if args.data is None and not (args.stats_in and (args.val or args.alpha is not None)):
        raise ValueError("--data is needed (it may be left out only with --stats-in and either --val "
                         "or --alpha)")
    given = [flag for flag, value in (("--val", args.val), ("--val-indices", args.val_indices),
                                      ("--val-fraction", args.val_fraction)) if value is not None]
    if not given and args.alpha is None:
        raise ValueError("no validation data: α must be chosen on samples the model was not trained on "
                         "(a split of the data it memorised lets no α win); pass --val DATA, or "
                         "--val-indices FILE with the positions of --data held out of training")
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} both name the validation data; pass one")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.weights is None and not args.random_init and not _carries_weights(args.model):
        raise ValueError("no --weights: the model would be randomly initialised, and correcting that "
                         "means nothing; pass --weights FILE (or --random-init if you mean it)")
    if args.weights is not None and args.random_init:
        raise ValueError("--weights and --random-init contradict each other; pass one")
    for flag, value, low in (("--trusted", args.trusted, 1), ("--batch-size", args.batch_size, 1),
                             ("--workers", args.workers, 0), ("--checkpoint-every", args.checkpoint_every, 1),
                             ("--candidates", args.candidates, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.candidates is not None and args.candidates < args.trusted:
        raise ValueError(f"--candidates {args.candidates} is less than --trusted {args.trusted}; the scored "
                         "samples must hold the trusted ones")
    if args.alpha is not None and args.alpha <= 0:
        raise ValueError(f"--alpha must be > 0, got {args.alpha}")
    if args.resume and args.stats_in:
        raise ValueError("--resume continues an interrupted scoring pass, which --stats-in skips; drop one")
    _alphas(args.alphas)
    Preprocess.from_args(args)  # conflicting or incomplete image options
    decoded.EvalCache.from_args(args)


# ---- outputs ------------------------------------------------------------------------------------

class Outputs:
    """``--out``, written at the end: into a staging folder renamed into place when ``--out`` is
    new (the folder appears at once), else file by file, each atomically. Paths inside ``--out``
    given elsewhere (``--stats-out out/stats.pt``) go through the same staging."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.partial = os.path.join(self.folder, PARTIAL)
        self._writers: Dict[str, Callable[[str], None]] = {}

    def add(self, path: str, write: Callable[[str], None]) -> str:
        """Register ``write(path)`` for the end; returns the final path."""
        path = os.path.abspath(path)
        self._writers[path] = write
        return path

    def finish(self) -> None:
        inside = {p: w for p, w in self._writers.items() if os.path.dirname(p) == self.folder}
        for path, write in self._writers.items():  # outside --out: atomic writes where they are
            if path not in inside:
                write(path)
        if os.path.isdir(self.folder):
            for path, write in inside.items():
                write(path)
            shutil.rmtree(self.partial, ignore_errors=True)
            return
        parent = os.path.dirname(self.folder)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(self.folder)}.", dir=parent)
        try:
            for path, write in inside.items():
                write(os.path.join(staging, os.path.basename(path)))
            os.chmod(staging, 0o777 & ~io.current_umask())  # a folder as mkdir makes it, not 0700
            os.rename(staging, self.folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


# ---- resumable scoring --------------------------------------------------------------------------

@dataclass
class Scoring:
    """The scores of ``positions`` (samples of --data), chunk by chunk, with a checkpoint under
    --out after each chunk (but the last): the same chunks and batches whether or not the run was
    interrupted, so a resumed run gives the same scores bit for bit."""
    positions: torch.Tensor
    fingerprint: dict
    scores: List[torch.Tensor] = field(default_factory=list)
    labels: List[torch.Tensor] = field(default_factory=list)
    classes: Optional[int] = None

    @property
    def done(self) -> int:
        return sum(s.numel() for s in self.scores)

    def resume_from(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"--resume: no interrupted scoring under {os.path.dirname(os.path.dirname(path))} "
                             f"({PARTIAL}/scores.pt is missing); run without --resume")
        state = torch.load(path, map_location="cpu", weights_only=True)
        theirs = json.loads(state["fingerprint"])
        for key, value in self.fingerprint.items():
            if theirs.get(key) != value:
                raise ValueError(f"--resume: the saved scoring was made with another {key} "
                                 f"({theirs.get(key)!r}, now {value!r}); rerun it with the same options "
                                 "or start over without --resume")
        self.scores, self.labels, self.classes = [state["scores"]], [state["labels"]], state["classes"]

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        io.save_torch(path, {"fingerprint": json.dumps(self.fingerprint), "scores": torch.cat(self.scores),
                             "labels": torch.cat(self.labels), "classes": self.classes})


class _Take:
    """The next ``count`` batches of a shared batch iterator, as a re-iterable for one pass."""

    def __init__(self, batches, count: int, bar):
        self.batches, self.count, self.bar = batches, count, bar

    def __iter__(self):
        for _ in range(self.count):
            batch = next(self.batches, None)
            if batch is None:
                return
            yield batch
            self.bar.update(batch[0])


def _score(model, train: Dataset, scoring: Scoring, args, out: Outputs, device) -> None:
    """Score every position not yet scored in chunks of whole batches, one loader for the lot
    (its workers start once), with a checkpoint after each chunk but the last."""
    path = os.path.join(out.partial, "scores.pt")
    total = scoring.positions.numel()
    per_chunk = max(1, args.checkpoint_every // args.batch_size)  # batches: chunks end on batch edges
    bar = SampleBar("scoring", total, initial=scoring.done)  # on unless --quiet (sap_fast.cli.main)
    try:
        remaining = Subset(train, scoring.positions[scoring.done:].tolist())
        batches = iter(loader(remaining, batch_size=args.batch_size, workers=args.workers, device=device))
        while scoring.done < total:
            s, labels, classes = sap_fast.sample_scores(
                model, _Take(batches, per_chunk, bar), score=args.score, batch_size=args.batch_size,
                device=device, seed=args.seed, amp=args.amp, show_progress=False)
            scoring.scores.append(s)
            scoring.labels.append(labels)
            scoring.classes = classes
            if scoring.done < total:
                scoring.save(path)
    except KeyboardInterrupt:
        if os.path.isfile(path):
            print(f"sap-fast correct: scores of {torch.load(path, weights_only=True)['scores'].numel()} of "
                  f"{total} samples are saved in {path}; continue with --resume", file=sys.stderr)
        raise
    finally:
        bar.close()


# ---- the command --------------------------------------------------------------------------------

def _read_indices(path: str, n: int) -> torch.Tensor:
    """Positions from a ``torch.save`` file (whatever its name, e.g. the official training
    scripts' ``.corrupt_val_index``), a ``.npy`` array, or a text file of integers, checked
    against ``n`` samples."""
    if not os.path.isfile(path):
        raise LoadError(f"--val-indices {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(6)
    try:
        if head.startswith(b"\x93NUMPY"):
            import numpy as np
            values = np.load(path, allow_pickle=False)
        elif head.startswith((b"PK", b"\x80")):  # torch.save: a zip archive, or a legacy pickle
            values = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, encoding="utf-8") as f:
                values = [int(tok) for tok in f.read().replace(",", " ").split()]
        idx = torch.as_tensor(values).flatten()
    except Exception as err:
        raise LoadError(f"--val-indices {path}: unreadable ({type(err).__name__}: {first_line(err)}); "
                        "expected integer positions in a torch.save/.npy file or a text file") from None
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise LoadError(f"--val-indices {path}: holds {idx.dtype} values; positions are integers")
    idx = idx.long()
    if idx.numel() == 0:
        raise LoadError(f"--val-indices {path}: is empty")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise LoadError(f"--val-indices {path}: positions must lie in [0, {n}) (--data has {n} samples), "
                        f"got [{int(idx.min())}, {int(idx.max())}]")
    if torch.unique(idx).numel() != idx.numel():
        raise LoadError(f"--val-indices {path}: holds duplicate positions")
    return torch.sort(idx).values


def _stratified(targets: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A ``fraction`` of every class's positions, seeded."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(targets).tolist():
        members = torch.nonzero(targets == c).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        if members.numel() > 1:
            picked.append(members[:max(1, round(fraction * members.numel()))])
    return torch.sort(torch.cat(picked)).values if picked else torch.zeros(0, dtype=torch.long)


def _check_model(model, dataset: Dataset, classes: Optional[List[str]], exact: bool, device, what: str) -> None:
    """The model takes the data's inputs and has an output per class (class names known:
    exactly; a tensor file's labels: at least one more than the largest)."""
    x, _ = check_first(dataset, what)
    try:
        with torch.no_grad():
            out = model(x.unsqueeze(0).to(device))
    except Exception as err:
        raise LoadError(f"{what}: the model does not accept its inputs of shape {tuple(x.shape)} "
                        f"({first_line(err)}); check --image-size/--channels/--preset") from None
    outputs = classifier_logits(out, "the model's output").shape[-1]
    largest = int(dataset.targets.max()) if len(dataset.targets) else -1
    if (exact and classes is not None and outputs != len(classes)) or outputs <= largest:
        named = f"{len(classes)} classes ({', '.join(classes[:5])}{', …' if len(classes) > 5 else ''})" \
            if classes else f"labels up to {largest}"
        raise LoadError(f"the model has {outputs} outputs but {what} has {named}")


def _seconds(value) -> float:
    """A stage's seconds (a list of per-pass times summed)."""
    return sum(value) if isinstance(value, list) else value


def _weights_fingerprint(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def _subset_targets(dataset: Dataset, positions: torch.Tensor) -> Subset:
    part = Subset(dataset, positions.tolist())
    part.targets = dataset.targets[positions]
    part.classes = getattr(dataset, "classes", None)
    return part


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    if args.workers and torch.device(args.device).type == "cpu":
        # the decoding workers take cores of their own: the forward passes keep the rest, so the
        # two do not fight over the same cores (sap_fast.cli.main restores the thread count)
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - args.workers)))
    times: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    out = Outputs(args.out)
    if os.path.isdir(out.partial) and not args.resume:
        raise ValueError(f"{args.out} holds an interrupted run's scores ({PARTIAL}); continue it with "
                         f"--resume, or remove {out.partial} to start over")
    preprocess = Preprocess.from_args(args)
    device = torch.device(args.device)
    model = load_model(args.model, args.weights, num_classes=args.num_classes).to(device).eval()
    if device.type == "cuda":  # convs read NHWC fastest on tensor cores; the values do not change
        model = model.to(memory_format=torch.channels_last)
    fmt = args.format or ("pt" if args.weights and not args.weights.endswith(".safetensors") else "safetensors")

    t = time.perf_counter()
    train = classes = None
    if args.data is not None:
        train = open_data(args.data, preprocess, what="--data")
        classes = train.classes
    pool = None if train is None else torch.arange(len(train))
    val = None
    if args.val is not None:
        val = open_data(args.val, preprocess, classes=classes, what="--val")
        classes = classes or val.classes
    elif args.val_indices is not None or args.val_fraction is not None:
        if args.val_indices is not None:
            held = _read_indices(args.val_indices, len(train))
        else:
            held = _stratified(train.targets, args.val_fraction, args.seed)
            print(f"warning: --val-fraction {args.val_fraction}: {held.numel()} samples of --data become the "
                  "validation split; this assumes the model was NOT trained on them (a model that memorised "
                  "them lets no α win: then pass --val or --val-indices)", file=sys.stderr)
        val = _subset_targets(train, held)
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[held] = False
        pool = keep.nonzero().flatten()
    test = None if args.test is None else open_data(args.test, preprocess, classes=classes, what="--test")
    times["scan"] = time.perf_counter() - t
    for name, part in (("--data", train), ("--val", val), ("--test", test)):
        for note in getattr(part, "notes", ()) or ():
            print(f"note: {name}: {note}")
    # folders and Clothing1M name their classes: the model must have exactly that many outputs;
    # a tensor file's classes are only known from its largest label
    exact = not isinstance(train if train is not None else val, TensorFile)
    if val is not None:
        _check_model(model, val, classes, exact, device, "--val")
    if train is not None:
        _check_model(model, train, classes, exact, device, "--data")

    if args.stats_in is not None:
        stats = Stats.load(args.stats_in)
        trusted_note = f"statistics from {args.stats_in} ({stats.num_samples} samples)"
        trusted = scoring = None
    else:
        n = min(args.trusted, pool.numel())
        if args.trusted > pool.numel():
            print(f"note: --trusted {args.trusted} > {pool.numel()} training samples; using all of them")
        positions = pool if args.candidates is None or args.candidates >= pool.numel() else \
            pool[torch.sort(candidate_ids(pool.numel(), args.candidates, args.seed)).values]
        scoring = Scoring(positions, {
            "model": args.model, "weights": _weights_fingerprint(args.weights), "data": args.data,
            "samples": len(train), "scored": positions.numel(), "candidates": args.candidates,
            "seed": args.seed, "score": args.score, "amp": args.amp, "batch_size": args.batch_size,
            "checkpoint_every": args.checkpoint_every, "preprocess": repr(preprocess),
            "val_indices": args.val_indices, "val_fraction": args.val_fraction})
        if args.resume:
            scoring.resume_from(os.path.join(out.partial, "scores.pt"))
        t = time.perf_counter()
        _score(model, train, scoring, args, out, device)
        times["scoring"] = time.perf_counter() - t
        counts["scoring"] = positions.numel()
        scores, labels = torch.cat(scoring.scores), torch.cat(scoring.labels)
        trusted = positions[sap_fast.lowest_per_class(scores, labels, scoring.classes, n)]
        t = time.perf_counter()
        stats = sap_fast.collect_stats(model, loader(Subset(train, trusted.tolist()), batch_size=args.batch_size,
                                                     workers=args.workers, device=device), device=device)
        times["statistics"] = time.perf_counter() - t
        counts["statistics"] = trusted.numel()
        how = f"lowest {args.score}" + ("" if args.candidates is None else f" of {positions.numel()} random candidates")
        trusted_note = f"{n} trusted samples ({how}, class-balanced)"

    # the validation and test images are decoded once, by the first pass over each (outputs are
    # staged beside --out, and so is a cache too large for memory)
    eval_cache = decoded.EvalCache.from_args(args, folder=os.path.dirname(out.folder))
    val_batches = None if val is None else eval_cache.loader(val, what="--val", batch_size=args.batch_size,
                                                             workers=args.workers, device=device)
    t = time.perf_counter()
    if args.alpha is not None:  # one projector: its decomposition also serves the report
        projector = sap_fast.Projector(model, stats, solver=args.solver or "cholesky")
        times["decomposition"] = time.perf_counter() - t
        fixed = copy.deepcopy(model)
        projector.apply(fixed, args.alpha)
        result, alpha, alphas = None, args.alpha, [None, args.alpha]
        val_before = val_after = None
        if val is not None:  # only reported: a fixed α needs no validation data
            val_before, val_after = (sap_fast.evaluate(m, val_batches, device=device, what="--val", amp=args.amp,
                                                       desc=f"validation {label}").accuracy
                                     for m, label in ((model, "(original)"), (fixed, f"α={alpha:.3g}")))
    else:
        result = sap_fast.sweep(model, None, val_batches, stats=stats, alphas=_alphas(args.alphas),
                                device=device, solver=args.solver or "eigh", amp=args.amp)
        fixed, alpha, projector = result.model, result.best_alpha, result.projector
        times["decomposition"] = result.prepare_seconds
        times["validation"] = [row.seconds for row in result.table]
        val_before, val_after = result.table[0].val_accuracy, result.best.val_accuracy
        alphas = [row.alpha for row in result.table]
    times["alpha"] = time.perf_counter() - t
    if val is not None:
        counts["validation"] = len(val) * (2 if result is None else len(result.table))  # every pass

    test_accuracy = {}
    if test is not None:  # every α of the run, for the report's curve (never used to choose α)
        t = time.perf_counter()
        test_batches = eval_cache.loader(test, what="--test", batch_size=args.batch_size, workers=args.workers,
                                         device=device)
        work = copy.deepcopy(model)
        for a in alphas:
            projector.apply(work, a)
            test_accuracy[a] = sap_fast.evaluate(work, test_batches, device=device, what="--test", amp=args.amp,
                                                 desc="test" if a is None else f"test α={a:.3g}").accuracy
        times["test"] = time.perf_counter() - t
        counts["test"] = len(test) * len(alphas)  # one pass per α

    weights_path = out.add(os.path.join(args.out, f"corrected.{fmt}"),
                           lambda p: save_weights(fixed, p, fmt))
    if trusted is not None:
        out.add(os.path.join(args.out, "trusted.pt"), lambda p: io.save_torch(p, {
            "trusted": trusted, "positions": scoring.positions, "scores": torch.cat(scoring.scores),
            "labels": torch.cat(scoring.labels)}))
    if args.stats_out:
        out.add(args.stats_out, stats.save)
    # the spectra come free with the eigh route; the solve route computes them only when asked
    spectra = projector.spectra if (projector.has_spectra or args.spectra) else None
    summary = {"command": "correct", "argv": sys.argv[1:], "model": args.model, "weights_in": args.weights,
               "data": args.data, "val": args.val or args.val_indices or f"{args.val_fraction} of --data",
               "test": args.test, "classes": classes, "trusted": trusted_note, "alpha": alpha,
               "val_before": val_before, "val_after": val_after,
               "test_before": test_accuracy.get(None), "test_after": test_accuracy.get(alpha),
               "weights_out": weights_path, "seconds": times, "samples": counts, "eval_cache": eval_cache.summary(),
               "images_per_second": {k: counts[k] / _seconds(times[k]) for k in counts if times.get(k)}}
    written = {}

    def write_report(folder_path):
        written.update(report.write_report(os.path.dirname(folder_path), sweep=result, spectra=spectra,
                                           alpha=alpha, test_accuracy=test_accuracy or None, extra=summary,
                                           title=f"sap-fast correct: {args.model}"))

    out.add(os.path.join(args.out, "report.json"), write_report)
    out.finish()
    chosen = "no projection (no α beat the original on validation)" if alpha is None else f"α = {alpha:.3g}"
    print(f"{trusted_note}; {chosen}")
    accuracies = ([f"validation accuracy {100 * val_before:.2f}% → {100 * val_after:.2f}%"] if val is not None else []) + \
        ([f"test {100 * test_accuracy[None]:.2f}% → {100 * test_accuracy[alpha]:.2f}%"] if test_accuracy else [])
    if accuracies:
        print("; ".join(accuracies))
    if written.get("png") is None:
        print("note: no report.png: a fixed --alpha with the Cholesky solver has no sweep and no spectra "
              "to plot (--spectra adds the layer spectra, one eigendecomposition per layer)")
    print(f"wrote {args.out}: {', '.join(sorted(os.listdir(args.out)))}")
    return 0
