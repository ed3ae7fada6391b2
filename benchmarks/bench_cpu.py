"""CPU benchmark: sap_fast's portable path against the slow reference (materialized R, SVD).

Each (case, implementation) runs in a fresh subprocess so its peak resident memory is its own.
Prints a table (time, peak memory, and their ratios) and writes its records (JSON lines, benchmarks/common.py).

    python benchmarks/bench_cpu.py [--quick] [--out benchmarks/results/cpu-vs-reference.jsonl]

Cases: a ResNet-shaped 3×3 stage and a ViT-shaped token MLP (reduced resolution, so the
reference fits), and the two "wide, short" classifier layers — ResNet-50's (2048 wide, 1000 rows)
and VGG's ImageNet classifier (25088 wide; out_features cut to 512 so the reference's d × d Wp
product stays within minutes). Times are one run each after a warm-up on a tiny model; on a shared 2-core
machine expect ±10%.
"""
from __future__ import annotations

import argparse
import os

from common import run_worker, write_results

CASES = {
    # name: (model builder source, input shape, samples, description)
    "resnet-stage-3x3": ("nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), "
                         "nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 14))",
                         (64, 28, 28), 64, "two 3×3 convs 64→64 at 28×28 (d=576, 50k rows) + head"),
    "vit-mlp-tokens": ("nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384))",
                       (197, 384), 32, "ViT-shaped MLP on 32×197 tokens (d=384, 1536)"),
    "resnet50-classifier": ("nn.Sequential(nn.Linear(2048, 14))", (2048,), 1000,
                            "Linear 2048→14, 1000 rows (fewer rows than width)"),
    "vgg-classifier": ("nn.Sequential(nn.Linear(25088, 512))", (25088,), 1000,
                       "Linear 25088→512, 1000 rows (fewer rows than width)"),
}

WORKER = r"""
import json, resource, sys, time, torch
from torch import nn
import sap_fast
from sap_fast import reference
torch.manual_seed(0)
torch.set_num_threads({threads})
model = {builder}
x = torch.randn({samples}, *{shape}).relu()
impl = "{impl}"
def run():
    if impl == "sap_fast":
        return sap_fast.correct(model, x, alpha=3e4, batch_size=32)
    return reference.correct(model, x, alpha=3e4)
# warm up (imports, kernels) on a tiny model: ru_maxrss is a lifetime peak, so warming up on the
# case itself would hide its peak in the baseline (the reference's d x d Wp, for one)
tiny = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 2))
(sap_fast.correct if impl == "sap_fast" else reference.correct)(tiny, torch.randn(3, 2, 4, 4), alpha=3e4)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); out = run(); t = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
w = [p.detach().double() for p in out.parameters()]
print(json.dumps({{"seconds": t, "peak_mb": peak / 1024, "extra_mb": (peak - base) / 1024,
                  "checksum": float(sum(p.square().sum() for p in w))}}))
"""


def run_case(name: str, impl: str, threads: int) -> dict:
    builder, shape, samples, _ = CASES[name]
    return run_worker(WORKER.format(threads=threads, builder=builder, samples=samples, shape=shape, impl=impl))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 25088-wide case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-vs-reference.jsonl"))
    args = parser.parse_args()
    names = [n for n in CASES if not (args.quick and n == "vgg-classifier")]
    rows = []
    for name in names:
        fast = run_case(name, "sap_fast", args.threads)
        ref = run_case(name, "reference", args.threads)
        rows.append({"case": name, "description": CASES[name][3], "sap_fast": fast, "reference": ref})
        ok = "error" not in fast and "error" not in ref
        speed = ref["seconds"] / fast["seconds"] if ok else float("nan")
        mem = ref["extra_mb"] / max(fast["extra_mb"], 1.0) if ok else float("nan")
        rows[-1].update(speedup=speed, memory_ratio=mem)
        print(f"{name:22s} sap_fast {fast.get('seconds', float('nan')):7.2f}s {fast.get('extra_mb', float('nan')):8.0f} MB | "
              f"reference {ref.get('seconds', float('nan')):7.2f}s {ref.get('extra_mb', float('nan')):8.0f} MB | "
              f"{speed:5.1f}x faster, {mem:5.1f}x less extra memory", flush=True)
    write_results(args.out, {"rows": rows}, threads=args.threads)


if __name__ == "__main__":
    main()
