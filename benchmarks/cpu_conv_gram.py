"""CPU: the C++ implicit-im2col conv Gram (``torch.ops.sap_fast.conv_gram``) against what the
statistics pass runs for the same call, on the convs the shift kernel does not serve.

    python benchmarks/cpu_conv_gram.py [--runs 5] [--threads 2] [--tiny]
                                       [--out benchmarks/results/cpu-conv-gram.jsonl]

The portable path streams ``Tensor.unfold`` rows in chunks of 8M elements, one GEMM each
(``sap_fast.accumulate``'s ``conv_row_chunks`` and ``LayerStats.add``); ``conv_gram`` gathers
rows tile by tile (1M elements) and never holds the unfolded chunk. These results set the gram
stage's CPU rule (``sap_fast/backends/gram.py``, implementation ``direct``): strided convs with a
kernel larger than 1 go to ``conv_gram``, 1×1 convs stream rows. Both form the float64 Gram of float32 post-ReLU
inputs, in one process, alternating, the best of ``--runs`` runs each. Peak memory: the rise of
the process's peak resident set over its resident set before the call (``VmHWM`` reset through
``/proc/self/clear_refs``; freed memory handed back with ``malloc_trim`` before each call and
large blocks served by ``mmap``, so one call's peak is its own). Ratios are portable ÷ conv_gram:
above 1, conv_gram is faster (or smaller). The machine's load average before and after goes
into the results: on shared cores the times spread by ±10% or more, the memory does not.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import time

import torch
from torch import nn

from common import write_results

# name: (in channels, image size, kernel, stride, padding, batch)
SHAPES = {
    "conv1 7x7/2 3ch 224": (3, 224, 7, 2, 3, 2),
    "3x3/2 64ch 112": (64, 112, 3, 2, 1, 2),
    "3x3/2 128ch 56": (128, 56, 3, 2, 1, 4),
    "3x3/2 256ch 28": (256, 28, 3, 2, 1, 8),
    "3x3/2 512ch 14": (512, 14, 3, 2, 1, 16),
    "1x1/1 64ch 56": (64, 56, 1, 1, 0, 4),
    "1x1/1 256ch 56": (256, 56, 1, 1, 0, 4),
    "1x1/1 128ch 28": (128, 28, 1, 1, 0, 8),
    "1x1/2 256ch 56": (256, 56, 1, 2, 0, 4),
    "1x1/2 512ch 28": (512, 28, 1, 2, 0, 8),
}
TINY = {"tiny 3x3/2": (4, 12, 3, 2, 1, 2), "tiny 1x1/1": (8, 10, 1, 1, 0, 2)}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measured(fn, x):
    """(seconds, extra MB of peak RSS, Gram) of one call."""
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _rss_kb("VmRSS:")
    started = time.perf_counter()
    g = fn(x)
    seconds = time.perf_counter() - started
    return seconds, (_rss_kb("VmHWM:") - base) / 1024, g


def kernels(c, k, stride, pad):
    from sap_fast.accumulate import CHUNK_ELEMENTS, conv_row_chunks
    from sap_fast.stats import LayerStats

    conv = nn.Conv2d(c, 8, k, stride=stride, padding=pad)
    d = c * k * k

    def portable(x):
        record = LayerStats(d, 1, torch.float64, x.device)
        for chunk in conv_row_chunks(conv, x, 1, d, max(1, CHUNK_ELEMENTS // d), torch.float64):
            record.add(chunk)
        return record.gram

    def conv_gram(x):
        return torch.ops.sap_fast.conv_gram(x, [k, k], [stride] * 2, [pad] * 2, [1, 1], 1, torch.float64)

    return {"portable": portable, "conv_gram": conv_gram}


#: the numbers of a row that name its case (parameters), not measurements
SHAPE_KEYS = ("in_channels", "size", "kernel", "stride", "padding", "batch", "d", "rows", "threads", "runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="smoke run on tiny shapes (numbers mean nothing)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-conv-gram.jsonl"))
    args = parser.parse_args()
    from sap_fast.backends.native import native

    assert native() is not None, "sap_fast._C is not built"
    torch.set_num_threads(args.threads)
    _libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed: large blocks mmapped, unmapped when freed
    rows = []
    load_before = os.getloadavg()[0]
    print(f"{'conv':22s} {'d':>5s} {'portable':>16s} {'conv_gram':>16s} {'time ×':>7s} {'memory ×':>8s}")
    for name, (c, size, k, stride, pad, batch) in (TINY if args.tiny else SHAPES).items():
        torch.manual_seed(0)
        x = torch.randn(batch, c, size, size).relu()
        fns = kernels(c, k, stride, pad)
        for fn in fns.values():  # warm-up
            fn(x[:1, :, :2 * k + 1, :2 * k + 1].contiguous())
        best = {n: (float("inf"), float("inf")) for n in fns}
        grams = {}
        for _ in range(args.runs):
            for n, fn in fns.items():
                seconds, mb, grams[n] = measured(fn, x)
                best[n] = (min(best[n][0], seconds), min(best[n][1], mb))
        want, got = grams["portable"], grams["conv_gram"]
        row = {"conv": name, "in_channels": c, "size": size, "kernel": k, "stride": stride, "padding": pad,
               "batch": batch, "d": c * k * k, "rows": int(batch * ((size + 2 * pad - k) // stride + 1) ** 2),
               "portable": {"seconds": best["portable"][0], "extra_mb": best["portable"][1]},
               "conv_gram": {"seconds": best["conv_gram"][0], "extra_mb": best["conv_gram"][1]},
               "time_ratio": best["portable"][0] / best["conv_gram"][0],
               "memory_ratio": best["portable"][1] / max(best["conv_gram"][1], 1e-3),
               "max_rel_diff": float((got - want).abs().max() / want.abs().max())}
        print(f"{name:22s} {row['d']:5d} {best['portable'][0]:7.4f}s {best['portable'][1]:6.1f}MB "
              f"{best['conv_gram'][0]:7.4f}s {best['conv_gram'][1]:6.1f}MB {row['time_ratio']:7.2f} "
              f"{row['memory_ratio']:8.2f}", flush=True)
        rows.append(row)
    write_results(args.out, {"rows": rows}, keys=SHAPE_KEYS, threads=args.threads, runs=args.runs,
                  dtype="float64 Gram of float32 inputs",
                  load_average=[load_before, os.getloadavg()[0]])  # 1-min load: before, after


if __name__ == "__main__":
    main()
