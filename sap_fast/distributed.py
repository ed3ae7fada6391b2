"""Scale-out over ``torch.distributed``: every rank processes its own shard, and every rank ends
with the same statistics, trusted set, spectra and corrected weights as one process would get on
the union of the shards (taken in rank order).

Launch with ``torchrun`` and ``torch.distributed.init_process_group`` (NCCL on GPUs, after
``torch.cuda.set_device(local_rank)``; gloo on CPUs); then call the usual API on *every* rank:

- :func:`sap_fast.select_trusted` scores each rank's shard and gathers only the candidates'
  scores, labels and global ids (at most ``2 n`` per rank), never the data;
- :func:`sap_fast.collect_stats` accumulates local Grams, then sums them with a few bucketed
  ``all_reduce`` calls (:data:`BUCKET_BYTES` each; upper triangles only on NCCL,
  :data:`PACK_TRIANGLES`), not one per layer;
  a layer whose rows over all ranks do not outnumber its width gathers its rows instead;
- the spectra (:func:`sap_fast.spectrum.spectra`, used by ``correct``/``sweep``) are spread over
  the ranks, layer by layer, and broadcast from the rank that computed them.

``process_group`` (every function that takes it): ``None`` = the default group when
``torch.distributed`` is initialised with more than one rank, else local; ``False`` = local
even inside a distributed job (e.g. on rank 0 only); ``True`` = the default group, and an error
if ``torch.distributed`` is not initialised; or a ``ProcessGroup``. A group of one rank runs the
local code. Every rank of the group must make the same calls (they are collectives).

Errors: each stage runs its rank-local part, then exchanges an ok/error flag with the others
(:func:`exchange`); a rank that raised re-raises its own error and every other rank raises the
same type with ``"rank R: <message>"``, so none is left waiting. A rank that dies makes the
others' next collective fail at once (gloo: connection reset); one that stops calling is caught
by the process group's timeout (pass ``timeout=`` to ``init_process_group``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ._runtime.checks import first_line, positive_int, resolve_group  # noqa: F401  (resolve_group: public here too)
from .stats import LayerStats, Stats

__all__ = ["BUCKET_BYTES", "PACK_TRIANGLES", "rank", "world_size", "pack_triangles", "comm_device",
           "exchange", "piece_elements", "plan_calls", "all_reduce_sum", "broadcast",
           "all_gather_rows", "owners", "spread", "shard", "local_positions", "LayerLayout",
           "RankLayout", "layout", "reduce_stats"]

BUCKET_BYTES = 64 << 20  # bytes per collective: bounds the extra memory, amortises the latency
# Send only the Grams' upper triangles (half the bytes)? None = on NCCL only: GPUs pack at memory
# speed and the links are the bottleneck; on CPUs the packing cost more than it saved over gloo
# (benchmarks/README.md).
PACK_TRIANGLES: Optional[bool] = None


def rank(group) -> int:
    return dist.get_rank(group)


def world_size(group) -> int:
    return dist.get_world_size(group)


def pack_triangles(group) -> bool:
    if PACK_TRIANGLES is not None:
        return PACK_TRIANGLES
    return dist.get_backend(group) == "nccl"


def comm_device(group) -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- error protocol -------------------------------------------------------------------------------
_RAISABLE = {"ValueError": ValueError, "TypeError": TypeError, "NonFiniteSample": ValueError}


def exchange(group, fn: Callable[[], object]) -> list:
    """Run ``fn()`` on this rank, then all-gather its result (a small picklable object).

    The sync point of every distributed stage: if ``fn`` raised on any rank, every rank raises
    (the failing rank its own exception, the others the same type naming that rank) instead of
    waiting forever in a later collective. Returns the results of all ranks, in rank order.
    """
    try:
        mine, error = ("ok", fn()), None
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised here
        mine, error = ("error", type(exc).__name__, first_line(exc)), exc
    everyone: list = [None] * world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if error is not None:
        raise error
    for r, item in enumerate(everyone):
        if item[0] == "error":
            raise _RAISABLE.get(item[1], RuntimeError)(f"rank {r}: {item[2]}")
    return [item[1] for item in everyone]


# -- bucketed collectives -------------------------------------------------------------------------
def _pieces(tensors: Sequence[torch.Tensor], symmetric: bool, max_elems: int):
    """``(view, mask, size)`` pieces of at most ``max_elems`` elements covering ``tensors``; with
    ``symmetric`` only the upper triangle of each ``(groups, d, d)`` block, in row blocks."""
    for t in tensors:
        if symmetric:
            d = t.shape[-1]
            step = max(1, max_elems // d)
            for g in range(t.shape[0]):
                for r0 in range(0, d, step):
                    h, w = min(step, d - r0), d - r0
                    yield t[g, r0:r0 + h, r0:], True, h * w - h * (h - 1) // 2
        else:
            flat = t.view(-1)
            for a in range(0, flat.numel(), max_elems):
                piece = flat[a:a + max_elems]
                yield piece, None, piece.numel()


def piece_elements(cap: int) -> int:
    """Pieces of 1/16 bucket: a bucket is sent at least 15/16 full (but the last)."""
    return max(1, cap // 16)


def _plan(tensors: Sequence[torch.Tensor], symmetric: bool, cap: int, direct_on):
    """What to send, in order: ``("direct", view)`` — a slice of a large contiguous tensor on
    ``direct_on`` (the comm device), reduced in place with no copy — or ``("piece", view, tri,
    size)`` to pack into the current bucket. Every rank derives the same plan from the shapes."""
    for t in tensors:
        if not symmetric and t.device == direct_on and t.numel() >= cap // 4:
            flat = t.view(-1)
            for a in range(0, flat.numel(), cap):
                yield ("direct", flat[a:a + cap])
            continue
        for view, tri, size in _pieces([t], symmetric, piece_elements(cap)):
            yield ("piece", view, tri, size)


def plan_calls(tensors: Sequence[torch.Tensor], symmetric: bool, bucket_bytes: int = BUCKET_BYTES,
               direct_on=torch.device("cpu")) -> int:
    """How many collective calls :func:`all_reduce_sum` makes (tensors may live on ``meta``)."""
    cap = _capacity(tensors, symmetric, bucket_bytes)
    calls, used = 0, 0
    for item in _plan(tensors, symmetric, cap, direct_on):
        if item[0] == "direct":
            calls += 1
            continue
        if used + item[3] > cap:
            calls, used = calls + 1, 0
        used += item[3]
    return calls + (used > 0)


def _capacity(tensors, symmetric: bool, bucket_bytes: int) -> int:
    cap = max(1, bucket_bytes // tensors[0].element_size())
    if symmetric:  # a piece is at least one row
        cap = max(cap, max(t.shape[-1] for t in tensors))
    return cap


def _mirror_upper(t: torch.Tensor, max_elems: int) -> None:
    """Copy each ``(d, d)`` block's upper triangle onto its lower one, in bounded row blocks."""
    d = t.shape[-1]
    step = max(1, max_elems // d)
    for g in range(t.shape[0]):
        for r0 in range(0, d, step):
            r1 = min(d, r0 + step)
            t[g, r1:, r0:r1] = t[g, r0:r1, r1:].transpose(0, 1)
            block = t[g, r0:r1, r0:r1]
            block.copy_(block.triu() + block.triu(1).transpose(0, 1))


def _bucketed(tensors: Sequence[torch.Tensor], group, collective, *, symmetric: bool = False,
              send: bool = True, bucket_bytes: int = BUCKET_BYTES) -> Tuple[int, int]:
    """Apply ``collective(buffer)`` to ``tensors``: large ones in place, the rest packed into
    buffers of ``bucket_bytes``. Returns (calls, payload bytes)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return 0, 0
    dtype = tensors[0].dtype
    if any(t.dtype != dtype or not t.is_contiguous() for t in tensors):
        raise ValueError("bucketed collectives need contiguous tensors of one dtype")
    cap = _capacity(tensors, symmetric, bucket_bytes)
    dev = comm_device(group)
    buf: Optional[torch.Tensor] = None
    pending: List[Tuple[torch.Tensor, Optional[torch.Tensor], int, int]] = []
    used, calls, sent = 0, 0, 0
    size_of = tensors[0].element_size()

    def flush():
        nonlocal used, calls, sent
        if not used:
            return
        collective(buf[:used])
        for view, mask, a, b in pending:
            values = buf[a:b].to(view.device)
            if mask is None:
                view.copy_(values)
            else:
                view.masked_scatter_(mask, values)
        calls, sent, used = calls + 1, sent + used * size_of, 0
        pending.clear()

    for item in _plan(tensors, symmetric, cap, dev):
        if item[0] == "direct":  # large: no copy (on loopback gloo the copies cost as much as the sum)
            collective(item[1])
            calls, sent = calls + 1, sent + item[1].numel() * size_of
            continue
        _, view, tri, size = item
        if used + size > cap:
            flush()
        if buf is None:  # no larger than what goes through buckets
            packed = sum(t.numel() for t in tensors if symmetric or t.device != dev or t.numel() < cap // 4)
            buf = torch.empty(min(cap, packed), dtype=dtype, device=dev)
        mask = torch.ones(view.shape, dtype=torch.bool, device=view.device).triu() if tri else None
        if send and mask is None:
            buf[used:used + size].copy_(view.reshape(-1))
        elif send:  # into the bucket directly (4x faster than view[mask] on CPU)
            torch.masked_select(view, mask, out=buf[used:used + size])
        pending.append((view, mask, used, used + size))
        used += size
    flush()
    if symmetric:
        for t in tensors:
            _mirror_upper(t, piece_elements(cap))
    return calls, sent


def all_reduce_sum(tensors: Sequence[torch.Tensor], group, *, symmetric: bool = False,
                   bucket_bytes: int = BUCKET_BYTES) -> Tuple[int, int]:
    """Sum ``tensors`` (in place) over the group in buckets; ``symmetric``: ``(groups, d, d)``
    blocks that are symmetric, so only their upper triangles travel (half the bytes)."""
    return _bucketed(tensors, group, lambda b: dist.all_reduce(b, group=group), symmetric=symmetric,
                     bucket_bytes=bucket_bytes)


def broadcast(tensors: Sequence[torch.Tensor], src: int, group, *,
              bucket_bytes: int = BUCKET_BYTES) -> Tuple[int, int]:
    """Broadcast ``tensors`` (in place) from group rank ``src`` in buckets."""
    return _bucketed(tensors, group, lambda b: dist.broadcast(b, group=group, group_src=src),
                     send=rank(group) == src, bucket_bytes=bucket_bytes)


def all_gather_rows(tensors: Sequence[torch.Tensor], counts: Sequence[Sequence[int]],
                    group) -> List[torch.Tensor]:
    """Concatenate, along dim 1 and in rank order, each ``(groups, count_r, d)`` tensor over ranks.

    ``counts[i][r]``: rows of tensor ``i`` on rank ``r`` (known to every rank). One padded
    ``all_gather`` for all tensors (only used for layers whose total rows stay below their width,
    so the buffer is bounded by those layers' Gram sizes)."""
    if not tensors:
        return []
    world, dev = world_size(group), comm_device(group)
    widths = [max(c) for c in counts]
    parts = []
    for t, m in zip(tensors, widths):
        padded = torch.zeros(t.shape[0], m, t.shape[2], dtype=t.dtype, device=dev)
        padded[:, :t.shape[1]] = t
        parts.append(padded.view(-1))
    local = torch.cat(parts)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    out, offset = [], 0
    for t, m, c in zip(tensors, widths, counts):
        size = t.shape[0] * m * t.shape[2]
        blocks = [g[offset:offset + size].view(t.shape[0], m, t.shape[2])[:, :c[r]]
                  for r, g in enumerate(gathered)]
        out.append(torch.cat(blocks, dim=1).to(t.device))
        offset += size
    return out


# -- spreading per-layer work ---------------------------------------------------------------------
def owners(costs: Sequence[float], world: int) -> List[int]:
    """Rank of each job: largest first, each to the least-loaded rank (deterministic)."""
    load = [0.0] * world
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def spread(costs: Sequence[float], shapes: Sequence[Sequence[Tuple[tuple, torch.dtype, torch.device]]],
           compute: Callable[[int], Sequence[torch.Tensor]], group) -> List[List[torch.Tensor]]:
    """Run ``compute(i)`` for every job ``i`` on one rank each (balanced by ``costs``) and
    broadcast the results (``shapes[i]``: their shapes, dtypes, devices), so every rank ends with
    every job's tensors, bitwise identical."""
    me, world = rank(group), world_size(group)
    who = owners(costs, world)
    results: List[Optional[List[torch.Tensor]]] = [None] * len(costs)

    def mine():
        for i, r in enumerate(who):
            if r == me:
                results[i] = [t.contiguous() for t in compute(i)]
        return None

    exchange(group, mine)
    for i, r in enumerate(who):
        if r != me:
            results[i] = [torch.empty(s, dtype=dt, device=dv) for s, dt, dv in shapes[i]]
    for r in range(world):
        owned = [t for i, o in enumerate(who) if o == r for t in results[i]]
        for dtype in sorted({t.dtype for t in owned}, key=str):  # one bucket stream per dtype
            broadcast([t for t in owned if t.dtype == dtype], r, group)
    return results  # type: ignore[return-value]


# -- sharding: this rank's sample ids -------------------------------------------------------------
def shard(n: int, process_group=None) -> torch.Tensor:
    """This rank's contiguous block of ``range(n)`` (the global ids of its samples); all of it
    outside a distributed job. Blocks in rank order tile ``range(n)``, so the default global ids
    of :func:`sap_fast.select_trusted` are the dataset positions."""
    positive_int(n, "n", minimum=0)
    group = resolve_group(process_group)
    if group is None:
        return torch.arange(n)
    return torch.arange(n).tensor_split(world_size(group))[rank(group)]


def local_positions(selected, indices) -> torch.Tensor:
    """Positions in this rank's shard (whose global ids are ``indices``) of the global ids
    ``selected`` (e.g. what :func:`sap_fast.select_trusted` returned), ascending."""
    ids = torch.as_tensor(indices, dtype=torch.long).flatten()
    chosen = torch.as_tensor(selected, dtype=torch.long).flatten()
    return torch.isin(ids, chosen).nonzero().flatten()


# -- statistics -----------------------------------------------------------------------------------
class LayerLayout(NamedTuple):
    """One record name on one rank, as the other ranks need to know it."""
    name: str
    record: int       # position of the first name sharing its record object on this rank
    d: int
    groups: int
    dtype: str
    count: int        # rows seen on this rank


class RankLayout(NamedTuple):
    """What one rank's statistics pass saw: its samples and its records, in forward order."""
    samples: int
    layers: List[LayerLayout]


def layout(records: Dict[str, LayerStats]) -> List[LayerLayout]:
    """The :class:`LayerLayout` of every record name, in order."""
    first: Dict[int, int] = {}
    return [LayerLayout(name, first.setdefault(id(rec), i), rec.d, rec.groups, str(rec.dtype), rec.count)
            for i, (name, rec) in enumerate(records.items())]


class _Job(NamedTuple):
    """Record names that share one reduction: their shape, row counts per rank, this rank's data."""
    names: List[str]
    d: int
    groups: int
    counts: List[int]
    tensor: torch.Tensor   # this rank's Gram (reduced in place) or rows (gathered)


def reduce_stats(records: Dict[str, LayerStats], layouts: List[RankLayout], group, device,
                 dtype: torch.dtype) -> Stats:
    """Sum every rank's local records (name → LayerStats) into identical :class:`Stats`.

    ``layouts``: every rank's :class:`RankLayout` (from :func:`exchange`). Names first seen on
    a lower rank come first (forward order of the union in rank order). Names share one record
    where they share one on every rank that ran them (self-attention's q/k/v), as one process
    would have kept them. A layer whose total rows exceed its width is all-reduced as a Gram;
    else its rows are gathered.
    """
    per_rank = [{lay.name: lay for lay in rank_layout.layers} for rank_layout in layouts]
    order: List[str] = []
    for rank_layout in layouts:
        order += [lay.name for lay in rank_layout.layers if lay.name not in order]
    if not order:
        raise ValueError("no covered layer ran during the forward pass on any rank; check layers= "
                         "and the model")
    sharing: Dict[tuple, List[str]] = {}   # names that share one record on every rank
    for name in order:
        seen = [p.get(name) for p in per_rank]
        have = [lay for lay in seen if lay is not None]
        shapes = {(lay.d, lay.groups, lay.dtype) for lay in have}
        if len(shapes) > 1:
            raise ValueError(f"ranks disagree on layer '{name}' (width, groups, dtype: "
                             f"{sorted(shapes)}); run the same model and layers= on every rank")
        sharing.setdefault(tuple(None if lay is None else lay.record for lay in seen), []).append(name)

    gram_jobs: List[_Job] = []
    row_jobs: List[_Job] = []
    used = set()
    for names in sharing.values():
        first = next(p[names[0]] for p in per_rank if names[0] in p)
        d, groups = first.d, first.groups
        counts = [p[names[0]].count if names[0] in p else 0 for p in per_rank]
        local = records.get(names[0])
        if sum(counts) > d:
            if local is None:
                gram = torch.zeros(groups, d, d, dtype=dtype, device=device)
            elif local.mode == "gram":  # reduce in place unless another job uses this record too
                gram = local.gram.clone() if id(local) in used else local.gram
            else:
                gram = local.gram.contiguous()
            gram_jobs.append(_Job(names, d, groups, counts, gram))
        else:
            rows = local.rows if local is not None and local.count else \
                torch.zeros(groups, 0, d, dtype=dtype, device=device)
            row_jobs.append(_Job(names, d, groups, counts, rows))
        if local is not None:
            used.add(id(local))

    all_reduce_sum([job.tensor for job in gram_jobs], group, symmetric=pack_triangles(group))
    gathered = all_gather_rows([job.tensor for job in row_jobs], [job.counts for job in row_jobs], group)
    out: Dict[str, LayerStats] = {}
    done = [("gram", job, job.tensor) for job in gram_jobs] + \
        [("rows", job, rows) for job, rows in zip(row_jobs, gathered)]
    for key, job, data in done:
        record = LayerStats.from_state({"d": job.d, "groups": job.groups, "count": sum(job.counts),
                                        key: data}, device)
        out.update({n: record for n in job.names})
    return Stats({n: out[n] for n in order}, sum(rank_layout.samples for rank_layout in layouts))
