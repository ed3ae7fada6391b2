"""Gram accumulation on the GPU: time, floor, official approach, peak memory and Wp error, per
model and precision. Writes ``benchmarks/results/gpu-gram-<device>.jsonl``; the floors it is compared
with, and the published rates they assume, are in docs/cost-census.md.

For each model (ResNet-50 and ViT-B/16 at 224×224, 14 classes, random weights; torchvision's
when it imports, else benchmarks/zoo.py's identical layout) and N trusted samples already on
the device, batch B:

- ``forward``: the batched forward pass alone (what collect_stats must run anyway);
- per precision mode, ``collect_stats`` (CUDA events); ``gram`` = its time − ``forward`` (each
  the best of ``--repeats`` runs);
- ``floor`` = the multiply-adds the Gram must do ÷ the matrix rate of that precision, measured
  here with one large GEMM of that precision (``rate_tflops``). Two floors: ``floor_sym`` (upper
  triangle only) and ``floor_shift`` (also the shift-correlation form for stride-1 k×k convs,
  ((2kh−1)(2kw−1)+1)/2 C×C correlations instead of d(d+1)/2 products per position; the floor
  the Gram time is judged by). ``ratio`` = gram / floor_shift;
- ``peak_extra_MB``: peak allocated during collect_stats − peak of the forward pass alone, next
  to ``grams_MB`` (the Grams it returns) and ``chunk_MB`` (one accumulation chunk);
- ``wp_error``: ‖Wp(mode) − Wp(oracle)‖_F / ‖Wp(oracle)‖_F, max and median over layers, at α ∈
  {1e3, 3e4, 1e6}; Wp = α G̃ ((α−1)G̃ + I)⁻¹ in float64 from each mode's Gram. The oracle is
  the fp64 mode (exact products of the fp32 activations, float64 sums), which the test suite
  holds to the materialised-R float64 SVD to 1e-8 (tests/core/test_vs_reference.py,
  tests/backends/test_cuda_ops.py);
- ``official``: benchmarks/official.py (rows through the CPU, 50 000 per layer, float32 SVD):
  its gather + SVD time, the stage the Gram (+ spectra) replaces; ``speedup`` = that / gram.

Modes: fp64 (default: float64 accumulation), fp32 (float32 accumulation), tf32 (TF32 tensor
cores, float32 accumulation), bf16 (bf16 inputs, float32 accumulation); fp64 and fp32 convs run
the CUDA kernel (linear layers cuBLAS), and again the Triton kernels for convs and linear layers
as fp64-triton / fp32-triton (tf32 and bf16 exist only in Triton). ViT-B/16's Gram is 84% linear
layers, where Triton's upper triangle halves cuBLAS's full product. fp64-shift / fp32-shift take
stride-1 convs through the shift-correlation form in cuDNN weight-gradient calls
(sap_fast/backends/shift.py) where it does fewer multiply-adds, the rest as in fp64 / fp32. cuDNN/cuBLAS TF32 is off
in the forward pass (torch.backends.*.allow_tf32 = False) so every mode sees the same fp32
activations.

    python benchmarks/gpu_gram.py                       # the GPU run (about 3-6 min on an H100)
    python benchmarks/gpu_gram.py --tiny --device cpu   # a seconds-long smoke run of the plumbing
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import sap_fast  # noqa: E402
from sap_fast import accumulate  # noqa: E402
from common import Deadline, JsonLines, add_lease_arguments, verdict, write_results  # noqa: E402
import zoo as bench_models  # noqa: E402
from zoo import shift_macs  # noqa: E402

# the results' nesting (benchmarks/common.flatten): a model's entries, and each mode's within them
KEYED = {"results": "model", "modes": "mode"}
MODES = {
    "fp64": dict(dtype=torch.float64, input_precision="fp32"),
    "fp32": dict(dtype=torch.float32, input_precision="fp32"),
    "tf32": dict(dtype=torch.float32, input_precision="tf32"),
    "bf16": dict(dtype=torch.float32, input_precision="bf16"),
}
# the same modes with the Triton conv kernel instead of the CUDA one (SAP_FAST_GRAM_KERNEL)
KERNELS = {"fp64-triton": ("fp64", "triton"), "fp32-triton": ("fp32", "triton"),
           "fp64-shift": ("fp64", "shift"), "fp32-shift": ("fp32", "shift"),
           "fp64-fma": ("fp64", "cuda")}
# fp64-fma: the CUDA kernel's FMA tiles on a GPU that has FP64 tensor cores (SAP_FAST_GRAM_DMMA=0),
# against which "fp64" (its DMMA tiles there) is timed
DMMA_SWITCH = {"fp64-fma": "0"}
GEMM_DTYPES = {"fp64": (torch.float64, False), "fp32": (torch.float32, False),
               "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False)}


def mode_settings(mode: str) -> tuple:
    """(collect_stats keyword arguments, SAP_FAST_GRAM_KERNEL value, GEMM precision)."""
    base, kernel = KERNELS.get(mode, (mode, "auto"))
    os.environ["SAP_FAST_GRAM_DMMA"] = DMMA_SWITCH.get(mode, "auto")
    if base in ("tf32", "bf16"):  # only Triton serves them on a GPU; named, the interpreter does on CPU
        kernel = "triton"
    return MODES[base], kernel, base
ALPHAS = (1e3, 3e4, 1e6)
WP_LIMIT = 1e-4  # the default mode must keep Wp within this relative error


class Timer:
    """Wall time of a block: CUDA events on a GPU (no host sync inside), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def matrix_rate(mode: str, device: torch.device, n: int) -> float:
    """FLOP/s of one n×n×n GEMM in the mode's precision (best of 3, after a warm-up)."""
    dtype, tf32 = GEMM_DTYPES[mode]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        best = math.inf
        for _ in range(3):
            with Timer(device) as t:
                a @ b
            best = min(best, t.seconds)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n ** 3 / best


def wp_matrices(stats, alpha: float, max_d=None) -> dict:
    """Wp = α G̃ ((α−1)G̃ + I)⁻¹ per record (width ≤ ``max_d``), float64, by Cholesky (the same
    matrix as U diag(λ) Uᵀ)."""
    out = {}
    for name in stats:
        if max_d is not None and stats[name].d > max_d:
            continue
        g = stats[name].gram.double()
        g = (g + g.transpose(-1, -2)) / 2
        g = g / g.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)[:, None, None]
        m = g * (alpha - 1)
        m.diagonal(dim1=-2, dim2=-1).add_(1)
        out[name] = alpha * torch.cholesky_solve(g, torch.linalg.cholesky(m))
    return out


def wp_errors(stats, oracle, alphas, max_d=None) -> dict:
    errors = {}
    for alpha in alphas:
        got, want = wp_matrices(stats, alpha, max_d), wp_matrices(oracle, alpha, max_d)
        per = [float((got[n] - want[n]).norm() / want[n].norm()) for n in want]
        if not per:  # no layer within max_d
            return {}
        errors[f"{alpha:g}"] = {"max": max(per), "median": statistics.median(per)}
        del got, want
    return errors


def forward_only(model, x, batch: int, device, repeats: int) -> tuple:
    """(best seconds, peak bytes) of the batched forward pass alone."""
    best = math.inf
    with torch.no_grad():
        model(x[:batch])  # warm-up (cuDNN algorithm choice, lazy init)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            with Timer(device) as t:
                for start in range(0, x.shape[0], batch):
                    model(x[start:start + batch])
            best = min(best, t.seconds)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return best, peak


FLOOR_LIMIT = 1.5      # a mode's Gram time may be at most this multiple of its floor (shift form)
ORACLE_LIMIT = 1e-10   # fp64 Grams on the GPU against the float64 materialised-R oracle (relative)
OFFICIAL_SPEEDUP = 50  # the Gram must beat the official approach's gather + SVD by this much


def oracle_error(model, x, mode: str) -> float:
    """max over layers of ‖G − RᵀR‖_F / ‖RᵀR‖_F: ``mode``'s Gram (its kernels, on ``x``'s device)
    against the Grams of sap_fast.reference's materialised float64 R. Both run a float64 copy
    of the model on float64 inputs, so they see the same activations at every layer and only
    the kernels' summation order differs."""
    from sap_fast import reference
    kwargs, kernel, _ = mode_settings(mode)
    os.environ["SAP_FAST_GRAM_KERNEL"] = kernel
    model64, x64 = copy.deepcopy(model).double(), x.double()
    stats = sap_fast.collect_stats(model64, x64, batch_size=x.shape[0], show_progress=False, **kwargs)
    worst = 0.0
    for name, groups in reference.representations(model64, x64).items():
        g = stats[name].gram.double()
        want = torch.stack([r.T @ r for r in groups]).to(g.device)
        worst = max(worst, float((g - want).norm() / want.norm().clamp_min(1e-300)))
        del want
    return worst


def run_model(name: str, args, device: torch.device, rates: dict, log, deadline) -> dict:
    """One model: every mode's row written to ``log`` (benchmarks/common.JsonLines) as soon as
    it is measured, then the oracle checks and the official approach (capped by time)."""
    torch.manual_seed(0)
    model = bench_models.build(name, num_classes=14, device=device, image_size=args.image_size).eval()
    census = bench_models.census(model, args.image_size)
    x = torch.randn(args.samples, 3, args.image_size, args.image_size, device=device).relu_()
    fwd_seconds, fwd_peak = forward_only(model, x, args.batch, device, args.repeats)
    distinct = census.distinct()
    sym = sum(layer.sym_macs for layer in distinct) * args.samples
    shift = sum(shift_macs(model, layer) for layer in distinct) * args.samples
    out = {"source": model.bench_source, "samples": args.samples, "batch": args.batch,
           "image_size": args.image_size, "forward_s": fwd_seconds,
           "gram_tflop_sym": 2 * sym / 1e12, "gram_tflop_shift": 2 * shift / 1e12, "modes": {}, "skipped": []}
    log.write({"kind": "model", "model": name, **{k: v for k, v in out.items() if k not in ("modes", "skipped")}})
    oracle = None
    last_s = 0.0
    for mode in args.modes:
        # a mode costs a warm-up and `repeats` timed runs; the previous one's time is the guess
        if not deadline.allows(2 * (args.repeats + 1) * last_s + 10):
            out["skipped"].append(mode)
            log.write({"kind": "skipped", "model": name, "mode": mode, "reason": "out of time"})
            continue
        kwargs, kernel, base = mode_settings(mode)
        os.environ["SAP_FAST_GRAM_KERNEL"] = kernel
        sap_fast.collect_stats(model, x[:args.batch], batch_size=args.batch, show_progress=False, **kwargs)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        best = math.inf
        for _ in range(args.repeats):  # best of a few: the Gram time is a difference of two times
            stats = None
            with Timer(device) as t:
                stats = sap_fast.collect_stats(model, x, batch_size=args.batch, show_progress=False, **kwargs)
            best = min(best, t.seconds)
        last_s = best
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        grams = sum(stats[n].gram.numel() * stats[n].dtype.itemsize
                    for n in {id(stats[k]): k for k in stats}.values())
        gram_s = max(best - fwd_seconds, 1e-9)
        row = {"collect_s": best, "gram_s": gram_s,
               "floor_sym_s": 2 * sym / rates[base], "floor_shift_s": 2 * shift / rates[base],
               "grams_MB": grams / 1e6, "chunk_MB": accumulate.CHUNK_ELEMENTS * kwargs["dtype"].itemsize / 1e6,
               "peak_extra_MB": max(0, peak - fwd_peak) / 1e6 if device.type == "cuda" else None,
               "gram_kernel_choice": kernel}
        row["ratio"] = gram_s / row["floor_shift_s"]
        if mode == "fp64":
            oracle = stats
            row["wp_error"] = {f"{a:g}": {"max": 0.0, "median": 0.0} for a in ALPHAS}
        elif oracle is not None:
            row["wp_error"] = wp_errors(stats, oracle, ALPHAS, args.wp_max_d)
        row["verdicts"] = {"gram_vs_floor": verdict(row["ratio"], FLOOR_LIMIT)}
        out["modes"][mode] = row
        log.write({"kind": "mode", "model": name, "mode": mode, **row})
        if mode != "fp64":
            del stats
    os.environ["SAP_FAST_GRAM_KERNEL"] = "auto"
    del oracle
    # the fp64 modes on the GPU against the float64 oracle, on a few samples
    out["oracle"] = {}
    for mode in [m for m in out["modes"] if mode_settings(m)[2] == "fp64"]:
        if not deadline.allows(30):
            log.write({"kind": "skipped", "model": name, "check": "oracle", "mode": mode, "reason": "out of time"})
            continue
        err = oracle_error(model, x[:args.oracle_samples], mode)
        out["oracle"][mode] = {"max_rel_err": err, "verdict": verdict(err, ORACLE_LIMIT)}
        log.write({"kind": "oracle", "model": name, "mode": mode, "samples": args.oracle_samples,
                   **out["oracle"][mode]})
    os.environ["SAP_FAST_GRAM_KERNEL"] = "auto"
    if args.official:
        limit = min(args.official_seconds, max(0.0, deadline.left() - 20))
        if limit <= 0:
            log.write({"kind": "skipped", "model": name, "check": "official", "reason": "out of time"})
        else:
            from official import official_correct
            res = official_correct(model, x, [3e4], max_samples=args.official_rows, max_batch_size=args.batch,
                                   on_model=lambda alpha, corrected: None, time_limit=limit)
            official_s = res.stage_times["gather"] + res.stage_times["svd"]
            out["official"] = {"gather_s": res.stage_times["gather"], "svd_s": res.stage_times["svd"],
                               "max_rows": args.official_rows, "time_cap_s": limit, "capped": res.capped,
                               "progress": res.progress}
            for mode, row in out["modes"].items():
                row["speedup_vs_official"] = official_s / row["gram_s"]
                row["verdicts"]["speedup_vs_official"] = verdict(row["speedup_vs_official"], OFFICIAL_SPEEDUP,
                                                                 at_most=False, bound=res.capped)
            log.write({"kind": "official", "model": name, **out["official"],
                       "speedup_vs_official": {m: r["verdicts"]["speedup_vs_official"]
                                               for m, r in out["modes"].items()}})
    out["default_mode"] = choose_default(out["modes"])
    return out


def choose_default(modes: dict) -> str:
    """The fastest mode whose Wp error stays within WP_LIMIT at every α (fp64 always qualifies)."""
    ok = [m for m, row in modes.items() if all(e["max"] <= WP_LIMIT for e in row.get("wp_error", {}).values())]
    return min(ok, key=lambda m: modes[m]["gram_s"]) if ok else "fp64"


def table(results: dict) -> str:
    lines = ["| model | mode | Gram time | floor (sym + shift) | ratio | vs official | peak extra (Grams + chunk) "
             "| Wp err α=1e3 / 3e4 / 1e6 |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, res in results.items():
        for mode, row in res["modes"].items():
            err = row.get("wp_error", {})
            errs = " / ".join(f"{err[k]['max']:.1e}" for k in err) if err else "—"
            speed = f"{row['speedup_vs_official']:.0f}×" if "speedup_vs_official" in row else "—"
            peak = "—" if row["peak_extra_MB"] is None else \
                f"{row['peak_extra_MB']:.0f} MB ({row['grams_MB']:.0f} + {row['chunk_MB']:.0f})"
            star = " **default**" if mode == res["default_mode"] else ""
            lines.append(f"| {name} | {mode}{star} | {row['gram_s'] * 1e3:.0f} ms | {row['floor_shift_s'] * 1e3:.0f} ms "
                         f"| {row['ratio']:.2f}× | {speed} | {peak} | {errs} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_b_16")
    parser.add_argument("--modes", default="fp64,fp32,tf32,bf16,fp64-fma,fp64-triton,fp32-triton,fp64-shift,fp32-shift")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--official-rows", type=int, default=50000)
    parser.add_argument("--oracle-samples", type=int, default=8,
                        help="samples of the float64 oracle check of the fp64 modes")
    add_lease_arguments(parser)
    parser.add_argument("--no-official", dest="official", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gemm-size", type=int, default=8192)
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run: 4 samples, batch 2, 32×32 images, 256-wide GEMM")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    parser.add_argument("--wp-max-d", type=int, help="Wp errors only for layers this wide or narrower")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.tiny:
        args.samples, args.batch, args.image_size, args.gemm_size, args.repeats = 4, 2, 32, 256, 1
        args.official_rows = min(args.official_rows, 500)
        args.wp_max_d = args.wp_max_d or 600
        args.oracle_samples = min(args.oracle_samples, 2)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES and m not in KERNELS]
    if unknown:
        parser.error(f"unknown modes {unknown}; use some of {list(MODES) + list(KERNELS)}")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True  # the same activations in every mode's pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    deadline = Deadline(args.time_budget)
    log = JsonLines(args.jsonl, device=None if name == "cpu" else name, keyed=KEYED)
    rates = {m: matrix_rate(m, device, args.gemm_size) for m in {mode_settings(x)[2] for x in args.modes}}
    print("matrix rates (TFLOP/s):", {m: round(r / 1e12, 2) for m, r in rates.items()}, flush=True)
    log.write({"kind": "setup", "rates_tflops": {m: r / 1e12 for m, r in rates.items()}})
    results = {}
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results[model_name] = run_model(model_name, args, device, rates, log, deadline)
        print(f"{model_name}: done", flush=True)
    print(table(results))
    slug = name.replace(" ", "-").replace("/", "-")
    out = args.out or os.path.join(HERE, "results", f"gpu-gram-{slug}.jsonl")
    write_results(out, {"device": name, "rates_tflops": {m: r / 1e12 for m, r in rates.items()},
                        "results": results, "table": table(results)},
                  keyed=KEYED, backend=sap_fast.backend_info(), cuda=torch.version.cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
