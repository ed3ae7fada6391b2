"""The ``sap-fast`` command (also ``python -m sap_fast``).

    sap-fast demo      the embedded digits demo (noisy labels → SAP), with report.png/report.json
    sap-fast correct   correct your own model from a folder of images or a .pt file
    sap-fast compare   SAP beside Finetune, SSD, SCRUB, GA, RL, UGradSL(+), ManiF-SMC on the digits
    sap-fast bench     the benchmark suite that fits this machine

Errors in what was asked (bad paths, unreadable checkpoints, class counts that do not match, a
model the data do not fit, bad options) print one line and exit with status 2; anything else
exits with 1 (``--traceback`` shows it in full); Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List, Optional

import torch

from . import compare as compare_cmd
from . import demo as demo_cmd
from .forward import set_progress
from .load import LoadError

USAGE_ERRORS = (LoadError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
                IsADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sap-fast", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,correct,compare,bench}")

    demo = commands.add_parser("demo", parents=[common], help="digits with label noise, repaired by SAP",
                               description=demo_cmd.__doc__.split("\n\n")[0])
    demo_cmd.add_arguments(demo)
    demo.set_defaults(run=demo_cmd.run)

    fix = commands.add_parser("correct", parents=[common], help="correct your own model",
                              description="Select trusted samples, collect statistics, choose α on a "
                                          "validation split (or use --alpha), write the corrected weights.")
    what = fix.add_argument_group("model")
    what.add_argument("--model", required=True,
                      help="module:factory (called with no arguments), a TorchScript file, or a torch.save'd "
                           "module (a pickle: only files you trust)")
    what.add_argument("--weights", help="state dict to load first: .pt/.pth or .safetensors")
    data = fix.add_argument_group("data")
    data.add_argument("--data", help="training data (noisy labels): a folder of images in class "
                                     "sub-folders, or a .pt file with (inputs, targets)")
    data.add_argument("--val", help="validation data (same forms); default: --val-fraction of --data")
    data.add_argument("--val-fraction", type=float, default=0.1)
    data.add_argument("--test", help="clean test data, only reported (never used to choose α)")
    data.add_argument("--image-size", type=int, nargs="+", metavar="N", help="resize images to H W (or N N)")
    data.add_argument("--channels", type=int, default=3, choices=[1, 3], help="image channels (default 3)")
    data.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel")
    data.add_argument("--std", type=float, nargs="+", help="normalisation std per channel")
    sap = fix.add_argument_group("SAP")
    sap.add_argument("--trusted", type=int, default=1000, help="trusted samples (default 1000)")
    sap.add_argument("--alpha", type=float, help="a fixed α (no sweep)")
    sap.add_argument("--alphas", default="grid", help="grid (1e1..1e6), auto, or a comma list like 10,100,1e3")
    sap.add_argument("--solver", choices=("eigh", "cholesky"),
                     help="eigh: one eigendecomposition shared by every α (the sweep's default); "
                          "cholesky: one Cholesky solve per α (the fixed --alpha default)")
    sap.add_argument("--stats-in", help="statistics saved by --stats-out: skips selection and the forward "
                                        "pass over the training data")
    sap.add_argument("--stats-out", help="save the statistics here for later sweeps")
    run = fix.add_argument_group("run")
    run.add_argument("--out", default=os.path.join("sap_fast_out", "correct"),
                     help="folder for the corrected weights and the report (created)")
    run.add_argument("--format", choices=["safetensors", "pt"], default=None,
                     help="weights format (default: that of --weights, else safetensors)")
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--device", default="cpu")
    run.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    fix.set_defaults(run=run_correct)

    cmp = commands.add_parser("compare", parents=[common], help="SAP beside the other correctors (digits)",
                              description=compare_cmd.__doc__.split("\n\n")[0])
    compare_cmd.add_arguments(cmp)
    cmp.set_defaults(run=compare_cmd.run)

    bench = commands.add_parser("bench", parents=[common], help="benchmarks that fit this machine")
    bench.add_argument("--quick", action="store_true", help="fewer cases")
    bench.add_argument("--tiny", action="store_true", help="smoke run on tiny shapes (seconds)")
    bench.add_argument("--out-dir", help="write the JSON results here instead of benchmarks/results")
    bench.set_defaults(run=run_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:
        set_progress(False)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"sap-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, unless asked for the whole story
        if args.traceback:
            raise
        text = str(err).strip().splitlines()
        print(f"sap-fast {args.command}: error: {text[0] if text else type(err).__name__}", file=sys.stderr)
        return 2 if isinstance(err, USAGE_ERRORS) else 1


# ---- correct ---------------------------------------------------------------------------------

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
    from .evaluate import classifier_logits
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


def run_correct(args: argparse.Namespace) -> int:
    import sap_fast
    from . import io, report
    from .load import load_data, load_model
    from .spectrum import spectra
    from .stats import Stats

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
    solver = {} if args.solver is None else {"solver": args.solver}  # else correct's / sweep's default
    if args.alpha is not None:
        fixed = sap_fast.correct(model, stats=stats, alpha=args.alpha, batch_size=args.batch_size,
                                 device=args.device, **solver)
        result, alpha = None, args.alpha
    else:
        result = sap_fast.sweep(model, None, val, stats=stats, alphas=_alphas(args.alphas),
                                batch_size=args.batch_size, device=args.device, **solver)
        fixed, alpha = result.model, result.best_alpha
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
    paths = report.write_report(args.out, sweep=result, spectra=spectra(stats), alpha=alpha, extra=summary,
                                title=f"sap-fast correct: {args.model}")
    chosen = "no projection (no α beat the original on validation)" if alpha is None else f"α = {alpha:.3g}"
    print(f"{trusted_note}; {chosen}")
    print(f"validation accuracy {100 * before.accuracy:.2f}% → {100 * after.accuracy:.2f}%"
          + (f"; test {100 * tests['before']:.2f}% → {100 * tests['after']:.2f}%" if tests else ""))
    print(f"wrote {weights_path}, {', '.join(str(p) for p in paths.values())}")
    return 0


# ---- bench -----------------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> int:
    from . import backend
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "benchmarks")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no benchmarks/ next to the package ({root}); the benchmarks ship with "
                                "the source checkout")
    if torch.cuda.is_available():
        print("a GPU is visible: the GPU benchmarks come with issues 4 and 5; running the CPU suite")
    scripts = []
    native = ["bench_native_cpu.py"] + (["--tiny"] if args.tiny else ["--quick"] if args.quick else [])
    if backend.native() is not None:
        scripts.append((native, "cpu-native.json"))
    else:
        print("note: sap_fast._C is not built; skipping the native kernel benchmark")
    if not args.tiny:
        scripts.append((["bench_cpu.py"] + (["--quick"] if args.quick else []), "cpu-vs-reference.json"))
    for command, result in scripts:
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            command = command + ["--out", os.path.join(args.out_dir, result)]
        print(f"$ python benchmarks/{' '.join(command)}", flush=True)
        code = subprocess.call([sys.executable, os.path.join(folder, command[0]), *command[1:]])
        if code != 0:
            raise RuntimeError(f"benchmarks/{command[0]} failed with status {code}")
    return 0
