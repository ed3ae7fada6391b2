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
scoring has started, so that it can be resumed), and the outputs appear at once
(:mod:`sap_fast.cli.outputs` holds the rules: no output replaces or lands among the inputs, an
earlier result is replaced only with ``--overwrite``, and the result is swapped in as one folder).

:func:`run` goes through the stages in order, one function each: the paths (every output
against every input), the model, the data, scoring and selection, the statistics, α (sweep or
fixed), the test curve, and the write.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.utils.data import Dataset, Subset

import sap_fast

from .._runtime import io
from .._runtime.checks import (NonFiniteSample, first_line, first_non_finite_tensor, non_finite_kind,
                               torch_load_problem)
from .._runtime.evaluate import classifier_logits
from .._runtime.forward import SampleBar
from ..accumulate import first_non_finite
from ..project import resolve_solver
from ..select import candidate_ids
from ..stats import Stats
from . import decoded, report
from .data import Preprocess, TensorFile, check_first, data_path, loader, open_data
from .load import LoadError, load_model, model_path, save_weights
from .outputs import PARTIAL, Outputs

__all__ = ["CHECKPOINT_EVERY", "DEFAULTS", "OUTPUT_RULES", "add_arguments", "CONFLICTS", "Scoring",
           "Clock", "Data", "Selection", "Choice", "run"]

CHECKPOINT_EVERY = 5000
DEFAULTS = {"alphas": "grid", "trusted": 1000, "score": "loss", "checkpoint_every": CHECKPOINT_EVERY}
OUTPUT_RULES = ("Outputs are written into a staging folder beside --out and swapped in as one step: --out holds "
                "the whole earlier result or the whole new one. No output may replace or lie inside an input; an "
                "existing result needs --overwrite, which replaces only that result's files.")


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
    sap.add_argument("--trusted", type=int, help="trusted samples (default 1000)")
    sap.add_argument("--candidates", type=int,
                     help="score only this many random training samples (seeded by --seed) and pick "
                          "the trusted ones among them (default: score every sample)")
    sap.add_argument("--score", choices=["loss", "curvature"], help="how samples are ranked (default loss)")
    sap.add_argument("--alpha", type=float, help="a fixed α (no sweep)")
    sap.add_argument("--alphas", help="the α to sweep: grid (1e1..1e6, the default), auto, or a comma list like "
                                      "10,100,1e3")
    sap.add_argument("--solver", choices=("auto", "eigh", "cholesky"), default="auto",
                     help="auto (default): cholesky for a fixed --alpha without --spectra, eigh otherwise; "
                          "eigh: one eigendecomposition shared by every α; cholesky: one Cholesky solve "
                          "per α, no spectrum")
    sap.add_argument("--spectra", action="store_true",
                     help="plot the layer spectra in report.png with a fixed --alpha too (one "
                          "eigendecomposition per layer: --solver auto then picks eigh)")
    sap.add_argument("--stats-in", help="statistics saved by --stats-out: skips selection and the forward "
                                        "pass over the training data")
    sap.add_argument("--stats-out", help="save the statistics here for later sweeps")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=os.path.join("sap_fast_out", "correct"),
                     help="folder for the corrected weights and the report (written at the end, as one step)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the result an earlier run left in --out (and an existing --stats-out); "
                          "other files in --out are kept")
    run.add_argument("--format", choices=["safetensors", "pt"], default=None,
                     help="weights format (default: that of --weights, else safetensors)")
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--device", default="cpu")
    run.add_argument("--amp", choices=["bf16", "fp16"],
                     help="mixed precision for the passes that only rank or evaluate (scoring, "
                          "validation, test); the statistics stay in full precision")
    run.add_argument("--seed", type=int, default=0, help="seed of --candidates and --val-fraction")
    run.add_argument("--checkpoint-every", type=int, metavar="N",
                     help=f"save the scores under --out every N samples, in whole batches (default {CHECKPOINT_EVERY})")
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted scoring saved under --out")
    parser.epilog = OUTPUT_RULES
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


# pairs of options that cannot both apply: (option, option, why)
CONFLICTS = (
    ("alpha", "alphas", "a fixed --alpha runs no sweep"),
    ("stats_in", "trusted", "--stats-in skips choosing the trusted samples"),
    ("stats_in", "candidates", "--stats-in skips choosing the trusted samples"),
    ("stats_in", "score", "--stats-in skips scoring the training samples"),
    ("stats_in", "checkpoint_every", "--stats-in skips scoring the training samples"),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be said wrong before any file is read: one line each (exit 2). Fills
    in the defaults of the options that may conflict (given as None when left out)."""
    if args.resume and args.stats_in:
        raise ValueError("--resume continues an interrupted scoring pass, which --stats-in skips; drop one")
    for one, other, why in CONFLICTS:
        if getattr(args, one, None) is not None and getattr(args, other, None) is not None:
            raise ValueError(f"{_flag(one)} and {_flag(other)} cannot both apply: {why}; drop one")
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
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
    _alphas(args.alphas)
    Preprocess.from_args(args)  # conflicting or incomplete image options
    decoded.EvalCache.from_args(args)


def _devices_here() -> str:
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    found = ["cpu"] + ([f"cuda:0..{cuda - 1}" if cuda > 1 else "cuda:0"] if cuda else []) + (["mps"] if mps else [])
    return "only cpu" if len(found) == 1 else ", ".join(found)


def _device(text: str) -> torch.device:
    """``--device`` as a device this machine has; else one line saying which it has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text}: not a device name; use cpu, cuda or cuda:N (this machine has "
                         f"{_devices_here()})") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {text}: {why}; this machine has {_devices_here()}: pass --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text}: no such CUDA device; this machine has {_devices_here()}")
        return device
    if device.type == "mps" and "mps" in _devices_here():
        return device
    raise ValueError(f"--device {text}: not available; this machine has {_devices_here()}")


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
        what = (f"--resume: {path} is not a scoring checkpoint of sap-fast correct (scoring saves one there "
                f"every --checkpoint-every samples)")
        fix = f"remove {os.path.dirname(path)} to start over without --resume"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch's own message is about pickles, not about this file
            raise ValueError(f"{what}: {torch_load_problem(err)}; {fix}") from None
        try:
            theirs = json.loads(state["fingerprint"])
            ok = isinstance(theirs, dict) and all(isinstance(state[k], torch.Tensor) for k in ("scores", "labels")) \
                and state["scores"].shape == state["labels"].shape and "classes" in state
        except Exception:
            ok = False
        if not ok:
            raise ValueError(f"{what}: it holds something else; {fix}")
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
            try:
                s, labels, classes = sap_fast.sample_scores(
                    model, _Take(batches, per_chunk, bar), score=args.score, batch_size=args.batch_size,
                    device=device, seed=args.seed, amp=args.amp, show_progress=False)
            except NonFiniteSample as err:  # its position in this chunk → its place in --data
                raise _non_finite("--data", train, int(scoring.positions[scoring.done + err.index]), err) from None
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
        raise LoadError(f"--val-indices {path}: unreadable ({torch_load_problem(err)}); "
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


def _non_finite(flag: str, dataset: Dataset, i: int, err: NonFiniteSample) -> LoadError:
    """A sample with non-finite logits, named by its option, position and file (or list line)."""
    base = dataset
    while isinstance(base, Subset):
        i, base = base.indices[i], base.dataset
    where = base.where(i) if hasattr(base, "where") else None
    return LoadError(f"{flag} sample {i}{f' ({where})' if where else ''} gives non-finite {err.found} "
                     f"(NaN/Inf) in {err.stage}; check that input (and --weights)")


@contextlib.contextmanager
def _naming_samples(flag: str, dataset: Dataset):
    """A pass over ``dataset`` whose non-finite sample is named as :func:`_non_finite` names it."""
    try:
        yield
    except NonFiniteSample as err:
        raise _non_finite(flag, dataset, err.index, err) from None


class Clock:
    """Seconds and samples per stage, for the report."""

    def __init__(self):
        self.times: Dict[str, object] = {}
        self.counts: Dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str, samples: Optional[int] = None):
        started = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - started
        if samples is not None:
            self.counts[name] = samples


@dataclass
class Data:
    """The run's data: training samples (None with --stats-in alone), the positions of --data
    that may be scored (``pool``: all but a held-out validation split), validation and test."""
    train: Optional[Dataset]
    pool: Optional[torch.Tensor]
    val: Optional[Dataset]
    val_flag: str
    test: Optional[Dataset]
    classes: Optional[List[str]]


@dataclass
class Selection:
    """The trusted samples and their statistics (or the statistics of --stats-in)."""
    stats: Stats
    note: str
    trusted: Optional[torch.Tensor] = None
    scoring: Optional[Scoring] = None


@dataclass
class Choice:
    """The corrected model, its α, and what the report shows of the way there."""
    fixed: torch.nn.Module
    alpha: Optional[float]
    alphas: list
    projector: object
    result: object = None
    val_before: Optional[float] = None
    val_after: Optional[float] = None


# ---- the stages ---------------------------------------------------------------------------------

def _outputs(args: argparse.Namespace) -> Outputs:
    """Stage 1, the paths: every output resolved against every input, before anything is read."""
    out = Outputs(args.out, stats_out=args.stats_out, overwrite=args.overwrite)
    inputs = [("--model", model_path(args.model)), ("--weights", args.weights),
              ("--val-indices", args.val_indices), ("--stats-in", args.stats_in)]
    inputs += [(flag, None if spec is None else data_path(spec))
               for flag, spec in (("--data", args.data), ("--val", args.val), ("--test", args.test))]
    out.check(inputs, resume=args.resume)
    return out


def _load(args: argparse.Namespace, device: torch.device):
    """Stage 2, the model: built, its weights loaded and checked finite; and the output format."""
    model = load_model(args.model, args.weights, num_classes=args.num_classes)
    named = list(model.state_dict().items())
    bad = first_non_finite_tensor(named)
    if bad is not None:
        source = f"--weights {args.weights}" if args.weights else f"--model {args.model}"
        raise LoadError(f"{source}: the tensor '{bad}' holds {non_finite_kind(dict(named)[bad])} values; SAP "
                        "needs finite weights (check how the checkpoint was saved)")
    model = model.to(device).eval()
    if device.type == "cuda":  # convs read NHWC fastest on tensor cores; the values do not change
        model = model.to(memory_format=torch.channels_last)
    fmt = args.format or ("pt" if args.weights and not args.weights.endswith(".safetensors") else "safetensors")
    return model, fmt


def _open_all(args: argparse.Namespace, preprocess: Preprocess, clock: Clock) -> Data:
    """Stage 3, the data: opened (labels and file lists only), the validation split taken out."""
    with clock.stage("scan"):
        train = classes = None
        if args.data is not None:
            train = open_data(args.data, preprocess, what="--data")
            classes = train.classes
        pool = None if train is None else torch.arange(len(train))
        val, val_flag = None, "--val"
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
            val, val_flag = _subset_targets(train, held), "--data"
            keep = torch.ones(len(train), dtype=torch.bool)
            keep[held] = False
            pool = keep.nonzero().flatten()
        test = None if args.test is None else open_data(args.test, preprocess, classes=classes, what="--test")
    for name, part in (("--data", train), ("--val", val), ("--test", test)):
        for note in getattr(part, "notes", ()) or ():
            print(f"note: {name}: {note}")
    return Data(train, pool, val, val_flag, test, classes)


def _check_fit(model, data: Data, device) -> None:
    """The model takes the data: folders and Clothing1M name their classes, so the model must
    have exactly that many outputs; a tensor file's classes are only known from its largest label."""
    exact = not isinstance(data.train if data.train is not None else data.val, TensorFile)
    if data.val is not None:
        _check_model(model, data.val, data.classes, exact, device, "--val")
    if data.train is not None:
        _check_model(model, data.train, data.classes, exact, device, "--data")


def _stats_in(args: argparse.Namespace) -> Selection:
    """Stages 4-5 with --stats-in: the statistics as saved, checked finite."""
    try:
        stats = Stats.load(args.stats_in)
    except (ValueError, FileNotFoundError) as err:
        raise LoadError(f"--stats-in {first_line(err)}") from None
    bad = first_non_finite(dict(stats))
    if bad is not None:
        raise LoadError(f"--stats-in {args.stats_in}: the statistics of layer '{bad}' hold non-finite values "
                        "(NaN/Inf); collect them again (--stats-out, from --data)")
    return Selection(stats, f"statistics from {args.stats_in} ({stats.num_samples} samples)")


def _select(model, data: Data, args, out: Outputs, device, clock: Clock, preprocess) -> Selection:
    """Stage 4, scoring and selection: every pool sample (or --candidates of them) scored, with
    checkpoints, then the lowest per class kept."""
    pool = data.pool
    n = min(args.trusted, pool.numel())
    if args.trusted > pool.numel():
        print(f"note: --trusted {args.trusted} > {pool.numel()} training samples; using all of them")
    positions = pool if args.candidates is None or args.candidates >= pool.numel() else \
        pool[torch.sort(candidate_ids(pool.numel(), args.candidates, args.seed)).values]
    scoring = Scoring(positions, {
        "model": args.model, "weights": _weights_fingerprint(args.weights), "data": args.data,
        "samples": len(data.train), "scored": positions.numel(), "candidates": args.candidates,
        "seed": args.seed, "score": args.score, "amp": args.amp, "batch_size": args.batch_size,
        "checkpoint_every": args.checkpoint_every, "preprocess": repr(preprocess),
        "val_indices": args.val_indices, "val_fraction": args.val_fraction})
    if args.resume:
        scoring.resume_from(os.path.join(out.partial, "scores.pt"))
    with clock.stage("scoring", positions.numel()):
        _score(model, data.train, scoring, args, out, device)
    scores, labels = torch.cat(scoring.scores), torch.cat(scoring.labels)
    trusted = positions[sap_fast.lowest_per_class(scores, labels, scoring.classes, n)]
    how = f"lowest {args.score}" + ("" if args.candidates is None else f" of {positions.numel()} random candidates")
    return Selection(None, f"{n} trusted samples ({how}, class-balanced)", trusted, scoring)


def _statistics(model, data: Data, picked: Selection, args, device, clock: Clock) -> None:
    """Stage 5, the statistics: the streamed Grams of the trusted samples."""
    with clock.stage("statistics", picked.trusted.numel()):
        picked.stats = sap_fast.collect_stats(
            model, loader(Subset(data.train, picked.trusted.tolist()), batch_size=args.batch_size,
                          workers=args.workers, device=device), device=device)


def _choose(model, stats: Stats, data: Data, args, device, clock: Clock, eval_cache) -> Choice:
    """Stage 6, α: the sweep on the validation split, or the fixed --alpha (validation then
    only reported). ``eval_cache`` (decoded.EvalCache): the validation images are decoded once,
    by the first pass over them."""
    val = data.val
    val_batches = None if val is None else eval_cache.loader(val, what="--val", batch_size=args.batch_size,
                                                             workers=args.workers, device=device)
    started = time.perf_counter()
    with _naming_samples(data.val_flag, val):
        if args.alpha is not None:  # one projector: its decomposition also serves the report
            solver = resolve_solver(args.solver, alphas=1, spectra=args.spectra)
            projector = sap_fast.Projector(model, stats, solver=solver)
            clock.times["decomposition"] = time.perf_counter() - started
            fixed = copy.deepcopy(model)
            projector.apply(fixed, args.alpha)
            choice = Choice(fixed, args.alpha, [None, args.alpha], projector)
            if val is not None:  # only reported: a fixed α needs no validation data
                choice.val_before, choice.val_after = (
                    sap_fast.evaluate(m, val_batches, device=device, what="--val", amp=args.amp,
                                      desc=f"validation {label}").accuracy
                    for m, label in ((model, "(original)"), (fixed, f"α={args.alpha:.3g}")))
        else:
            result = sap_fast.sweep(model, None, val_batches, stats=stats, alphas=_alphas(args.alphas),
                                    device=device, solver=args.solver, amp=args.amp)
            choice = Choice(result.model, result.best_alpha, [row.alpha for row in result.table],
                            result.projector, result, result.table[0].val_accuracy, result.best.val_accuracy)
            clock.times["decomposition"] = result.prepare_seconds
            clock.times["validation"] = [row.seconds for row in result.table]
    clock.times["alpha"] = time.perf_counter() - started
    if val is not None:
        clock.counts["validation"] = len(val) * (2 if choice.result is None else len(choice.result.table))
    return choice


def _test(model, choice: Choice, data: Data, args, device, clock: Clock, eval_cache) -> Dict[Optional[float], float]:
    """Stage 7, the test curve: every α of the run on --test (never used to choose α), its
    images decoded once (``eval_cache``)."""
    accuracy: Dict[Optional[float], float] = {}
    if data.test is None:
        return accuracy
    with clock.stage("test", len(data.test) * len(choice.alphas)), _naming_samples("--test", data.test):
        batches = eval_cache.loader(data.test, what="--test", batch_size=args.batch_size, workers=args.workers,
                                    device=device)
        work = copy.deepcopy(model)
        for a in choice.alphas:
            choice.projector.apply(work, a)
            accuracy[a] = sap_fast.evaluate(work, batches, device=device, what="--test", amp=args.amp,
                                            desc="test" if a is None else f"test α={a:.3g}").accuracy
    return accuracy


def _write(out: Outputs, args, fmt: str, picked: Selection, choice: Choice, data: Data,
           test_accuracy, clock: Clock, eval_cache) -> Dict[str, Optional[str]]:
    """Stage 8, the write: every output registered, then committed as one step (outputs.py)."""
    weights_path = out.add(f"corrected.{fmt}", lambda p: save_weights(choice.fixed, p, fmt))
    if picked.trusted is not None:
        scoring = picked.scoring
        out.add("trusted.pt", lambda p: io.save_torch(p, {
            "trusted": picked.trusted, "positions": scoring.positions, "scores": torch.cat(scoring.scores),
            "labels": torch.cat(scoring.labels)}))
    if args.stats_out:
        out.add_stats(picked.stats.save)
    # the spectra come free with the eigh route; the solve route computes them only when asked
    projector = choice.projector
    spectra = projector.spectra if (projector.has_spectra or args.spectra) else None
    times, counts = clock.times, clock.counts
    summary = {"command": "correct", "argv": sys.argv[1:], "model": args.model, "weights_in": args.weights,
               "data": args.data, "val": args.val or args.val_indices or f"{args.val_fraction} of --data",
               "test": args.test, "classes": data.classes, "trusted": picked.note, "alpha": choice.alpha,
               "val_before": choice.val_before, "val_after": choice.val_after,
               "test_before": test_accuracy.get(None), "test_after": test_accuracy.get(choice.alpha),
               "weights_out": weights_path, "seconds": times, "samples": counts,
               "eval_cache": eval_cache.summary(),
               "images_per_second": {k: counts[k] / _seconds(times[k]) for k in counts if times.get(k)}}
    written: Dict[str, Optional[str]] = {}

    def write_report(path):
        written.update(report.write_report(os.path.dirname(path), sweep=choice.result, spectra=spectra,
                                           alpha=choice.alpha, test_accuracy=test_accuracy or None,
                                           extra=summary, title=f"sap-fast correct: {args.model}"))

    out.add("report.json", write_report)
    out.commit()
    return written


def _say(args, out: Outputs, picked: Selection, choice: Choice, data: Data, test_accuracy, written) -> None:
    alpha = choice.alpha
    chosen = "no projection (no α beat the original on validation)" if alpha is None else f"α = {alpha:.3g}"
    print(f"{picked.note}; {chosen}")
    accuracies = ([f"validation accuracy {100 * choice.val_before:.2f}% → {100 * choice.val_after:.2f}%"]
                  if data.val is not None else []) + \
        ([f"test {100 * test_accuracy[None]:.2f}% → {100 * test_accuracy[alpha]:.2f}%"] if test_accuracy else [])
    if accuracies:
        print("; ".join(accuracies))
    if written.get("png") is None:
        print("note: no report.png: a fixed --alpha with the Cholesky solver has no sweep and no spectra "
              "to plot (--spectra adds the layer spectra, one eigendecomposition per layer)")
    print(f"wrote {args.out}: {', '.join(sorted(os.listdir(out.folder)))}")


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    device = _device(args.device)
    out = _outputs(args)
    if args.workers and device.type == "cpu":
        # the decoding workers take cores of their own: the forward passes keep the rest, so the
        # two do not fight over the same cores (sap_fast.cli.main restores the thread count)
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - args.workers)))
    clock = Clock()
    preprocess = Preprocess.from_args(args)
    model, fmt = _load(args, device)
    data = _open_all(args, preprocess, clock)
    _check_fit(model, data, device)
    if args.stats_in is not None:
        picked = _stats_in(args)
    else:
        picked = _select(model, data, args, out, device, clock, preprocess)
        _statistics(model, data, picked, args, device, clock)
    # the validation and test images are decoded once, by the first pass over each (a cache too
    # large for memory goes beside --out, where the outputs are staged)
    eval_cache = decoded.EvalCache.from_args(args, folder=out.parent)
    choice = _choose(model, picked.stats, data, args, device, clock, eval_cache)
    test_accuracy = _test(model, choice, data, args, device, clock, eval_cache)
    written = _write(out, args, fmt, picked, choice, data, test_accuracy, clock, eval_cache)
    _say(args, out, picked, choice, data, test_accuracy, written)
    return 0
