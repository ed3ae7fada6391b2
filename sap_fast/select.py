"""Stage 1: the trusted samples — the lowest-loss (or lowest input-curvature) samples per class —
and their counterpart, the suspected mislabeled samples (highest score) that baselines forget.

``score="loss"``: per-sample cross-entropy against the (noisy) labels, eval mode.
``score="curvature"``: the official code's score, mean_j ‖∇ₓℓ(x + h vⱼ) − ∇ₓℓ(x)‖₂ over
Rademacher vⱼ, with per-sample (sum-reduced) losses rather than the official batch mean, which
inflated the scores of the last, smaller batch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.data import DataLoader, SequentialSampler

from . import distributed
from ._runtime import checks
from ._runtime.checks import RunOptions
from ._runtime.data import batches, num_samples, subset
from ._runtime.evaluate import check_targets, classifier_logits, finite_scores, non_finite_logits
from ._runtime.forward import eval_mode, forward_batches

__all__ = ["SCORES", "sample_scores", "lowest_per_class", "candidate_ids", "select_trusted",
           "select_suspects"]

SCORES = ("loss", "curvature")


def _empty_scores():
    """What an empty shard scores: no samples, class count unknown (taken from the other ranks)."""
    return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long), None


def _check_scores(s: torch.Tensor, start: int, logits=None, amp=None) -> None:
    """One batch's scores, already on the host: a NaN/Inf one names its sample."""
    if not bool(torch.isfinite(s).all()):
        if logits is not None:
            raise non_finite_logits(logits, start, "scoring", "data", amp)
        bad = int((~torch.isfinite(s)).nonzero()[0])
        raise checks.NonFiniteSample("scoring", start + bad, "data", found="scores")


def _loss_scores(model, data, opts: RunOptions, allow_empty=False):
    scores, labels, seen = [], [], 0
    for _, y, out in forward_batches(model, data, batch_size=opts.batch_size, device=opts.device,
                                     need_targets=True, what="data", desc="scoring",
                                     show_progress=opts.show_progress, allow_empty=allow_empty,
                                     amp=opts.amp):
        logits = classifier_logits(out)
        y = check_targets(y, logits.shape[1], "data")
        s = finite_scores(F.cross_entropy(logits.double(), y, reduction="none"), logits).cpu()
        _check_scores(s, seen, logits, opts.amp)  # on the host already: no extra read
        seen += s.numel()
        scores.append(s)
        labels.append(y.cpu())
    if not scores:
        return _empty_scores()
    return torch.cat(scores), torch.cat(labels), logits.shape[1]


def _curvature_scores(model, data, opts: RunOptions, iters, h, seed, allow_empty=False):
    # forward_batches validates the data and locates failures; gradients need our own loop
    batch_size, device = opts.batch_size, opts.device
    for _ in forward_batches(model, data, batch_size=batch_size, device=device, need_targets=True,
                             what="data", desc="checking", show_progress=False,
                             allow_empty=allow_empty):
        break
    gen = torch.Generator().manual_seed(seed)
    scores, labels, classes = [], [], None

    def grad_at(x, y):
        x = x.detach().requires_grad_(True)
        logits = classifier_logits(model(x))
        check_targets(y, logits.shape[1], "data")
        loss = F.cross_entropy(logits, y, reduction="sum")  # per-sample gradients stay separate
        return torch.autograd.grad(loss, x)[0], logits.shape[1]

    with eval_mode(model), torch.enable_grad():
        for x, y in batches(data, batch_size):
            if y is None or x.shape[0] == 0:
                continue
            x, y = x.to(device), y.to(device)
            g0, classes = grad_at(x, y)
            total = torch.zeros(x.shape[0], dtype=torch.float64)
            for _ in range(iters):
                v = torch.randint(0, 2, x.shape, generator=gen).to(x) * 2 - 1
                g1, _ = grad_at(x + h * v, y)
                total += (g1 - g0).flatten(1).double().norm(dim=1).cpu()
            _check_scores(total, sum(t.numel() for t in scores))
            scores.append(total / iters)
            labels.append(y.cpu())
    if not scores:
        return _empty_scores()
    return torch.cat(scores), torch.cat(labels), classes


def _check_loader(data) -> None:
    if isinstance(data, torch.utils.data.DataLoader) and \
            isinstance(data.sampler, torch.utils.data.RandomSampler):
        raise ValueError("data is a shuffling DataLoader, so indices would be meaningless; "
                         "pass one with shuffle=False")


class _Scoring:
    """How samples are scored, checked once: ``score``, the curvature score's draws and step."""

    def __init__(self, score, curvature_iters, curvature_h, seed):
        self.score = checks.choice(score, "score", SCORES)
        if score == "curvature" and (curvature_iters < 1 or not curvature_h > 0):
            raise ValueError("curvature_iters must be >= 1 and curvature_h > 0")
        self.iters, self.h, self.seed = curvature_iters, curvature_h, seed

    def __call__(self, model, data, opts: RunOptions, seed=None, allow_empty=False):
        """``(scores, labels, classes)`` of ``data``'s samples."""
        if self.score == "loss":
            return _loss_scores(model, data, opts, allow_empty)
        return _curvature_scores(model, data, opts, self.iters, self.h,
                                 self.seed if seed is None else seed, allow_empty)


def sample_scores(model: nn.Module, data, *, score: str = "loss", batch_size: int = 256, device=None,
                  curvature_iters: int = 10, curvature_h: float = 1e-3, seed: int = 0,
                  show_progress: Optional[bool] = None, amp=None):
    """``(scores, labels, classes)``: the per-sample scores :func:`select_trusted` and
    :func:`select_suspects` rank (arguments as theirs), for callers that need several
    selections from one scoring pass (e.g. :func:`lowest_per_class` of ``scores`` and of
    ``-scores``)."""
    scoring = _Scoring(score, curvature_iters, curvature_h, seed)
    _check_loader(data)
    opts = checks.run_options(model, device=device, batch_size=batch_size, process_group=False,
                              show_progress=show_progress, amp=amp)
    checks.finite_parameters(model)
    return scoring(model, data, opts)


def lowest_per_class(scores: torch.Tensor, labels: torch.Tensor, classes: int, n: int,
                     class_balanced: bool = True) -> torch.Tensor:
    """Ascending indices of the ``n`` lowest ``scores``: ``n // classes`` per label when
    ``class_balanced``, the remainder (and the quota of classes with too few samples) going to
    the lowest scores left, so that exactly ``n`` come back. Ties keep data order."""
    checks.positive_int(n, "n")
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 1-D and of one length, got shapes {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    checks.positive_int(classes, "classes")
    if n > scores.numel():
        raise ValueError(f"n={n} but data has only {scores.numel()} samples; pass n <= {scores.numel()}")
    order = torch.sort(scores, stable=True).indices
    if not class_balanced:
        return order[:n].sort().values
    quota = n // classes
    taken = torch.zeros(scores.numel(), dtype=torch.bool)
    for c in range(classes):
        in_class = order[labels[order] == c]
        taken[in_class[:quota]] = True
    rest = order[~taken[order]][: n - int(taken.sum())]
    taken[rest] = True
    return taken.nonzero().flatten()


def _check_candidates(candidates, n: int) -> Optional[int]:
    if checks.positive_int(candidates, "candidates", allow_none=True) is None:
        return None
    if candidates < n:
        raise ValueError(f"candidates={candidates} is less than n={n}; the scored subset must hold the "
                         "n samples to keep: pass candidates >= n, or None to score every sample")
    return candidates


def _count(data) -> int:
    """Samples in ``data`` (iterating it only when its length is unknown)."""
    if isinstance(data, DataLoader) and not isinstance(data.sampler, SequentialSampler):
        try:  # e.g. a DistributedSampler: the loader yields its shard, not the whole dataset
            return len(data.sampler)
        except TypeError:
            pass
    else:
        n = num_samples(data)
        if n is not None:
            return n
    return sum(x.shape[0] for x, _ in batches(data, 1024))


def _global_ids(indices, count: int) -> torch.Tensor:
    ids = torch.as_tensor(indices)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"indices must be a 1-D tensor of integer sample ids, got {ids.dtype} of shape "
                         f"{tuple(ids.shape)}")
    ids = ids.to("cpu", torch.long)
    if ids.numel() != count:
        raise ValueError(f"indices has {ids.numel()} entries but data has {count} samples; pass one "
                         "global id per sample of data, in data's order")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"indices must be >= 0 (positions in the whole dataset), got {int(ids.min())}")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError("indices holds duplicate ids; pass each sample's global id once")
    return ids


def _candidate_positions(data, ids: torch.Tensor, k: Optional[int], span: int, seed: int):
    """Positions in ``data`` of the random candidates (:func:`candidate_ids`: the same global
    choice however the data is sharded); None = every sample."""
    if k is None or k >= span:
        return None
    if isinstance(data, DataLoader) and not isinstance(data.sampler, SequentialSampler):
        raise ValueError("candidates= takes a subset of data, which a DataLoader with its own sampler "
                         "does not allow; pass Subset(dataset, shard_ids) with indices=shard_ids instead")
    return torch.isin(ids, candidate_ids(span, k, seed)).nonzero().flatten()


_SALT = 0x5DEECE66D  # so that the draw never equals torch.randperm(span, seed), e.g. a noise mask's


def candidate_ids(span: int, k: int, seed: int) -> torch.Tensor:
    """The global ids ``select_trusted(..., candidates=k, seed=seed)`` scores: the first ``k`` of
    a random permutation of ``range(span)`` drawn from a generator seeded with ``seed`` (salted)."""
    gen = torch.Generator().manual_seed((int(seed) + _SALT) % (1 << 63))
    return torch.randperm(span, generator=gen)[:k]


def _by_score(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Positions ordered by score, ties by global id (a stable sort on ids, then on scores)."""
    by_id = torch.sort(ids, stable=True).indices
    return by_id[torch.sort(scores[by_id], stable=True).indices]


def _local_candidates(scores, labels, ids, classes, n: int, class_balanced: bool) -> torch.Tensor:
    """Positions of the samples that can make the global choice: the ``n // classes`` lowest of
    each class and the ``n`` lowest overall (at most ``2n``). A sample chosen globally has fewer
    than its class quota of lower-scored same-class samples (quota picks), or fewer than ``n``
    lower-scored samples at all (fill picks), on its own rank as well."""
    order = _by_score(scores, ids)
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:n]] = True
    if class_balanced and classes:
        quota = n // classes
        for c in range(classes):
            keep[order[labels[order] == c][:quota]] = True
    return keep.nonzero().flatten()


def _pick(scores, labels, ids, classes: int, n: int, class_balanced: bool) -> torch.Tensor:
    """:func:`lowest_per_class` over samples identified by global ``ids`` (ties by id; an id
    seen twice, e.g. padded by a DistributedSampler, counts once); ascending ids."""
    order = torch.sort(ids, stable=True).indices
    scores, labels, ids = scores[order], labels[order], ids[order]
    first = torch.ones(ids.numel(), dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    scores, labels, ids = scores[first], labels[first], ids[first]
    return ids[lowest_per_class(scores, labels, classes, n, class_balanced)]


class _RankCandidates(NamedTuple):
    """What one rank sends for the global choice: its candidates and how many it scored."""
    scores: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    classes: Optional[int]
    scored: int


def _select(model, data, n, highest: bool, *, score, class_balanced, batch_size, device,
            curvature_iters, curvature_h, seed, show_progress, candidates, indices, process_group,
            amp=None):
    """The n lowest (``highest``: highest) scores, class-balanced; local or over a process group."""
    checks.positive_int(n, "n")
    k = _check_candidates(candidates, n)
    scoring = _Scoring(score, curvature_iters, curvature_h, seed)
    _check_loader(data)
    opts = checks.run_options(model, device=device, batch_size=batch_size, process_group=process_group,
                              show_progress=show_progress, amp=amp)
    checks.finite_parameters(model)
    sign = -1.0 if highest else 1.0  # the highest scores are the lowest negated ones

    def scored(part, rank_seed, allow_empty):
        s, labels, classes = scoring(model, part, opts, rank_seed, allow_empty)
        return sign * s, labels, classes

    group = opts.group
    if group is None:
        if k is None and indices is None:  # every sample, indices into data: the plain path
            s, labels, classes = scored(data, seed, False)
            return lowest_per_class(s, labels, classes, n, class_balanced)
        count = _count(data)
        ids = torch.arange(count) if indices is None else _global_ids(indices, count)
        span = int(ids.max()) + 1 if ids.numel() else 0
        pos = _candidate_positions(data, ids, k, span, seed)
        s, labels, classes = scored(data if pos is None else subset(data, pos), seed, False)
        return _pick(s, labels, ids if pos is None else ids[pos], classes, n, class_balanced)

    me, state = distributed.rank(group), {}

    def count_part():
        count = _count(data)
        state["ids"] = None if indices is None else _global_ids(indices, count)
        ids = state["ids"]
        return count, (int(ids.max()) if ids is not None and ids.numel() else -1)

    span = None
    if indices is None or k is not None:  # default ids need the offsets; candidates the id span
        infos = distributed.exchange(group, count_part)
        if indices is None:
            offset = sum(c for c, _ in infos[:me])
            state["ids"] = torch.arange(offset, offset + infos[me][0])
            span = sum(c for c, _ in infos)
        else:
            span = max(m for _, m in infos) + 1

    def score_part() -> _RankCandidates:
        ids = state["ids"] if "ids" in state else _global_ids(indices, _count(data))
        pos = _candidate_positions(data, ids, k, span, seed) if k is not None else None
        # curvature draws: a seed per rank (one process would draw other noise anyway)
        s, labels, classes = scored(data if pos is None else subset(data, pos), seed + me, True)
        ids = ids if pos is None else ids[pos]
        keep = _local_candidates(s, labels, ids, classes, n, class_balanced)
        return _RankCandidates(s[keep], labels[keep], ids[keep], classes, s.numel())

    parts = distributed.exchange(group, score_part)
    counts = {p.classes for p in parts if p.classes is not None}
    if len(counts) > 1:
        raise ValueError(f"ranks see different numbers of classes {sorted(counts)}; run the same "
                         "model on every rank")
    total = sum(p.scored for p in parts)
    if n > total:
        raise ValueError(f"n={n} but data has only {total} samples over all ranks; pass n <= {total}")
    return _pick(torch.cat([p.scores for p in parts]), torch.cat([p.labels for p in parts]),
                 torch.cat([p.ids for p in parts]), counts.pop(), n, class_balanced)


def select_trusted(model: nn.Module, data, n: int = 1000, *, score: str = "loss",
                   class_balanced: bool = True, batch_size: int = 256, device=None,
                   curvature_iters: int = 10, curvature_h: float = 1e-3, seed: int = 0,
                   show_progress: Optional[bool] = None, candidates: Optional[int] = None,
                   indices=None, process_group=None, amp=None) -> torch.Tensor:
    """Indices into ``data`` of the ``n`` most trustworthy samples (lowest score).

    Args:
        model: the trained classifier (``(batch, classes)`` logits); not modified.
        data: labelled samples: an (inputs, targets) pair, a Dataset or an unshuffled DataLoader
            yielding (input, target, ...); indices follow its order.
        n: how many samples to keep (≤ the number of samples).
        score: ``"loss"`` (cross-entropy against the given labels) or ``"curvature"``.
        class_balanced: ``n // classes`` lowest-score samples per label; the remainder (and the
            quota of classes with too few samples) goes to the lowest-score samples left, so
            exactly ``n`` are returned.
        curvature_iters, curvature_h, seed: the curvature score's Rademacher draws, step, seed
            (``seed`` also draws the ``candidates`` subset).
        candidates: score only a seeded random subset of this many samples (uniform over the
            dataset; ``None`` = every sample). The lowest-loss 1000 of 50 000 random samples are
            nearly as clean as of a million (``benchmarks/candidates.py``). The subset is
            :func:`candidate_ids` ``(span, candidates, seed)``, ``span`` = the largest global id
            + 1, so it does not depend on how the data is sharded.
        indices: the global ids of ``data``'s samples (default: their positions; in a
            distributed job, the positions in the concatenation of the shards in rank order,
            which :func:`sap_fast.distributed.shard` blocks make the dataset positions). The
            result is given in these ids, and ties in score are broken by them.
        process_group: ``None`` = torch.distributed's default group when it is initialised (else
            local), ``False`` = local, ``True`` or a ``ProcessGroup`` = that group. Distributed:
            ``data`` is this rank's shard (it may be empty); each rank scores its shard and sends
            only its candidates' scores, labels and ids (at most ``2 n``); every rank returns the
            same global ids, those one process gets on the union of the shards (disjoint shards).
            :func:`sap_fast.distributed.local_positions` gives this rank's part. The curvature
            score draws its noise with ``seed + rank``.
        amp: ``"bf16"`` or ``"fp16"``: score under ``torch.autocast`` in that dtype (faster on a
            GPU; the ranking is what matters, and the statistics pass never uses it); None
            (default) runs the model as it is. The loss score only.

    Returns:
        ``torch.LongTensor`` of ``n`` indices (global ids with ``indices=``), ascending.
    """
    return _select(model, data, n, False, score=score, class_balanced=class_balanced,
                   batch_size=batch_size, device=device, curvature_iters=curvature_iters,
                   curvature_h=curvature_h, seed=seed, show_progress=show_progress,
                   candidates=candidates, indices=indices, process_group=process_group, amp=amp)


def select_suspects(model: nn.Module, data, n: int = 1000, *, score: str = "loss",
                    class_balanced: bool = True, batch_size: int = 256, device=None,
                    curvature_iters: int = 10, curvature_h: float = 1e-3, seed: int = 0,
                    show_progress: Optional[bool] = None, candidates: Optional[int] = None,
                    indices=None, process_group=None, amp=None) -> torch.Tensor:
    """Indices into ``data`` of the ``n`` samples most likely mislabeled (highest score): the
    forget set that corrective baselines (SSD, SCRUB, GA, ...) need, the counterpart of
    :func:`select_trusted`. Class balance is by the given (noisy) labels, ``n // classes`` per
    class; the arguments are those of :func:`select_trusted`.

    Returns:
        ``torch.LongTensor`` of ``n`` indices, ascending.
    """
    return _select(model, data, n, True, score=score, class_balanced=class_balanced,
                   batch_size=batch_size, device=device, curvature_iters=curvature_iters,
                   curvature_h=curvature_h, seed=seed, show_progress=show_progress,
                   candidates=candidates, indices=indices, process_group=process_group, amp=amp)

