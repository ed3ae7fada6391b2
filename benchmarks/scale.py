"""``sap-fast correct`` end to end on Clothing1M-shaped trees of growing size (CPU).

What a user's run costs when the data, not the Gram, is the work: for each tree size and each
number of DataLoader workers, ``sap-fast correct`` runs in a fresh process (as a user starts it)
on a synthetic tree in Clothing1M's own layout (``sap_fast.experiments.clothing1m.write_tree``:
64x64 JPEGs, 38% wrong labels, clean validation and test splits), with a fixed α grid and
``--test``. Per run it collects the command's own per-stage seconds from ``report.json``
(scan, scoring, statistics, decomposition, each α's validation pass, test), the images per
second of every stage, the wall time of the whole process, and peak memory: ``ru_maxrss`` of the
command as its parent sees it (``getrusage(RUSAGE_CHILDREN)`` in a wrapper process started per
run: the largest single process, which is the main one) and the peak of the summed PSS of the
process and its DataLoader workers (sampled every 0.25 s; PSS counts shared pages once).

The model is a small CNN (three stride-2 3x3 convs, 16/32/64 channels, global average pool, a
14-way linear head; ``scale_cnn:make``), TRAINED briefly (a few epochs of Adam, seeded) on the
noisy labels of the smallest tree of the run, so that the loss ranking and the α sweep do real
work; its weights are cached beside the trees. The trees and weights are cached under
``--trees`` (default ``build/scale-trees``), so a rerun measures only the runs. Before the runs
of a tree every image is read once, so every run reads from the page cache: disk reads are not
what is measured.

    python benchmarks/scale.py            # sizes 2000, 20000, 50000 x workers 0, 2: about 4-6 min on 2 cores
    python benchmarks/scale.py --quick    # smoke run: 300 and 1000 images, workers 0, --trusted 100, 1 epoch
    python benchmarks/scale.py --sizes 2000 --workers 0,2 --out /tmp/scale.jsonl
    python benchmarks/scale.py --regenerate   # write the cached trees again, to measure the generation

→ benchmarks/results/scale-cpu.jsonl (``--quick``: build/scale-cpu-quick.jsonl) and Markdown
tables on stdout. Uses the package and the standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from common import write_results  # noqa: E402
DEFAULT_TREES = os.path.join(REPO, "build", "scale-trees")
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "scale-cpu.jsonl")
QUICK_OUT = os.path.join(REPO, "build", "scale-cpu-quick.jsonl")
SIZES = (2000, 20000, 50000)
QUICK_SIZES = (300, 1000)
WORKERS = (0, 2)
ALPHAS = "1e2,1e3,1e4,1e5"
IMAGE_SIZE = 64
SEED = 0
VAL_FRACTION, TEST_FRACTION = 0.028, 0.02   # 1400 / 1000 at 50 000 training images
FLOORS = {"full": (200, 150), "quick": (50, 40)}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
TRAIN_EPOCHS = {"full": 4, "quick": 1}
MODEL_VERSION = 1  # part of the cached weights' name: bump when the network below changes

NETWORK = '''"""A small CNN for 64x64 RGB images and Clothing1M's 14 classes (benchmarks/scale.py)."""
from torch import nn


def make():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 14))
'''

# Runs one command (argv[3:]) as its child, writes {"returncode", "wall_seconds", "peak_rss_kib",
# "peak_tree_pss_kib", "pss_samples"} to argv[1] and prints a line every argv[2] seconds while it
# runs. ru_maxrss of RUSAGE_CHILDREN: the largest process among the waited-for descendants.
WRAPPER = r'''
import json, os, resource, subprocess, sys, threading, time
path, every, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
def children(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:  # the children of every thread, not only the main one
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return found
def pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
start = time.perf_counter()
proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
peak, samples, done = 0, 0, threading.Event()
def sample():
    global peak, samples
    last = time.perf_counter()
    while not done.wait(0.25):
        todo, total = [proc.pid], 0
        while todo:
            pid = todo.pop()
            total += pss(pid)
            todo += children(pid)
        peak, samples = max(peak, total), samples + 1
        now = time.perf_counter()
        if every > 0 and now - last >= every:
            last = now
            print(f"      ... {now - start:.0f} s, process tree {total / 1024:.0f} MiB (PSS)", flush=True)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
code = proc.wait()
wall = time.perf_counter() - start
done.set()
thread.join()
with open(path, "w") as f:
    json.dump({"returncode": code, "wall_seconds": wall,
               "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
               "peak_tree_pss_kib": peak, "pss_samples": samples}, f)
'''


def say(text: str = "") -> None:
    print(text, flush=True)


# ---- machine ----------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        from PIL import __version__ as pillow
        from PIL import features
        turbo = bool(features.check_feature("libjpeg_turbo"))
    except Exception:
        pillow, turbo = None, None
    try:
        import torchvision  # noqa: F401  (Preprocess decodes with torchvision's transforms when it imports)
        preprocess = "torchvision"
    except Exception:
        preprocess = "PIL + numpy (no torchvision)"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu_model": cpu, "cores": cores, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "pillow": pillow, "libjpeg_turbo": turbo,
            "preprocess_path": preprocess, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_average_at_start": list(os.getloadavg())}


# ---- trees and weights -------------------------------------------------------------------------

def split_sizes(n: int, mode: str) -> tuple:
    low_val, low_test = FLOORS[mode]
    return max(low_val, round(VAL_FRACTION * n)), max(low_test, round(TEST_FRACTION * n))


def tree(folder: str, n: int, mode: str, regenerate: bool = False) -> dict:
    """The cached tree of ``n`` noisy training images (generated once, into a temporary folder
    renamed into place, so an interrupted generation leaves nothing that looks finished;
    ``regenerate``: write it again, to measure the generation)."""
    from sap_fast.experiments.clothing1m import write_tree

    val, test = split_sizes(n, mode)
    name = f"c1m-{n}-val{val}-test{test}-{IMAGE_SIZE}px-seed{SEED}"
    root = os.path.join(folder, name)
    info_path = os.path.join(root, "generated.json")
    if os.path.isfile(info_path) and not regenerate:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        info.update(root=root, cached=True)
        say(f"  tree {name}: cached (generated at {info['images_per_second']:.0f} images/s)")
        return info
    shutil.rmtree(root, ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
    say(f"  tree {name}: generating {n + val + test} images ...")
    try:
        info = write_tree(staging, noisy_train=n, clean_val=val, clean_test=test, image_size=IMAGE_SIZE,
                          noise=0.38, seed=SEED)
        with open(os.path.join(staging, "generated.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in info.items() if k != "root"}, f, indent=1)
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info.update(root=root, cached=False)
    say(f"    {info['images']} images in {info['seconds']:.1f} s ({info['images_per_second']:.0f} images/s, "
        f"{info['workers']} encoding processes)")
    return info


def preprocess():
    from sap_fast.cli.data import Preprocess

    return Preprocess.from_args(image_size=[IMAGE_SIZE], mean=list(MEAN), std=list(STD))


def weights(folder: str, train_tree: dict, epochs: int) -> dict:
    """The small CNN trained for ``epochs`` epochs on ``train_tree``'s noisy labels (seeded),
    cached as a state dict beside the trees."""
    import torch

    from sap_fast.cli.data import loader, open_data

    with open(os.path.join(folder, "scale_cnn.py"), "w", encoding="utf-8") as f:
        f.write(NETWORK)
    base = os.path.basename(train_tree["root"])
    path = os.path.join(folder, f"scale_cnn-v{MODEL_VERSION}-{base}-{epochs}ep.pt")
    info = {"factory": "scale_cnn:make", "module": os.path.join(folder, "scale_cnn.py"), "weights": path,
            "trained_on": base, "epochs": epochs, "optimizer": "Adam, lr 3e-3, batch 64, seed 0"}
    meta = path + ".json"
    if os.path.isfile(path) and os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            info.update(json.load(f), cached=True)
        say(f"  weights {os.path.basename(path)}: cached")
        return info
    say(f"  weights: training the small CNN on {base} ({epochs} epochs) ...")
    started = time.perf_counter()
    namespace: dict = {}
    exec(NETWORK, namespace)
    torch.manual_seed(SEED)
    model = namespace["make"]()
    data = open_data(f"clothing1m:{train_tree['root']}", preprocess())
    x, y = (torch.cat(part) for part in zip(*loader(data, batch_size=256)))
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        for batch in torch.randperm(len(y), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    trained = {"train_seconds": time.perf_counter() - started, "noisy_train_accuracy": accuracy}
    with open(meta, "w", encoding="utf-8") as f:
        json.dump(trained, f)
    info.update(trained, cached=False)
    say(f"    trained in {trained['train_seconds']:.1f} s (accuracy on its noisy labels {100 * accuracy:.1f}%)")
    return info


def warm(root: str) -> dict:
    """Read every image of the tree once, so every run finds them in the page cache."""
    started, files, size = time.perf_counter(), 0, 0
    for top, _, names in os.walk(os.path.join(root, "images")):
        for name in names:
            with open(os.path.join(top, name), "rb") as f:
                size += len(f.read())
            files += 1
    return {"files": files, "megabytes": size / 1e6, "seconds": time.perf_counter() - started}


# ---- one run ------------------------------------------------------------------------------------

def sap_fast() -> list:
    """The ``sap-fast`` command of this interpreter (its console script, else ``python -m sap_fast``)."""
    exe = os.path.join(os.path.dirname(sys.executable), "sap-fast")
    return [exe] if os.path.isfile(exe) else [sys.executable, "-m", "sap_fast"]


def command(tree_info: dict, model: dict, workers: int, alphas: str, trusted: int, batch_size: int,
            out: str) -> list:
    root = tree_info["root"]
    return sap_fast() + ["correct", "--model", model["factory"], "--weights", model["weights"],
                   "--data", f"clothing1m:{root}", "--val", f"clothing1m:{root}:clean_val",
                   "--test", f"clothing1m:{root}:clean_test", "--image-size", str(IMAGE_SIZE),
                   "--mean", *map(str, MEAN), "--std", *map(str, STD), "--alphas", alphas,
                   "--trusted", str(trusted), "--batch-size", str(batch_size), "--workers", str(workers),
                   "--out", out, "--quiet"]


def startup(folder: str, repeats: int) -> dict:
    """Wall seconds of ``sap-fast correct --help`` in a fresh process: the interpreter, torch and
    the package imported, nothing read. The best of ``repeats``; what every run pays before its
    first stage."""
    exe = sap_fast() + ["correct", "--help"]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(exe, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return {"command": exe, "seconds": min(times), "all_seconds": times}


def run_one(folder: str, tree_info: dict, model: dict, workers: int, args) -> dict:
    """``sap-fast correct`` in a fresh process under the wrapper; the report's stages and rates."""
    scratch = tempfile.mkdtemp(prefix="run-", dir=folder)
    out = os.path.join(scratch, "out")
    cmd = command(tree_info, model, workers, args.alphas, args.trusted, args.batch_size, out)
    measured = os.path.join(scratch, "measured.json")
    log_path = os.path.join(scratch, "command.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")])))
    load_before = os.getloadavg()
    try:
        lines = []
        with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
                [sys.executable, "-c", WRAPPER, measured, str(args.heartbeat), *cmd], cwd=folder, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # as it comes: the heartbeat and the command's own lines
                line = line.rstrip("\n")
                log.write(line + "\n")
                if not line.startswith("      ..."):
                    lines.append(line)
                say(line if line.startswith("      ...") else f"      | {line}")
        if not os.path.isfile(measured):  # the wrapper itself failed: no measurement at all
            return {"train_images": tree_info["noisy_train"], "val_images": tree_info["clean_val"],
                    "test_images": tree_info["clean_test"], "workers": workers, "command": cmd,
                    "command_line": shlex.join(cmd), "returncode": proc.returncode, "wall_seconds": None,
                    "error": "\n".join(lines[-15:]) or f"the measuring wrapper exited with {proc.returncode}"}
        with open(measured, encoding="utf-8") as f:
            m = json.load(f)
        row = {"train_images": tree_info["noisy_train"], "val_images": tree_info["clean_val"],
               "test_images": tree_info["clean_test"], "workers": workers, "command": cmd,
               "command_line": shlex.join(cmd),
               "returncode": m["returncode"], "wall_seconds": m["wall_seconds"],
               "peak_rss_mib": m["peak_rss_kib"] / 1024, "peak_tree_pss_mib": m["peak_tree_pss_kib"] / 1024,
               "pss_samples": m["pss_samples"], "load_average_before": list(load_before),
               "load_average_after": list(os.getloadavg())}
        if m["returncode"] != 0:
            row["error"] = "\n".join(lines[-15:])
            return row
        with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
            extra = json.load(f)["extra"]
        row.update(stages(extra, tree_info))
        return row
    finally:
        if not args.keep_outputs:
            shutil.rmtree(scratch, ignore_errors=True)


def stages(extra: dict, tree_info: dict) -> dict:
    """Seconds and images per second of every stage, from report.json's ``extra``."""
    sec, samples = extra["seconds"], extra["samples"]
    validation = list(sec.get("validation") or [])
    passes = len(validation)  # no projection, then one per α; --test evaluates the same models
    n_val, n_test = samples.get("validation", tree_info["clean_val"]), samples.get("test", tree_info["clean_test"])
    keys = tree_info["noisy_train"] + tree_info["clean_val"] + tree_info["clean_test"]
    staged = sum(sec.get(k, 0.0) for k in ("scan", "scoring", "statistics", "alpha", "test"))
    rate = {"scan_keys": keys / sec["scan"] if sec.get("scan") else None,
            "scoring": samples["scoring"] / sec["scoring"] if sec.get("scoring") else None,
            "statistics": samples["statistics"] / sec["statistics"] if sec.get("statistics") else None,
            "validation": [n_val / s if s else None for s in validation],
            "test": n_test * passes / sec["test"] if sec.get("test") and passes else None}
    return {"seconds": dict(sec), "samples": dict(samples), "test_passes": passes,
            "validation_mean_seconds": sum(validation) / passes if passes else None,
            "test_seconds_per_pass": sec["test"] / passes if passes and sec.get("test") else None,
            "unstaged_seconds": None,  # filled by the caller: wall time outside the stages
            "staged_seconds": staged, "images_per_second": rate,
            "command_images_per_second": extra.get("images_per_second"),
            "alpha": extra.get("alpha"), "val_before": extra.get("val_before"), "val_after": extra.get("val_after"),
            "test_before": extra.get("test_before"), "test_after": extra.get("test_after")}


# ---- tables -------------------------------------------------------------------------------------

def _s(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def _rate(value):
    return "–" if value is None else f"{value:,.0f}"


def markdown(payload: dict) -> str:
    lines = ["Generation (`write_tree`, 64×64 JPEGs):", "",
             "| tree | images | seconds | images/s | encoding processes | cached |",
             "|---|---:|---:|---:|---:|---|"]
    for g in payload["generation"]:
        lines.append(f"| {os.path.basename(g['root'])} | {g['images']:,} | {_s(g['seconds'], 1)} | "
                     f"{_rate(g['images_per_second'])} | {g['workers']} | {'yes' if g['cached'] else 'no'} |")
    settings = payload["settings"]
    caption = ("`sap-fast correct` per run: seconds (images/s); validation and test are per pass (mean of "
               f"{settings['passes']} passes: no projection + {settings['alpha_count']} α); other = wall − stages "
               f"(of which {settings['startup']['seconds']:.1f} s start-up: interpreter and imports; the rest "
               "loading the model, checks, writing the outputs); peak RSS = ru_maxrss (largest process), tree "
               "PSS = peak summed PSS of the command and its workers.")
    header = ("| train images | val / test | workers | scan | scoring | statistics | decomposition | "
              "validation / pass | test / pass | other | wall | peak RSS MiB | tree PSS MiB |")
    lines += ["", caption, "", header, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["runs"]:
        head = f"| {r['train_images']:,} | {r['val_images']:,} / {r['test_images']:,} | {r['workers']} |"
        if "error" in r:
            cells = ["failed: see the results"] + [""] * 6 + [_s(r["wall_seconds"], 1), "", ""]
            lines.append(head + " " + " | ".join(cells) + " |")
            continue
        sec, rate = r["seconds"], r["images_per_second"]
        val_rates = [v for v in rate["validation"] if v]
        val_rate = sum(val_rates) / len(val_rates) if val_rates else None
        lines.append(
            head + f" {_s(sec.get('scan'))} | {_s(sec.get('scoring'), 1)} ({_rate(rate['scoring'])}) | "
            f"{_s(sec.get('statistics'))} ({_rate(rate['statistics'])}) | {_s(sec.get('decomposition'), 3)} | "
            f"{_s(r['validation_mean_seconds'])} ({_rate(val_rate)}) | {_s(r['test_seconds_per_pass'])} "
            f"({_rate(rate['test'])}) | {_s(r['unstaged_seconds'], 1)} | {_s(r['wall_seconds'], 1)} | "
            f"{r['peak_rss_mib']:.0f} | {r['peak_tree_pss_mib']:.0f} |")
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------

def _ints(text: str) -> list:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/scale.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_ints, help="noisy training images per tree, a comma list "
                                                     f"(default {','.join(map(str, SIZES))})")
    parser.add_argument("--workers", type=_ints, help="--workers settings of the command, a comma list "
                                                       f"(default {','.join(map(str, WORKERS))})")
    parser.add_argument("--alphas", default=ALPHAS, help=f"the command's --alphas (default {ALPHAS})")
    parser.add_argument("--trusted", type=int, help="the command's --trusted (default 1000; --quick: 100)")
    parser.add_argument("--batch-size", type=int, default=256, help="the command's --batch-size (default 256)")
    parser.add_argument("--trees", default=DEFAULT_TREES, help="folder of the cached trees and weights "
                                                               "(default build/scale-trees)")
    parser.add_argument("--out", help="results, JSON lines (default benchmarks/results/scale-cpu.jsonl; --quick: "
                                      "build/scale-cpu-quick.jsonl)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 and 1000 images, workers 0, "
                                                             "--trusted 100")
    parser.add_argument("--heartbeat", type=float, default=20.0,
                        help="print a line every this many seconds while a run goes on (0: never)")
    parser.add_argument("--regenerate", action="store_true",
                        help="write the trees again even when cached (to measure the generation)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep each run's --out folder and log "
                                                                    "under --trees")
    args = parser.parse_args(argv)
    for flag, value in (("--trusted", args.trusted), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.sizes and min(args.sizes) < 1:
        parser.error(f"--sizes must be positive, got {args.sizes}")
    mode = "quick" if args.quick else "full"
    sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else SIZES)))
    workers = args.workers or ([0] if args.quick else list(WORKERS))
    args.trusted = args.trusted or (100 if args.quick else 1000)
    out = os.path.abspath(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT))
    folder = os.path.abspath(args.trees)
    os.makedirs(folder, exist_ok=True)
    alpha_count = len([a for a in args.alphas.split(",") if a.strip()])
    started = time.perf_counter()

    say(f"scale benchmark ({mode}): sizes {sizes}, workers {workers}, α {args.alphas}, --trusted {args.trusted}")
    info = machine()
    say(f"  {info['cpu_model']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"images decoded by {info['preprocess_path']}, load average {info['load_average_at_start'][0]:.2f}")
    say("trees:")
    trees = [tree(folder, n, mode, args.regenerate) for n in sizes]
    model = weights(folder, trees[0], TRAIN_EPOCHS[mode])
    start_cost = startup(folder, 1 if args.quick else 3)
    say(f"  start-up of the command (sap-fast correct --help, best of {len(start_cost['all_seconds'])}): "
        f"{start_cost['seconds']:.2f} s")
    settings = {"alphas": args.alphas, "alpha_count": alpha_count, "passes": alpha_count + 1,
                "trusted": args.trusted, "batch_size": args.batch_size, "image_size": IMAGE_SIZE,
                "preprocess": {"image_size": IMAGE_SIZE, "mean": MEAN, "std": STD},
                "noise": 0.38, "seed": SEED, "mode": mode, "trees": folder, "model": model,
                "page_cache": "warm: every image is read once before the runs of its tree",
                "startup": start_cost}
    notes = [("images_per_second.test here counts every pass (no projection + one per α); report.json's own "
              "extra.images_per_second.test (kept as command_images_per_second) divides one pass's images by "
              "the time of all passes"),
             "disk reads are not measured: every image is read once before the runs of its tree (page cache warm)",
             ("on a loaded machine small LAPACK calls with torch's default threads can take 100x longer "
              "(decomposition); compare load_average_before/after of each run")]
    invocation = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    payload = {"notes": notes, "meta": {**info, "command": invocation},
               "settings": settings, "generation": [], "runs": []}
    for t in trees:
        payload["generation"].append({k: t[k] for k in ("root", "images", "noisy_train", "clean_val", "clean_test",
                                                        "image_size", "seconds", "images_per_second", "workers",
                                                        "noise_rate", "cached")})
    total = len(trees) * len(workers)
    done = 0
    for t in trees:
        warmed = warm(t["root"])
        say(f"tree of {t['noisy_train']:,} images: read {warmed['files']:,} files ({warmed['megabytes']:.0f} MB) "
            f"in {warmed['seconds']:.1f} s to warm the page cache")
        for w in workers:
            done += 1
            say(f"  run {done}/{total}: sap-fast correct on {t['noisy_train']:,} training images "
                f"({t['clean_val']} val, {t['clean_test']} test), --workers {w} ...")
            row = run_one(folder, t, model, w, args)
            row["page_cache_warm"] = warmed
            if "error" in row:
                say(f"    FAILED (exit status {row['returncode']})")
            else:
                row["unstaged_seconds"] = row["wall_seconds"] - row["staged_seconds"]
                row["outputs_and_checks_seconds"] = row["unstaged_seconds"] - start_cost["seconds"]
                sec = row["seconds"]
                say(f"    wall {row['wall_seconds']:.1f} s: scan {sec['scan']:.2f}, scoring {sec['scoring']:.1f} "
                    f"({row['images_per_second']['scoring']:.0f} img/s), statistics {sec['statistics']:.2f}, "
                    f"decomposition {sec['decomposition']:.3f}, validation {row['validation_mean_seconds']:.2f}/pass, "
                    f"test {row['test_seconds_per_pass']:.2f}/pass; peak RSS {row['peak_rss_mib']:.0f} MiB, "
                    f"tree PSS {row['peak_tree_pss_mib']:.0f} MiB")
            payload["runs"].append(row)
    payload["meta"]["load_average_at_end"] = list(os.getloadavg())
    payload["meta"]["benchmark_seconds"] = time.perf_counter() - started
    table = markdown(payload)
    meta = dict(payload.pop("meta"))
    write_results(out, payload, name="scale", time=meta.pop("date"), **meta)
    say()
    say(table)
    say()
    say(f"{meta['benchmark_seconds']:.0f} s in all")
    return 1 if any("error" in r for r in payload["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
