"""CPU benchmark of the accumulate stage's Gram kernels on ResNet-50- and VGG-16-shaped convs.

    python benchmarks/bench_native_cpu.py [--quick] [--dtypes float64 float32]
                                          [--out benchmarks/results/cpu-native.jsonl]

For each conv layer shape, three ways to form the Gram RᵀR of its patch matrix:

* ``portable`` — what sap_fast does without the extension: chunks of ``Tensor.unfold`` rows
  (8M elements each) added with one GEMM per chunk;
* ``tiled``    — ``torch.ops.sap_fast.conv_gram``: C++ implicit im2col into small tiles (1M
  elements, gathered in parallel), one GEMM per tile;
* ``shift``    — ``torch.ops.sap_fast.conv_gram_shift`` (stride-1 convs only): the Gram from
  (2k−1)² shifted channel cross-correlations plus thin border corrections, split by samples as
  the dispatch does.

Each (layer, kernel, dtype) runs in a fresh process, so its peak resident memory is its own;
"extra memory" is the rise of peak RSS over the process after its input was made and a tiny
warm-up ran. The time is the better of two runs. Expect ±10% on a shared 2-core machine, more
when anything else runs. The results table (ratios against portable) goes to stdout, the records to JSON lines.
"""
from __future__ import annotations

import argparse
import os

from common import run_worker, write_results

# name: (in channels, image size, kernel, stride, padding, batch, description)
LAYERS = {
    "resnet50.conv1": (3, 224, 7, 2, 3, 2, "7×7/2, 3→64 at 224²"),
    "resnet50.layer1.conv1x1": (256, 56, 1, 1, 0, 4, "1×1, 256 at 56²"),
    "resnet50.layer1.conv3x3": (64, 56, 3, 1, 1, 4, "3×3, 64 at 56²"),
    "resnet50.layer2.0.conv3x3s2": (128, 56, 3, 2, 1, 4, "3×3/2, 128 at 56²"),
    "resnet50.layer2.conv3x3": (128, 28, 3, 1, 1, 8, "3×3, 128 at 28²"),
    "resnet50.layer3.conv3x3": (256, 14, 3, 1, 1, 16, "3×3, 256 at 14²"),
    "resnet50.layer4.conv3x3": (512, 7, 3, 1, 1, 32, "3×3, 512 at 7²"),
    "vgg16.conv1_2": (64, 224, 3, 1, 1, 1, "3×3, 64 at 224²"),
    "vgg16.conv2_2": (128, 112, 3, 1, 1, 1, "3×3, 128 at 112²"),
    "vgg16.conv3_3": (256, 56, 3, 1, 1, 2, "3×3, 256 at 56²"),
    "vgg16.conv4_3": (512, 28, 3, 1, 1, 2, "3×3, 512 at 28²"),
    "vgg16.conv5_3": (512, 14, 3, 1, 1, 4, "3×3, 512 at 14²"),
}
QUICK = ["resnet50.layer1.conv3x3", "resnet50.layer3.conv3x3", "resnet50.layer4.conv3x3",
         "vgg16.conv3_3"]
TINY = {  # --tiny: a smoke run of the whole script in seconds (numbers mean nothing)
    "tiny.conv3x3": (8, 12, 3, 1, 1, 2, "3×3, 8 at 12²"),
    "tiny.conv3x3s2": (8, 12, 3, 2, 1, 2, "3×3/2, 8 at 12²"),
}
LAYERS.update(TINY)
KERNELS = ("portable", "tiled", "shift")
MIN_MB = 5.0  # smallest peak-memory rise worth a ratio

WORKER = r"""
import json, resource, time, torch
from torch import nn
from sap_fast.accumulate import CHUNK_ELEMENTS, conv_row_chunks, kernel_call
from sap_fast.backends.gram import gram
from sap_fast.backends.info import backend_info
from sap_fast.backends.native import native
assert native() is not None, backend_info()["native"]["reason"]
torch.manual_seed(0)
torch.set_num_threads({threads})
c, size, k, stride, pad, batch = {layer}
dtype = getattr(torch, "{dtype}")
conv = nn.Conv2d(c, 64, k, stride=stride, padding=pad)
d = c * k * k

def portable(x):
    gram = torch.zeros(1, d, d, dtype=dtype)
    for chunk in conv_row_chunks(conv, x, 1, d, max(1, CHUNK_ELEMENTS // d), dtype):
        gram.baddbmm_(chunk.transpose(1, 2), chunk)
    return gram

def tiled(x):
    return torch.ops.sap_fast.conv_gram(x, [k, k], [stride] * 2, [pad] * 2, [1, 1], 1, dtype)

def shift(x):
    return gram(*kernel_call(conv, x, dtype), dtype, CHUNK_ELEMENTS)

run = {{"portable": portable, "tiled": tiled, "shift": shift}}["{kernel}"]
run(torch.randn(1, c, 2 * k + 1, 2 * k + 1))   # warm-up on a tiny input
x = torch.randn(batch, c, size, size).relu()    # post-ReLU activations, like a real layer input
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(2):
    t = time.perf_counter(); gram = run(x); times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": min(times), "extra_mb": (peak - base) / 1024,
                  "checksum": float(gram.double().sum()), "trace": float(gram.double().diagonal(0, 1, 2).sum())}}))
"""


# End to end: collect_stats on a ResNet-50 bottleneck stack (1×1, 3×3, 1×1 at 56², 256 channels
# in) and a VGG-16 block (two 3×3 at 56²), with the native dispatch vs SAP_FAST_BACKEND=portable.
E2E = {
    "resnet50.layer1-bottlenecks": ("nn.Sequential(*[nn.Sequential(nn.Conv2d(256, 64, 1), nn.ReLU(), "
                                    "nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 256, 1), "
                                    "nn.ReLU()) for _ in range(3)])", (256, 56, 56), 8),
    "vgg16.block3": ("nn.Sequential(nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), "
                     "nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1))",
                     (128, 56, 56), 4),
}
E2E_WORKER = r"""
import json, resource, time, torch
from torch import nn
import sap_fast
torch.manual_seed(0)
torch.set_num_threads({threads})
model = {builder}
x = torch.randn({batch}, *{shape}).relu()
sap_fast.collect_stats(nn.Sequential(nn.Conv2d(3, 2, 3, padding=1)), torch.randn(2, 3, 5, 5))  # warm-up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(2):
    t = time.perf_counter(); stats = sap_fast.collect_stats(model, x, batch_size={batch}); times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": min(times), "extra_mb": (peak - base) / 1024,
                  "accumulate_cpu": sap_fast.backend_info()["stages"]["accumulate"]["cpu"]}}))
"""


def run_e2e(name: str, backend: str, threads: int) -> dict:
    builder, shape, batch = E2E[name]
    code = E2E_WORKER.format(threads=threads, builder=builder, shape=shape, batch=batch)
    return run_worker(code, env=dict(os.environ, SAP_FAST_BACKEND=backend))


def run(layer: str, kernel: str, dtype: str, threads: int) -> dict:
    return run_worker(WORKER.format(threads=threads, layer=LAYERS[layer][:6], dtype=dtype, kernel=kernel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (and end to end)")
    parser.add_argument("--tiny", action="store_true", help="smoke run on tiny shapes, no end to end")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-native.jsonl"))
    args = parser.parse_args()
    rows = []
    print(f"{'layer':30s} {'dtype':8s} {'portable':>18s} {'tiled':>26s} {'shift':>26s}")
    layers = list(TINY) if args.tiny else QUICK if args.quick else [n for n in LAYERS if n not in TINY]
    for layer in layers:
        c, size, k, stride, pad, batch, what = LAYERS[layer]
        for dtype in args.dtypes:
            row = {"layer": layer, "what": what, "batch": batch, "d": c * k * k, "dtype": dtype}
            for kernel in KERNELS:
                if kernel == "shift" and (stride != 1 or k == 1):
                    continue  # stride-1 kernels with more than one tap only (the dispatch's rule)
                row[kernel] = run(layer, kernel, dtype, args.threads)
            base = row["portable"]
            cells = [f"{base.get('seconds', float('nan')):6.3f}s {base.get('extra_mb', float('nan')):6.0f}MB"]
            for kernel in KERNELS[1:]:
                r = row.get(kernel)
                if r is None or "error" in r or "error" in base:
                    cells.append(f"{'n/a' if r is None else 'error':>26s}")
                    continue
                r["speedup"] = base["seconds"] / r["seconds"]
                # RSS peaks below a few MB drown in allocator reuse: no ratio for those
                r["memory_ratio"] = (base["extra_mb"] / r["extra_mb"] if r["extra_mb"] >= MIN_MB
                                     else None)
                r["rel_diff"] = abs(r["trace"] - base["trace"]) / abs(base["trace"])
                ratio = "  n/a" if r["memory_ratio"] is None else f"×{r['memory_ratio']:4.1f}"
                cells.append(f"{r['seconds']:6.3f}s ×{r['speedup']:4.2f} {r['extra_mb']:5.0f}MB {ratio}")
            print(f"{layer:30s} {dtype:8s} " + " ".join(f"{cell:>18s}" if i == 0 else cell.rjust(26)
                                                      for i, cell in enumerate(cells)), flush=True)
            rows.append(row)
    e2e = []
    print(f"\ncollect_stats end to end (float64): {'portable':>18s} {'native dispatch':>26s}")
    for name in ([] if args.tiny else E2E):
        portable, native = run_e2e(name, "portable", args.threads), run_e2e(name, "auto", args.threads)
        row = {"model": name, "batch": E2E[name][2], "portable": portable, "native": native}
        if "error" not in portable and "error" not in native:
            row["speedup"] = portable["seconds"] / native["seconds"]
            print(f"{name:36s} {portable['seconds']:6.3f}s {portable['extra_mb']:6.0f}MB "
                  f"{native['seconds']:9.3f}s ×{row['speedup']:4.2f} {native['extra_mb']:5.0f}MB", flush=True)
        else:
            print(f"{name:36s} error: {portable.get('error') or native.get('error')}")
        e2e.append(row)
    write_results(args.out, {"rows": rows, "end_to_end": e2e}, threads=args.threads)


if __name__ == "__main__":
    main()
