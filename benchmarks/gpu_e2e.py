"""End to end on the GPU: correct() and sweep() on ResNet-50 and ViT-B/16, per stage, against the
official approach (docs/methods.md#official-sap). Writes ``benchmarks/results/gpu-e2e-<device>.jsonl``.

Setting (per model; 14 classes, random weights, random images already on the device): a pool of
``--pool`` labelled images to pick the ``--trusted`` trusted samples from, and a validation set of
``--val`` images with random labels. Stages, timed with CUDA events:

- ``scoring``: select_trusted (loss, class-balanced) over the pool;
- ``stats``: collect_stats, float64 accumulation (exact mode);
- ``spectra`` (solver="eigh"): the eigendecompositions and W U per layer (Projector);
  ``prepare`` (solver="cholesky"): G/trG and G/trG·Wᵀ per layer;
- per α: ``update`` (all layers' new weights written into the working copy) and ``eval``;
  ``update_twin_s``: the eigh update per α with the plain torch twin instead of the Triton
  kernel (the kernel autotunes its tiles once per layer shape, in an untimed warm-up).

``correct_s`` = stats + spectra/prepare + one update at α = 3e4 (what correct() does after
selection), per solver. ``sweep_s`` = stats + spectra/prepare + every α's update over the default
grid (1e1…1e6 in half-decades, plus "no projection"); evaluations are reported apart
(``eval_s``), and ``sweep_call_s`` times the real ``sap_fast.sweep`` call (fp32 evaluation) as a
cross-check of the stage sum. ``extra_alpha_pct`` = the mean per-α update ÷ (stats + spectra).

Evaluation runs in bf16 autocast with channels_last when that gives the same predictions as fp32
on the unprojected model over the whole validation set (``eval_mode`` says which was used and
the agreement), else in fp32.

``official``: benchmarks/official.py on the same trusted samples and α grid (rows through the
CPU, 50 000 per layer, float32 SVD, a model copy per α), its stage times, and the same evaluation.

    python benchmarks/gpu_e2e.py                        # the GPU run
    python benchmarks/gpu_e2e.py --tiny --device cpu    # a smoke run of the plumbing
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import sap_fast  # noqa: E402
from sap_fast.project import Projector  # noqa: E402
from sap_fast.sweep import DEFAULT_ALPHAS  # noqa: E402
from common import Deadline, JsonLines, add_lease_arguments, verdict, write_results  # noqa: E402
from gpu_gram import Timer  # noqa: E402
import zoo as bench_models  # noqa: E402

# the results' nesting (benchmarks/common.flatten): a model's entries
KEYED = {"results": "model"}
CORRECT_ALPHA = 3e4
TARGETS_S = {"resnet50": 0.5, "vit_b_16": 1.0}  # correct() in exact mode on an H100: the target
OFFICIAL_SPEEDUP = 50  # the sweep must beat the official approach by this much


def eval_context(device: torch.device, fast: bool):
    if fast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predictions(model, x, batch: int, device, fast: bool) -> torch.Tensor:
    out = []
    with torch.no_grad(), eval_context(device, fast):
        for start in range(0, x.shape[0], batch):
            out.append(model(x[start:start + batch]).argmax(1))
    return torch.cat(out)


def choose_eval(model, val_x, batch: int, device) -> dict:
    """bf16 autocast + channels_last if it keeps every validation prediction of fp32."""
    if device.type != "cuda":
        return {"mode": "fp32", "agreement": None}
    want = predictions(model, val_x, batch, device, fast=False)
    fast_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    got = predictions(fast_model, val_x.contiguous(memory_format=torch.channels_last), batch, device, fast=True)
    agreement = float((got == want).double().mean())
    return {"mode": "bf16+channels_last" if agreement == 1.0 else "fp32", "agreement": agreement}


def time_twin(projector, work, device) -> float:
    """Mean seconds per α of the update with the plain torch twin instead of the Triton kernel."""
    from sap_fast.backends import triton
    saved = triton.compiled
    triton.compiled = lambda name: None if name == "update" else saved(name)
    try:
        projector.apply(work, 2.0)
        with Timer(device) as t:
            for alpha in DEFAULT_ALPHAS:
                projector.apply(work, alpha)
    finally:
        triton.compiled = saved
    return t.seconds / len(DEFAULT_ALPHAS)


def run_model(name: str, args, device: torch.device, log, deadline) -> dict:
    """One model; each solver's row is written to ``log`` (benchmarks/common.JsonLines) as soon
    as it is measured, then the official approach's (capped by time)."""
    torch.manual_seed(0)
    model = bench_models.build(name, num_classes=14, device=device, image_size=args.image_size).eval()
    size = args.image_size
    pool = (torch.randn(args.pool, 3, size, size, device=device), torch.randint(0, 14, (args.pool,), device=device))
    val_x = torch.randn(args.val, 3, size, size, device=device)
    val = (val_x, torch.randint(0, 14, (args.val,), device=device))
    eval_choice = choose_eval(model, val_x, args.batch, device)
    fast_eval = eval_choice["mode"] != "fp32"
    if fast_eval:
        val = (val_x.contiguous(memory_format=torch.channels_last), val[1])

    def evaluate(m):
        with eval_context(device, fast_eval):
            return sap_fast.evaluate(m, val, batch_size=args.batch, show_progress=False)

    out = {"source": model.bench_source, "pool": args.pool, "trusted": args.trusted, "val": args.val,
           "batch": args.batch, "image_size": size, "eval": eval_choice, "alphas": list(DEFAULT_ALPHAS)}
    sap_fast.collect_stats(model, pool[0][:args.batch], batch_size=args.batch, show_progress=False)  # warm-up
    with Timer(device) as t:
        idx = sap_fast.select_trusted(model, pool, n=args.trusted, batch_size=args.batch, show_progress=False)
    out["scoring_s"] = t.seconds
    trusted = pool[0][idx]
    with Timer(device) as t:
        stats = sap_fast.collect_stats(model, trusted, batch_size=args.batch, show_progress=False)
    out["stats_s"] = t.seconds
    work = copy.deepcopy(model)
    if fast_eval:
        work = work.to(memory_format=torch.channels_last)
    log.write({"kind": "model", "model": name, **out})
    out["skipped"] = []
    last_s = 0.0
    for solver in ("eigh", "cholesky"):
        if not deadline.allows(1.5 * last_s + 10):
            out["skipped"].append(solver)
            log.write({"kind": "skipped", "model": name, "solver": solver, "reason": "out of time"})
            continue
        solver_start = time.perf_counter()
        with Timer(device) as t:
            projector = Projector(model, stats, solver=solver)
        row = {"setup_s": t.seconds, "update_s": {}, "eval_s": {}, "val_accuracy": {}}
        projector.apply(work, 2.0)  # warm-up: Triton compiles and autotunes once per layer shape
        if solver == "eigh":  # the Triton update against its plain-torch twin, per α
            row["update_twin_s"] = time_twin(projector, work, device)
        for alpha in [None, *DEFAULT_ALPHAS]:
            with Timer(device) as t:
                projector.apply(work, alpha)
            row["update_s"][str(alpha)] = t.seconds
            with Timer(device) as t:
                e = evaluate(work)
            row["eval_s"][str(alpha)] = t.seconds
            row["val_accuracy"][str(alpha)] = e.accuracy
        with Timer(device) as t:  # correct() after selection: one α from the same stats
            sap_fast.correct(model, stats=stats, alpha=CORRECT_ALPHA, solver=solver)
        row["correct_from_stats_s"] = t.seconds
        per_alpha = [row["update_s"][str(a)] for a in DEFAULT_ALPHAS]
        row["correct_s"] = out["stats_s"] + row["correct_from_stats_s"]
        row["sweep_s"] = out["stats_s"] + row["setup_s"] + sum(per_alpha)
        row["evals_s"] = sum(row["eval_s"].values())
        row["extra_alpha_pct"] = 100 * (sum(per_alpha) / len(per_alpha)) / (out["stats_s"] + row["setup_s"])
        with Timer(device) as t:
            result = sap_fast.sweep(model, None, val if not fast_eval else (val_x, val[1]), stats=stats,
                                    batch_size=args.batch, solver=solver, show_progress=False)
        row["sweep_call_s"] = t.seconds
        row["sweep_call_best_alpha"] = result.best_alpha
        target = TARGETS_S.get(name)
        row["verdicts"] = {"correct_s": verdict(row["correct_s"] if target else None, target or 0.0)}
        out[solver] = row
        log.write({"kind": "solver", "model": name, "solver": solver, **row})
        del projector, result
        last_s = time.perf_counter() - solver_start
    out["target_correct_s"] = TARGETS_S.get(name)
    limit = min(args.official_seconds, max(0.0, deadline.left() - 20))
    if args.official and limit <= 0:
        log.write({"kind": "skipped", "model": name, "check": "official", "reason": "out of time"})
    elif args.official:
        from official import official_correct
        evals = {}

        def on_model(alpha, corrected):
            if fast_eval:
                corrected = corrected.to(memory_format=torch.channels_last)
            with Timer(device) as t:
                evaluate(corrected)
            evals[str(alpha)] = t.seconds

        res = official_correct(model, trusted, list(DEFAULT_ALPHAS), max_samples=args.official_rows,
                               max_batch_size=args.batch, on_model=on_model, time_limit=limit)
        times = res.stage_times
        total = times["gather"] + times["svd"] + sum(times["project"].values())
        # capped: the official run stopped early, so its times (and the speed-ups) are lower bounds
        out["official"] = {"gather_s": times["gather"], "svd_s": times["svd"],
                           "project_s": {str(a): s for a, s in times["project"].items()},
                           "eval_s": evals, "total_s": total, "total_with_evals_s": total + sum(evals.values()),
                           "time_cap_s": limit, "capped": res.capped, "progress": res.progress}
        for solver in ("eigh", "cholesky"):
            if solver not in out:
                continue
            row = out[solver]
            row["speedup_vs_official"] = total / row["sweep_s"]
            row["speedup_vs_official_with_evals"] = out["official"]["total_with_evals_s"] / (row["sweep_s"] + row["evals_s"])
            row["verdicts"]["speedup_vs_official"] = verdict(row["speedup_vs_official"], OFFICIAL_SPEEDUP,
                                                             at_most=False, bound=res.capped)
        log.write({"kind": "official", "model": name, **out["official"],
                   "speedup_vs_official": {s: out[s]["verdicts"]["speedup_vs_official"]
                                           for s in ("eigh", "cholesky") if s in out}})
    return out


def table(results: dict) -> str:
    lines = ["| model | solver | scoring | stats | spectra/prepare | update per α | correct() | sweep (no evals) "
             "| evals | extra α | vs official (with evals) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        for solver in [s for s in ("eigh", "cholesky") if s in res]:
            row = res[solver]
            per = [row["update_s"][str(a)] for a in DEFAULT_ALPHAS]
            twin = f" (torch twin {1e3 * row['update_twin_s']:.1f} ms)" if "update_twin_s" in row else ""
            vs = (f"{row['speedup_vs_official']:.0f}× ({row['speedup_vs_official_with_evals']:.0f}×)"
                  if "speedup_vs_official" in row else "—")
            lines.append(f"| {name} | {solver} | {res['scoring_s']:.3f} s | {res['stats_s']:.3f} s | {row['setup_s']:.3f} s "
                         f"| {1e3 * sum(per) / len(per):.1f} ms{twin} | {row['correct_s']:.3f} s | {row['sweep_s']:.3f} s "
                         f"| {row['evals_s']:.2f} s | {row['extra_alpha_pct']:.1f}% | {vs} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_b_16")
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--trusted", type=int, default=1000)
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--official-rows", type=int, default=50000)
    add_lease_arguments(parser)
    parser.add_argument("--no-official", dest="official", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 32×32 images, a few samples")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.tiny:
        args.pool, args.trusted, args.val, args.batch, args.image_size = 28, 14, 14, 7, 32
        args.official_rows = min(args.official_rows, 500)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    deadline = Deadline(args.time_budget)
    log = JsonLines(args.jsonl, device=None if name == "cpu" else name, keyed=KEYED)
    results = {}
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if not deadline.allows(30):
            log.write({"kind": "skipped", "model": model_name, "reason": "out of time"})
            continue
        results[model_name] = run_model(model_name, args, device, log, deadline)
        print(f"{model_name}: done", flush=True)
    print(table(results))
    slug = name.replace(" ", "-").replace("/", "-")
    out = args.out or os.path.join(HERE, "results", f"gpu-e2e-{slug}.jsonl")
    write_results(out, {"device": name, "results": results, "table": table(results)}, keyed=KEYED,
                  backend=sap_fast.backend_info(), cuda=torch.version.cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
