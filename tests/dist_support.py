"""Spawned gloo ranks for tests/core/test_distributed.py (importable top-level functions: the
"spawn" start method pickles them by name) and the single-process cases they are compared with."""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback

import torch
from torch import nn

from support import REPO_ROOT

N, CLASSES, ALPHA, TRUSTED, CANDIDATES = 40, 3, 1e3, 12, 25


class Net(nn.Module):
    """Two convs (Gram mode), self-attention over the 3x3 positions (q/k/v share one record) and
    a wide head (72 inputs, fewer rows than that: its rows are kept and gathered)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(72, CLASSES)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        t = h.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.flatten(1))


def problem():
    """Model, data and a permutation of the sample ids (shards hold ``x[perm[block]]``)."""
    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(N, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,))
    perm = torch.randperm(N)
    return model, x, y, perm


def blocks(sizes):
    edges = torch.tensor([0] + list(sizes)).cumsum(0).tolist()
    return [(edges[r], edges[r + 1]) for r in range(len(sizes))]


def stats_summary(stats) -> dict:
    records = {}
    for name, rec in stats.items():
        records[name] = {"mode": rec.mode, "count": rec.count,
                         "data": (rec.gram if rec.mode == "gram" else rec.rows).clone()}
    shared = sorted(sorted(a for a in stats if stats[a] is stats[b]) for b in stats)
    return {"layers": list(stats), "records": records, "samples": stats.num_samples,
            "shared": sorted({tuple(s) for s in shared})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _attempt(out: dict, key: str, fn):
    """Record fn's result, or its exception as (type name, message)."""
    try:
        out[key] = fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        out[key] = ("raised", type(exc).__name__, str(exc))


def _buckets(rank, dist, sd) -> dict:
    """Bucketed all-reduce (plain and upper-triangle) and broadcast, with buckets far smaller
    than the tensors, against one whole-tensor collective."""
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(rank)
    a = torch.randn(2, 7, 7, generator=gen, dtype=torch.float64)
    a = a + a.transpose(1, 2)
    b = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    whole = [a.clone(), b.clone()]
    for t in whole:
        dist.all_reduce(t)
    sym = a.clone()
    calls, _ = sd.all_reduce_sum([sym], group, symmetric=True, bucket_bytes=80)
    plain = [a.clone(), b.clone()]
    sd.all_reduce_sum(plain, group, bucket_bytes=64)       # large for the bucket: in place, sliced
    packed = [a.clone(), b.clone()]
    one, _ = sd.all_reduce_sum(packed, group, bucket_bytes=8000)  # small: both in one bucket
    sent = torch.arange(30.0).view(5, 6) if rank == 1 else torch.zeros(5, 6)
    sd.broadcast([sent], 1, group, bucket_bytes=56)
    return {"symmetric": rel_max(sym, whole[0]),
            "reduce": max(rel_max(p, w) for p, w in zip(plain + packed, whole + whole)), "calls": calls,
            "one_bucket": one,
            "broadcast": float((sent - torch.arange(30.0).view(5, 6)).abs().max())}


def rel_max(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def worker(rank: int, world: int, port: int, sizes, folder: str):
    """One rank: every distributed call of the pipeline on its shard, results to folder/rank.pt."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    import sap_fast
    from sap_fast import distributed as sd
    from sap_fast.spectrum import spectra

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    except Exception as exc:  # noqa: BLE001 - e.g. the port was taken meanwhile: the test retries
        torch.save({"init_failed": repr(exc)}, os.path.join(folder, f"{rank}.pt"))
        return
    out = {}
    try:
        model, x, y, perm = problem()
        a, b = blocks(sizes)[rank]
        xs, ys = x[a:b], y[a:b]                  # contiguous shards: union = x in rank order
        ids = perm[a:b]                          # permuted shards, with their global ids
        stats = sap_fast.collect_stats(model, xs)
        out["stats"] = stats_summary(stats)
        sd.PACK_TRIANGLES = True  # the NCCL default: only upper triangles travel
        out["stats_packed"] = stats_summary(sap_fast.collect_stats(model, xs))
        sd.PACK_TRIANGLES = None
        out["buckets"] = _buckets(rank, dist, sd)
        fixed = sap_fast.correct(model, xs, alpha=ALPHA)
        out["weights"] = {k: v.clone() for k, v in fixed.state_dict().items()}
        out["weights_from_stats"] = sap_fast.correct(model, stats=stats, alpha=ALPHA).state_dict()
        out["weights_eigh"] = sap_fast.correct(model, stats=stats, alpha=ALPHA, solver="eigh").state_dict()
        out["trusted"] = sap_fast.select_trusted(model, (xs, ys), n=TRUSTED)
        out["trusted_ids"] = sap_fast.select_trusted(model, (x[ids], y[ids]), n=TRUSTED, indices=ids)
        out["trusted_candidates"] = sap_fast.select_trusted(model, (x[ids], y[ids]), n=TRUSTED,
                                                            indices=ids, candidates=CANDIDATES)
        out["suspects"] = sap_fast.select_suspects(model, (x[ids], y[ids]), n=TRUSTED, indices=ids)
        out["local_part"] = sd.local_positions(out["trusted_ids"], ids)
        out["curvature"] = sap_fast.select_trusted(model, (xs, ys), n=TRUSTED, score="curvature",
                                                   curvature_iters=2)
        result = sap_fast.sweep(model, xs, (xs, ys), alphas=[10.0, ALPHA])
        out["sweep"] = ([(r.alpha, r.val_accuracy, r.val_loss) for r in result.table], result.best_alpha)
        result = sap_fast.sweep(model, xs, (xs, ys), alphas=[10.0, ALPHA], solver="cholesky")
        out["sweep_cholesky"] = ([(r.alpha, r.val_accuracy, r.val_loss) for r in result.table],
                                 result.best_alpha)
        # failures: one rank's bad input makes every rank raise, and the group stays usable
        bad = xs[:, :1] if rank == world - 1 else xs
        _attempt(out, "bad_input", lambda: sap_fast.collect_stats(model, bad))
        bad_y = ys + CLASSES if rank == 0 else ys
        _attempt(out, "bad_labels", lambda: sap_fast.select_trusted(model, (xs, bad_y), n=TRUSTED))
        local = sap_fast.collect_stats(model, xs if len(xs) else x[:3], process_group=False)
        _attempt(out, "local_stats", lambda: spectra(local))
        _attempt(out, "too_many", lambda: sap_fast.select_trusted(model, (xs, ys), n=N + 1))
        out["after_errors"] = sap_fast.select_trusted(model, (xs, ys), n=TRUSTED)
        if world == 2:  # last: the other rank dies; this one must fail at once, not hang
            if rank == 1:
                out["done"] = True
                torch.save(out, os.path.join(folder, f"{rank}.pt"))
                os._exit(0)
            start = time.monotonic()
            _attempt(out, "peer_died", lambda: sap_fast.collect_stats(model, xs))
            out["peer_died_seconds"] = time.monotonic() - start
    except Exception:  # noqa: BLE001 - reported to the test
        out["crash"] = traceback.format_exc()
    finally:
        out["done"] = True
        torch.save(out, os.path.join(folder, f"{rank}.pt"))
        dist.destroy_process_group()


def run_workers(world: int, sizes, folder: str, limit: float = 90.0, attempts: int = 2) -> list:
    """Spawn ``world`` gloo ranks (loopback only); kill them and fail past ``limit`` seconds.

    Only a failed start (the free port taken before the ranks bound it) is retried. A rank
    killed by a signal *after* it saved complete results (gloo's teardown can abort) is
    tolerated; one killed before, or a hang, fails the test."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for attempt in range(attempts):
        for r in range(world):
            if os.path.exists(os.path.join(folder, f"{r}.pt")):
                os.remove(os.path.join(folder, f"{r}.pt"))
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, list(sizes), folder), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + limit
        try:
            for p in procs:
                p.join(timeout=max(0.1, deadline - time.monotonic()))
            if any(p.is_alive() for p in procs):
                raise AssertionError(f"{world} ranks did not finish within {limit:.0f} s (a hang)")
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(folder, f"{r}.pt")
            out = torch.load(path, weights_only=False) if os.path.exists(path) else {}
            if not out.get("done") and "init_failed" not in out:
                raise AssertionError(f"rank {r} exited with code {p.exitcode} before saving its results")
            results.append(out)
        if not any("init_failed" in out for out in results):
            return results
    raise AssertionError(f"the ranks could not start: {[o.get('init_failed') for o in results]}")


def torchrun(script: str, args):
    """(argv, environment additions) of ``torchrun --standalone --nproc_per_node=2 script args``
    (``--standalone``: a local rendezvous on a port torchrun picks itself, so no race for a free
    port), one thread per rank, this checkout's sap_fast first on the path."""
    env = dict(OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script, *args]
    return cmd, env
