"""What distributed SAP costs, and how it scales with the number of ranks.

1. Analytic, from layer shapes (ResNet-50 and ViT-B/16 at 224², N trusted samples; the widths
   are the census of docs/cost-census.md, written out here because torchvision/timm do
   not import on this machine): memory per rank (every rank holds every Gram), bytes per
   bucketed all-reduce and per correction (ring all-reduce: 2(p−1)/p × payload per rank), the
   spectra broadcast, and how far spreading the eigendecompositions over p ranks helps.
2. Measured, on this CPU machine: collect_stats + spectra on a small conv net with a fixed total
   of samples, over 1, 2 and 3 gloo processes (one thread each).

    python benchmarks/scaling.py [--samples 480] [--repeats 2] [--no-measure]
    → benchmarks/results/scaling.jsonl and markdown tables on stdout
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

BUCKET = 64 << 20
MB = 1e6


# -- layer census -------------------------------------------------------------------------------
def resnet50():
    """(name, d, groups, rows per sample) of every covered layer of torchvision's ResNet-50 (v1.5)."""
    layers = [("conv1", 3 * 49, 1, 112 * 112)]
    c_in, size = 64, 56
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            stride = 2 if b == 0 and stage > 1 else 1
            out = size // stride
            p = f"layer{stage}.{b}"
            layers += [(f"{p}.conv1", c_in, 1, size * size), (f"{p}.conv2", width * 9, 1, out * out),
                       (f"{p}.conv3", width, 1, out * out)]
            if b == 0:
                layers.append((f"{p}.downsample.0", c_in, 1, out * out))
            c_in, size = width * 4, out
    return layers + [("fc", 2048, 1, 1)]


def vit_b16():
    """ViT-B/16: q/k/v read one tensor, so sap_fast keeps one record for them (``...q/k/v``)."""
    layers = [("conv_proj", 3 * 16 * 16, 1, 196)]
    for i in range(12):
        p = f"encoder.layers.{i}"
        layers += [(f"{p}.self_attention.q/k/v", 768, 1, 197), (f"{p}.self_attention.out_proj", 768, 1, 197),
                   (f"{p}.mlp.0", 768, 1, 197), (f"{p}.mlp.3", 3072, 1, 197)]
    return layers + [("heads.head", 768, 1, 1)]


def bucket_calls(grams, symmetric: bool) -> int:
    """All-reduce calls sap_fast.distributed makes for these Grams (its own plan, on meta
    tensors): NCCL packs upper triangles into 64 MB buckets; gloo sends full Grams, large ones in
    place (64 MB slices), small ones packed."""
    from sap_fast.distributed import plan_calls

    tensors = [torch.empty(g, d, d, dtype=torch.float64, device="meta") for _, d, g in grams]
    return plan_calls(tensors, symmetric, BUCKET, direct_on=torch.device("meta"))


def analyse(layers, samples: int, ranks=(1, 2, 4, 8, 16, 32, 64)) -> dict:
    """Memory, communication and eigensolver spread for one model, float64 statistics."""
    grams = [(n, d, g) for n, d, g, rows in layers if samples * rows > d]
    thin = [(n, d, g, samples * rows) for n, d, g, rows in layers if samples * rows <= d]
    gram_bytes = sum(g * d * d * 8 for _, d, g in grams)
    rows_bytes = sum(g * r * d * 8 for _, d, g, r in thin)
    packed = sum(g * d * (d + 1) // 2 * 8 for _, d, g in grams)
    spectra = sum(g * (d * d + d) * 8 for _, d, g in grams) + sum(g * (d * r + r) * 8 for _, d, g, r in thin)
    costs = [g * 9 * d ** 3 for _, d, g in grams] + [g * 9 * d * r * r for _, d, g, r in thin]
    per_p = []
    for p in ranks:
        load = [0.0] * p
        for c in sorted(costs, reverse=True):  # sap_fast.distributed.owners: LPT
            load[load.index(min(load))] += c
        per_p.append({"ranks": p, "allreduce_sent_per_rank_MB": 2 * (p - 1) / p * packed / MB,
                      "allreduce_sent_per_rank_full_MB": 2 * (p - 1) / p * gram_bytes / MB,
                      "rows_gathered_per_rank_MB": rows_bytes * (p - 1) / p / MB,
                      "spectra_received_per_rank_MB": spectra * (p - 1) / p / MB,
                      "eig_flops_max_rank_G": max(load) / 1e9,
                      "eig_speedup": sum(costs) / max(load)})
    return {
        "samples": samples, "records": len(layers), "gram_records": len(grams),
        "rows_records": [n for n, *_ in thin],
        "largest_d": max(d for _, d, *_ in layers),
        "memory_per_rank_MB": {"grams_fp64": gram_bytes / MB, "rows_fp64": rows_bytes / MB,
                               "total_fp64": (gram_bytes + rows_bytes) / MB,
                               "grams_fp64_packed_if_stored_so": packed / MB,
                               "scratch_one_bucket": BUCKET / MB, "scratch_one_chunk": 8 * (1 << 23) / MB},
        "allreduce": {"payload_upper_triangles_MB": packed / MB, "payload_full_MB": gram_bytes / MB,
                      "bucket_MB": BUCKET / MB, "calls_nccl_triangles": bucket_calls(grams, True),
                      "calls_gloo_full": bucket_calls(grams, False),
                      "calls_if_buckets_were_full": math.ceil(packed / BUCKET),
                      "calls_one_per_layer": len(grams)},
        "spectra_broadcast_MB": spectra / MB,
        "eig_flops_total_G": sum(costs) / 1e9,
        "per_ranks": per_p,
    }


# -- measurement ----------------------------------------------------------------------------------
def _net():
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(128, 256, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)).eval()


def _data(samples: int):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(samples, 3, 32, 32, generator=gen)


def _timed_run(world: int, rank: int, samples: int) -> dict:
    """collect_stats + spectra on this rank's block; wall times and collective counts."""
    import sap_fast
    from sap_fast import distributed as sd
    from sap_fast.spectrum import spectra

    model, x = _net(), _data(samples)
    ids = sd.shard(samples)
    comm = {"calls": 0, "bytes": 0, "reduce_s": 0.0}
    orig_reduce, orig_allreduce = sd.reduce_stats, sd.all_reduce_sum

    def reduce_stats(*a, **k):
        t = time.perf_counter()
        try:
            return orig_reduce(*a, **k)
        finally:
            comm["reduce_s"] += time.perf_counter() - t

    def all_reduce_sum(*a, **k):
        calls, sent = orig_allreduce(*a, **k)
        comm["calls"] += calls
        comm["bytes"] += sent
        return calls, sent

    sd.reduce_stats, sd.all_reduce_sum = reduce_stats, all_reduce_sum
    if world > 1:
        torch.distributed.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    stats = sap_fast.collect_stats(model, x[ids], show_progress=False)
    t1 = time.perf_counter()
    spectra(stats)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"stats_s": t1 - t0, "reduce_s": comm["reduce_s"], "spectra_s": t2 - t1, "total_s": t2 - t0,
            "cpu_s": c2 - c0, "allreduce_calls": comm["calls"], "allreduce_MB": comm["bytes"] / MB,
            "local_samples": len(ids)}


def _worker(rank: int, world: int, port: int, samples: int, folder: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        torch.save(_timed_run(world, rank, samples), os.path.join(folder, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


REDUCE_WIDTHS = (2304, 2304, 1152, 1024, 512)  # ResNet-50 layer-3-like Grams, 106 MB in float64


def _reduce_worker(rank: int, world: int, port: int, repeats: int, folder: str) -> None:
    """Summing the same Grams three ways: one all_reduce per Gram, sap_fast's full-Gram plan
    (gloo's default), and its upper-triangle packing (NCCL's default)."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from sap_fast import distributed as sd
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        gen = torch.Generator().manual_seed(rank)
        grams = [torch.rand(1, d, d, generator=gen, dtype=torch.float64) for d in REDUCE_WIDTHS]
        grams = [g + g.transpose(1, 2) for g in grams]
        best = {}
        for _ in range(repeats):
            for mode in ("one all_reduce per Gram", "bucketed, full Grams", "bucketed, upper triangles"):
                work = [g.clone() for g in grams]
                dist.barrier()
                t = time.perf_counter()
                if mode.startswith("one"):
                    for g in work:
                        dist.all_reduce(g)
                else:
                    sd.all_reduce_sum(work, dist.group.WORLD, symmetric=mode.endswith("triangles"))
                best[mode] = min(best.get(mode, 1e9), time.perf_counter() - t)
        torch.save(best, os.path.join(folder, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A loopback port free right now (the ranks bind it a moment later)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_reduce(repeats: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's sap_fast

    folder = tempfile.mkdtemp()
    mp.start_processes(_reduce_worker, args=(2, free_port(), repeats, folder), nprocs=2, start_method="spawn")
    per_rank = [torch.load(os.path.join(folder, f"{r}.pt")) for r in range(2)]
    out = {mode: max(p[mode] for p in per_rank) for mode in per_rank[0]}
    out["grams_MB"] = sum(8 * d * d for d in REDUCE_WIDTHS) / MB
    print(f"  reduce modes, 2 gloo ranks: {out}", flush=True)
    return out


def measure(samples: int, repeats: int, worlds=(1, 2, 3)) -> list:
    import tempfile

    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's sap_fast

    rows = []
    for world in worlds:
        best = None
        for _ in range(repeats):
            folder = tempfile.mkdtemp()
            mp.start_processes(_worker, args=(world, free_port(), samples, folder), nprocs=world,
                               start_method="spawn")
            per_rank = [torch.load(os.path.join(folder, f"{r}.pt")) for r in range(world)]
            run = {k: max(p[k] for p in per_rank) for k in ("stats_s", "reduce_s", "spectra_s", "total_s", "cpu_s")}
            run["load_average"] = os.getloadavg()[0]
            run.update(allreduce_calls=per_rank[0]["allreduce_calls"], allreduce_MB=per_rank[0]["allreduce_MB"],
                       local_samples=[p["local_samples"] for p in per_rank])
            if best is None or run["total_s"] < best["total_s"]:
                best = run
        best["ranks"] = world
        rows.append(best)
        print(f"  {world} rank(s): {best}", flush=True)
    return rows


# -- report ---------------------------------------------------------------------------------------
def markdown(analytic: dict, measured: list, reduce_modes: dict) -> str:
    out = ["| | ResNet-50 | ViT-B/16 |", "|---|---:|---:|"]
    r, v = analytic["resnet50"], analytic["vit_b16"]
    rows = [
        ("records (Gram / kept rows)", lambda a: f"{a['gram_records']} / {len(a['rows_records'])}"),
        ("Grams per rank, float64", lambda a: f"{a['memory_per_rank_MB']['grams_fp64']:.0f} MB"),
        ("kept rows per rank, float64", lambda a: f"{a['memory_per_rank_MB']['rows_fp64']:.1f} MB"),
        ("all-reduce payload, NCCL (upper triangles)", lambda a: f"{a['allreduce']['payload_upper_triangles_MB']:.0f} MB"),
        ("all-reduce payload, gloo (full Grams)", lambda a: f"{a['allreduce']['payload_full_MB']:.0f} MB"),
        ("all-reduce calls NCCL / gloo / one per layer",
         lambda a: f"{a['allreduce']['calls_nccl_triangles']} / {a['allreduce']['calls_gloo_full']} / "
                   f"{a['allreduce']['calls_one_per_layer']}"),
        ("spectra broadcast (bases + eigenvalues)", lambda a: f"{a['spectra_broadcast_MB']:.0f} MB"),
        ("eigensolver, 9d³ summed", lambda a: f"{a['eig_flops_total_G']:.0f} GFLOP"),
    ]
    for label, f in rows:
        out.append(f"| {label} | {f(r)} | {f(v)} |")
    out += ["", "| ranks p | ResNet-50: sent per rank by ring all-reduce, NCCL / gloo | spectra received per rank | "
            "eig speed-up (largest job bound) | ViT-B/16: sent per rank, NCCL / gloo | spectra received | eig speed-up |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(r["per_ranks"], v["per_ranks"]):
        out.append(f"| {a['ranks']} | {a['allreduce_sent_per_rank_MB']:.0f} / {a['allreduce_sent_per_rank_full_MB']:.0f} MB "
                   f"| {a['spectra_received_per_rank_MB']:.0f} MB | {a['eig_speedup']:.2f}× "
                   f"| {b['allreduce_sent_per_rank_MB']:.0f} / {b['allreduce_sent_per_rank_full_MB']:.0f} MB "
                   f"| {b['spectra_received_per_rank_MB']:.0f} MB | {b['eig_speedup']:.2f}× |")
    if reduce_modes:
        out += ["", f"| summing {reduce_modes['grams_MB']:.0f} MB of Grams over 2 gloo ranks (loopback) | time |",
                "|---|---:|"]
        out += [f"| {k} | {v:.3f} s |" for k, v in reduce_modes.items() if k != "grams_MB"]
    if measured:
        base = measured[0]["total_s"]
        out += ["", "| gloo ranks | samples per rank | collect_stats | of which reduce | spectra | total | speed-up | "
                "CPU s, busiest rank | all-reduce calls, payload | load avg |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in measured:
            out.append(f"| {m['ranks']} | {m['local_samples']} | {m['stats_s']:.2f} s | {m['reduce_s']:.3f} s | "
                       f"{m['spectra_s']:.3f} s | {m['total_s']:.2f} s | {base / m['total_s']:.2f}× | "
                       f"{m['cpu_s']:.2f} s | {m['allreduce_calls']}, {m['allreduce_MB']:.2f} MB | "
                       f"{m['load_average']:.1f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=480, help="total samples of the measured run")
    parser.add_argument("--trusted", type=int, default=1000, help="N of the analytic tables")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-measure", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                        "results", "scaling.jsonl"))
    args = parser.parse_args()
    analytic = {"resnet50": analyse(resnet50(), args.trusted), "vit_b16": analyse(vit_b16(), args.trusted)}
    measured = [] if args.no_measure else measure(args.samples, args.repeats)
    reduce_modes = {} if args.no_measure else measure_reduce(args.repeats + 1)
    print(markdown(analytic, measured, reduce_modes))
    write_results(args.out, keyed={"analytic": "model"}, payload={"analytic": analytic, "measured": measured, "reduce_modes": reduce_modes,
                             "measured_model": "5 convs 3->32->64->128->256 (3x3, 32x32 input) + Linear(256, 10)",
                             "note": "measured on 2 shared CPU cores, one thread per rank: 3 ranks oversubscribe"},
                  samples=args.samples, trusted=args.trusted)


if __name__ == "__main__":
    main()
