"""The α sweep of ``sap-fast correct`` with the validation and test splits decoded once, against
decoding them on every pass (CPU).

A synthetic tree in Clothing1M's layout (``sap_fast.experiments.clothing1m.write_tree``: real
JPEGs, 224×224 by default, 5 000 validation and 1 000 test images) is generated once under
``--trees``; every image is read once before the runs, so the runs read from the page cache. A
small CNN for 224×224 inputs (seeded weights) and its statistics (``--stats-in``, collected once
from the tree's training images) leave the sweep as the work: ``--preset imagenet`` (shorter
side 256, centre crop 224, ImageNet normalisation), the default 11-α grid plus "no projection"
(12 validation passes) and ``--test`` (12 test passes).

Each ``--eval-cache`` mode runs ``sap-fast correct`` in a fresh process, as a user starts it;
per run: the wall time of the process, the command's own seconds for the sweep (decomposition and
every α's validation pass) and the test passes, peak memory (from ``/proc/PID/status`` every
0.1 s: the process's high-water mark ``VmHWM``, and the peaks of its anonymous and file-backed
resident memory: a memory-mapped cache shows as file-backed pages, which the kernel can drop
and read again), and whether the validation table, the test curve and the weights equal
those of ``off`` bit for bit.

    python benchmarks/sweep_cache.py                      # off, memory, disk, auto: about 8 min on 2 cores
    python benchmarks/sweep_cache.py --val 300 --test 100 --image-size 64 --modes off,auto   # a smoke run
    python benchmarks/sweep_cache.py --workers 2 --out /tmp/sweep-cache.jsonl

→ benchmarks/results/sweep-cache-cpu.jsonl, sweep-cache-cpu.png beside it, and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
from common import progress_bar, write_results  # noqa: E402

NETWORK = '''"""A small CNN for 224x224 RGB images and Clothing1M's 14 classes (benchmarks/sweep_cache.py)."""
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=4, padding=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 14))
'''
MODES = ("off", "memory", "disk", "auto")


def say(text: str = "", bar=None) -> None:
    if bar is not None and hasattr(bar, "write"):
        bar.write(text)
    else:
        print(text, flush=True)


def _bar(total: int, enabled: bool):
    """A tqdm bar over the runs (on stderr), or a stand-in that only prints."""
    return progress_bar(total, "sweep runs", "run", enabled)


def plot(rows: list, path: str, title: str):
    """Per mode: the sweep's and the test passes' seconds, and the peak memory; ``path`` or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = [r for r in rows if "error" not in r]
    if not done:
        return None
    names = [f"{r['mode']}" for r in done]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    other = [max(r["wall_seconds"] - r["sweep_seconds"] - r["test_seconds"], 0) for r in done]
    sweep = [r["sweep_seconds"] for r in done]
    test = [r["test_seconds"] for r in done]
    left.bar(names, sweep, label="sweep (12 validation passes)")
    left.bar(names, test, bottom=sweep, label="test (12 passes)")
    left.bar(names, other, bottom=[a + b for a, b in zip(sweep, test)], label="the rest of the run", color="0.75")
    left.set_ylabel("seconds")
    left.set_xlabel("--eval-cache")
    left.legend(fontsize=8)
    left.set_title("wall time of sap-fast correct")
    x = range(len(done))
    right.bar([i - 0.2 for i in x], [r["peak_anon_mib"] for r in done], width=0.4, label="anonymous (heap)")
    right.bar([i + 0.2 for i in x], [r["peak_file_mib"] for r in done], width=0.4, label="file-backed (mapped)")
    right.set_xticks(list(x))
    right.set_xticklabels(names)
    right.set_xlabel("--eval-cache")
    right.set_ylabel("MiB")
    right.set_title("peak resident memory")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prepare(folder: str, val: int, test: int, size: int, train: int) -> dict:
    """The cached tree, the model module, its weights and statistics."""
    import torch
    from safetensors.torch import save_file

    import sap_fast
    from sap_fast.cli.data import Preprocess, loader, open_data
    from sap_fast.experiments.clothing1m import write_tree

    name = f"c1m-train{train}-val{val}-test{test}-{size}px"
    root = os.path.join(folder, name)
    if not os.path.isfile(os.path.join(root, "generated.json")):
        os.makedirs(folder, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
        say(f"generating {train + val + test} JPEGs of {size}×{size} into {root} ...")
        info = write_tree(staging, noisy_train=train, clean_val=val, clean_test=test, image_size=size, seed=0)
        with open(os.path.join(staging, "generated.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in info.items() if k != "root"}, f, indent=1)
        os.rename(staging, root)
    with open(os.path.join(root, "generated.json"), encoding="utf-8") as f:
        info = json.load(f)
    model_dir = os.path.join(folder, "model")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "sweep_cnn.py"), "w", encoding="utf-8") as f:
        f.write(NETWORK)
    namespace = {}
    exec(NETWORK, namespace)
    model = namespace["make"]().eval()
    weights = os.path.join(model_dir, "weights.safetensors")
    save_file(model.state_dict(), weights)
    stats_path = os.path.join(root, "stats.pt")
    if not os.path.isfile(stats_path):
        data = open_data(f"clothing1m:{root}", Preprocess.from_args(preset="imagenet"))
        sap_fast.collect_stats(model, loader(data, batch_size=64), show_progress=False).save(stats_path)
    jpeg_bytes = 0
    for folder_path, _, names in os.walk(os.path.join(root, "images")):  # into the page cache
        for n in names:
            with open(os.path.join(folder_path, n), "rb") as f:
                jpeg_bytes += len(f.read())
    return {"root": root, "model_dir": model_dir, "weights": weights, "stats": stats_path,
            "generated": info, "jpeg_bytes": jpeg_bytes, "torch": torch.__version__}


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def run_once(prep: dict, mode: str, workers: int, out: str) -> dict:
    command = [sys.executable, "-m", "sap_fast", "correct", "--model", "sweep_cnn:make", "--weights", prep["weights"],
               "--stats-in", prep["stats"], "--val", f"clothing1m:{prep['root']}:clean_val",
               "--test", f"clothing1m:{prep['root']}:clean_test", "--preset", "imagenet",
               "--workers", str(workers), "--eval-cache", mode, "--out", out, "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([prep["model_dir"], REPO, os.environ.get("PYTHONPATH", "")]))
    logs = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=logs, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            for k, v in _status(proc.pid).items():
                peaks[k] = max(peaks[k], v)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, status = os.waitpid(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    thread.join()
    logs.seek(0)
    stderr = logs.read()
    row = {"mode": mode, "workers": workers, "returncode": proc.returncode, "wall_seconds": wall,
           "command": command,
           "peak_rss_mib": peaks["VmHWM"] / 1024, "peak_anon_mib": peaks["RssAnon"] / 1024,
           "peak_file_mib": peaks["RssFile"] / 1024}
    if proc.returncode != 0:
        row["error"] = (stderr.strip().splitlines() or ["?"])[-1]
        return row
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    seconds = report["extra"]["seconds"]
    row.update(sweep_seconds=seconds["alpha"], validation_seconds=seconds["validation"], test_seconds=seconds["test"],
               eval_cache=report["extra"]["eval_cache"], alpha=report["alpha"],
               result={"sweep": report["sweep"], "test": report["test_accuracy"]})
    return row


def weights_equal(a: str, b: str) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(os.path.join(p, "corrected.safetensors")) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--train", type=int, default=300, help="training images (only for the statistics)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--trees", default=os.path.join(REPO, "build", "sweep-trees"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "sweep-cache-cpu.jsonl"))
    parser.add_argument("--plot", help="the PNG (default: --out with .png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from sap_fast.cli.decoded import default_budget_gib

    prep = prepare(args.trees, args.val, args.test, args.image_size, args.train)
    per_image = 3 * 224 * 224
    budget = default_budget_gib() * 2 ** 30
    say(f"tree: {prep['root']} ({args.val} val + {args.test} test JPEGs, {prep['jpeg_bytes'] / 2 ** 20:.0f} MiB of "
        f"JPEG in all); default budget {budget / 2 ** 30:.1f} GiB = {int(budget // per_image)} decoded 224×224 images")
    crossover = int(budget // per_image)
    say(f"--eval-cache auto keeps the validation and test splits in memory up to {crossover} decoded images "
        f"together, in a mapped file above")
    rows, outs = [], {}
    scratch = tempfile.mkdtemp(prefix="sweep-cache-")
    modes = args.modes.split(",")
    bar = _bar(len(modes), not args.no_progress)
    try:
        for mode in modes:
            out = os.path.join(scratch, f"out-{mode}")
            bar.set_postfix_str(f"--eval-cache {mode}")
            say(f"--eval-cache {mode}, --workers {args.workers} ...", bar)
            row = run_once(prep, mode, args.workers, out)
            rows.append(row)
            outs[mode] = out
            bar.update()
            if "error" in row:
                say(f"  error: {row['error']}", bar)
                continue
            say(f"  {row['wall_seconds']:.1f} s wall, sweep {row['sweep_seconds']:.1f} s, test {row['test_seconds']:.1f} s, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB (anonymous {row['peak_anon_mib']:.0f}, "
                f"file-backed {row['peak_file_mib']:.0f})", bar)
        bar.close()
        reference = next((r for r in rows if r["mode"] == "off" and "error" not in r), None)
        for row in rows:
            if reference is not None and "error" not in row:
                row["identical_to_off"] = row["result"] == reference["result"] and \
                    weights_equal(outs[row["mode"]], outs["off"])
                row["speedup_vs_off"] = reference["wall_seconds"] / row["wall_seconds"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = ["| --eval-cache | kept in | wall | sweep (12 val passes) | test (12 passes) | × vs off (wall) | "
             "peak RSS | anonymous | file-backed | same result as off |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error']} |||||||||")
            continue
        kept = ", ".join(sorted({v["where"] for v in r["eval_cache"].values()})) or "not kept"
        lines.append(f"| {r['mode']} | {kept} | {r['wall_seconds']:.1f} s | {r['sweep_seconds']:.1f} s | "
                     f"{r['test_seconds']:.1f} s | {r.get('speedup_vs_off', float('nan')):.2f}× | "
                     f"{r['peak_rss_mib']:.0f} MiB | {r['peak_anon_mib']:.0f} MiB | {r['peak_file_mib']:.0f} MiB | "
                     f"{'yes' if r.get('identical_to_off') else ('—' if r['mode'] == 'off' else 'NO')} |")
    table = "\n".join(lines)
    say(table)
    png = plot(rows, args.plot or os.path.splitext(args.out)[0] + ".png",
               f"{args.val} validation + {args.test} test JPEGs, {args.image_size}×{args.image_size}, "
               f"--preset imagenet, --workers {args.workers} (CPU, {os.cpu_count()} cores)")
    if png:
        say(f"wrote {png}")
    for r in rows:
        r.pop("result", None)
    write_results(args.out, {"rows": rows, "markdown": table, "tree": {k: prep[k] for k in ("generated", "jpeg_bytes")},
                             "settings": {"val": args.val, "test": args.test, "image_size": args.image_size,
                                          "workers": args.workers, "preset": "imagenet",
                                          "default_budget_gib": budget / 2 ** 30,
                                          "decoded_bytes_per_image": per_image,
                                          "auto_in_memory_up_to_images": crossover}},
                  load_average_at_start=list(os.getloadavg()))
    return 0 if all("error" not in r and r.get("identical_to_off", r["mode"] == "off") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
