"""The cupy backend on a GPU: the NVRTC build of the conv Gram kernel against the nvcc build, its
compile latency, and batched cuSOLVER against torch. Writes ``benchmarks/results/gpu-cupy-<device>.jsonl``.

Three measurements, each what a routing decision needs:

- ``gram``: every distinct conv of ResNet-50 (224×224, batch ``--batch``, inputs ReLU'd random
  activations), in fp64 and fp32 accumulation: the best of ``--repeats`` CUDA-event timings of
  ``torch.ops.sap_fast.conv_gram`` (the nvcc build, where sap_fast._C has CUDA kernels) and of
  ``sap_fast.backends.nvrtc.conv_gram`` (the NVRTC build), their ratio per layer and over the
  whole network, and ``equal``: bitwise equality of the two Grams (expected in fp64 where each
  tile has one row range). The NVRTC build is held to within 5% of the nvcc build overall.
- ``compile``: the first ``conv_gram`` call in a fresh process with an empty cupy kernel cache
  (``cold``: NVRTC + module load) and again with the cache that run filled (``cached``: module
  load only), each minus the same process's second call.
- ``linalg``: the batches of equal-size Grams that grouped convs give, float64 as the spectrum
  stage decomposes them: MobileNetV3-Large's depthwise convs (9×9 and 25×25 groups) and
  ConvNeXt-T's depthwise 7×7 (96 to 768 groups of 49×49). Per distinct (groups, n):
  ``torch.linalg.eigh`` and, for n ≤ 32, cuSOLVER ``syevjBatched`` through cupy (and the
  CMake-built eigh where built); ``torch.linalg.cholesky_ex`` and ``potrfBatched`` through cupy.
  ``cupy_wins`` marks a batch where cupy is faster than torch by more than 5%: the only place
  the batched calls should ever be routed to (they are opt-in, SAP_FAST_BATCHED_EIGH /
  SAP_FAST_BATCHED_CHOLESKY, until this says so).

    python benchmarks/gpu_cupy.py                 # the GPU run (a few minutes on an H100)
    python benchmarks/gpu_cupy.py --plan          # the layers and batches it would time (any machine)

Without a GPU, or without cupy, it says why and writes one record with ``skipped``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import sap_fast  # noqa: E402
from sap_fast.backends import batched_linalg, nvrtc  # noqa: E402
from sap_fast.backends.native import native_cuda  # noqa: E402
from common import run_worker, write_results  # noqa: E402
import zoo as bench_models  # noqa: E402

TIME_LIMIT = 1.05  # the NVRTC build may take at most 5% longer than the nvcc build, network-wide
WIN_MARGIN = 0.95  # a batched call "wins" when it takes under 95% of torch's time

# MobileNetV3-Large's inverted residual blocks: (expanded channels, depthwise kernel); each
# depthwise conv gives `expanded` Grams of n = kernel².
MOBILENET_V3_LARGE = [(16, 3), (64, 3), (72, 3), (72, 5), (120, 5), (120, 5), (240, 3), (200, 3),
                      (184, 3), (184, 3), (480, 3), (672, 3), (672, 5), (960, 5), (960, 5)]
# ConvNeXt-T: stage widths and depths, one depthwise 7×7 conv per block.
CONVNEXT_T = [(96, 3), (192, 3), (384, 9), (768, 3)]


def conv_layers(model: nn.Module, image_size: int):
    """Distinct conv calls of ``model`` (input shape without the batch, kernel, stride, padding,
    dilation, groups) and how often each occurs, from one forward on the meta device."""
    found = {}

    def hook(mod, args):
        x = args[0]
        key = (tuple(x.shape[1:]), tuple(mod.kernel_size), tuple(mod.stride), tuple(mod.padding),
               tuple(mod.dilation), mod.groups)
        found[key] = found.get(key, 0) + 1

    model = model.to("meta")
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    for h in handles:
        h.remove()
    return found


def linalg_batches():
    """Distinct (groups, n) of the grouped-conv Gram batches, and which network gives them."""
    batches = {}
    for groups, k in MOBILENET_V3_LARGE:
        batches.setdefault((groups, k * k), "mobilenet_v3_large")
    for width, _ in CONVNEXT_T:
        batches.setdefault((width, 49), "convnext_tiny")
    return batches


def best_time(fn, repeats: int) -> float:
    """Best of ``repeats`` CUDA-event timings of ``fn()`` (after one warm-up call), seconds."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def time_grams(args) -> dict:
    model = bench_models.build("resnet50", num_classes=14, device="meta")
    layers = conv_layers(model, args.image_size)
    rows, totals = [], {}
    have_nvcc = native_cuda()
    for (shape, k, s, p, d, groups), count in sorted(layers.items()):
        x = torch.randn(args.batch, *shape, device="cuda").relu_()
        call = (list(k), list(s), list(p), list(d), groups)
        for dtype in (torch.float64, torch.float32):
            row = {"input": [args.batch, *shape], "kernel": list(k), "stride": list(s), "groups": groups,
                   "count": count, "dtype": str(dtype).replace("torch.", "")}
            row["nvrtc_s"] = best_time(lambda: nvrtc.conv_gram(x, *call, dtype), args.repeats)
            if have_nvcc:
                row["nvcc_s"] = best_time(lambda: torch.ops.sap_fast.conv_gram(x, *call, dtype), args.repeats)
                row["ratio"] = row["nvrtc_s"] / row["nvcc_s"]
                row["equal"] = bool(torch.equal(nvrtc.conv_gram(x, *call, dtype),
                                                torch.ops.sap_fast.conv_gram(x, *call, dtype)))
            key = row["dtype"]
            totals.setdefault(key, {"nvrtc_s": 0.0, "nvcc_s": 0.0})
            totals[key]["nvrtc_s"] += count * row["nvrtc_s"]
            totals[key]["nvcc_s"] += count * row.get("nvcc_s", math.nan)
            rows.append(row)
    for total in totals.values():
        total["ratio"] = total["nvrtc_s"] / total["nvcc_s"]
        total["within_5_percent"] = bool(total["ratio"] <= TIME_LIMIT)
    return {"layers": rows, "network": totals, "nvcc_build": have_nvcc}


COMPILE_WORKER = r"""
import json, time, torch
from sap_fast.backends import nvrtc
x = torch.randn(8, 64, 28, 28, device="cuda")
def call():
    torch.cuda.synchronize(); t = time.perf_counter()
    nvrtc.conv_gram(x, [3, 3], [1, 1], [1, 1], [1, 1], 1, torch.float64)
    torch.cuda.synchronize(); return time.perf_counter() - t
first, second = call(), call()
print(json.dumps({"first_s": first, "second_s": second, "compile_s": first - second}))
"""


def time_compile() -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CUPY_CACHE_DIR=cache, PYTHONPATH=os.path.dirname(HERE))
        cold = run_worker(COMPILE_WORKER, env)
        cached = run_worker(COMPILE_WORKER, env)
    return {"cold": cold, "cached": cached}


def spd(batch: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(batch, n, 2 * n, generator=g, device="cuda", dtype=torch.float64)
    return a @ a.mT / n + 1e-3 * torch.eye(n, device="cuda", dtype=torch.float64)


def time_linalg(args) -> list:
    rows = []
    cupy_ok = batched_linalg.load()[0] is not None
    for (groups, n), source in sorted(linalg_batches().items(), key=lambda kv: (kv[0][1], kv[0][0])):
        gram = spd(groups, n, seed=n)
        m = gram / gram.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] * 1e3
        m.diagonal(dim1=-2, dim2=-1).add_(1.0)  # (α − 1) G/trG + I, as the solve route factors
        row = {"source": source, "groups": groups, "n": n}
        row["torch_eigh_s"] = best_time(lambda: torch.linalg.eigh(gram), args.repeats)
        if native_cuda():
            row["native_eigh_s"] = best_time(lambda: torch.ops.sap_fast.eigh(gram), args.repeats)
        if cupy_ok and n <= batched_linalg.MAX_JACOBI_SIZE:
            row["cupy_syevj_s"] = best_time(lambda: batched_linalg.eigh(gram), args.repeats)
            values, _ = batched_linalg.eigh(gram)
            row["syevj_eigval_rel_err"] = float((values - torch.linalg.eigh(gram)[0]).abs().max()
                                                / torch.linalg.eigvalsh(gram).abs().max())
            row["cupy_eigh_wins"] = bool(row["cupy_syevj_s"] < WIN_MARGIN * row["torch_eigh_s"])
        row["torch_cholesky_s"] = best_time(lambda: torch.linalg.cholesky_ex(m), args.repeats)
        if cupy_ok:
            row["cupy_potrf_s"] = best_time(lambda: batched_linalg.cholesky_ex(m), args.repeats)
            factor, _ = batched_linalg.cholesky_ex(m)
            want, _ = torch.linalg.cholesky_ex(m)
            row["potrf_rel_err"] = float((factor - want).norm() / want.norm())
            row["cupy_cholesky_wins"] = bool(row["cupy_potrf_s"] < WIN_MARGIN * row["torch_cholesky_s"])
        rows.append(row)
    return rows


def plan(args) -> dict:
    layers = conv_layers(bench_models.build("resnet50", num_classes=14, device="meta"), args.image_size)
    return {"resnet50_convs": [{"input": [args.batch, *shape], "kernel": list(k), "stride": list(s),
                                "groups": g, "count": c} for (shape, k, s, p, d, g), c in sorted(layers.items())],
            "linalg_batches": [{"groups": g, "n": n, "source": src} for (g, n), src in sorted(linalg_batches().items())]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default="gram,compile,linalg")
    parser.add_argument("--plan", action="store_true", help="list the layers and batches; time nothing")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.plan:
        p = plan(args)
        print(f"{len(p['resnet50_convs'])} distinct ResNet-50 convs, {len(p['linalg_batches'])} Gram batches")
        for b in p["linalg_batches"]:
            print(f"  {b['source']}: {b['groups']} × {b['n']}×{b['n']}")
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slug = device.replace(" ", "-").replace("/", "-")
    out = args.out or os.path.join(HERE, "results", f"gpu-cupy-{slug}.jsonl")
    cp, why = nvrtc.load()
    if not torch.cuda.is_available() or cp is None:
        why = why if torch.cuda.is_available() else "no CUDA device"
        print(f"gpu_cupy: skipped: {why}")
        write_results(out, {"device": device, "skipped": why}, backend=sap_fast.backend_info())
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    results = {"device": device}
    if "compile" in parts:
        results["compile"] = time_compile()
        print("compile:", results["compile"], flush=True)
    if "gram" in parts:
        results["gram"] = time_grams(args)
        for dtype, total in results["gram"]["network"].items():
            print(f"gram {dtype}: NVRTC / nvcc over ResNet-50 = {total['ratio']:.3f} "
                  f"({'within' if total['within_5_percent'] else 'NOT within'} 5%)", flush=True)
    if "linalg" in parts:
        results["linalg"] = time_linalg(args)
        for row in results["linalg"]:
            times = ", ".join(f"{k[:-2]} {v * 1e3:.3f} ms" for k, v in row.items() if k.endswith("_s"))
            print(f"{row['source']} {row['groups']}×{row['n']}²: {times}", flush=True)
    write_results(out, results, backend=sap_fast.backend_info(), cuda=torch.version.cuda, cupy=cp.__version__,
                  nvrtc=nvrtc.nvrtc_version())
    return 0


if __name__ == "__main__":
    sys.exit(main())
