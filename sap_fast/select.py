"""Stage 1: the trusted samples — the lowest-loss (or lowest input-curvature) samples per class —
and their counterpart, the suspected mislabeled samples (highest score) that baselines forget.

``score="loss"``: per-sample cross-entropy against the (noisy) labels, eval mode.
``score="curvature"``: the official code's score, mean_j ‖∇ₓℓ(x + h vⱼ) − ∇ₓℓ(x)‖₂ over
Rademacher vⱼ, with per-sample (sum-reduced) losses rather than the official batch mean, which
inflated the scores of the last, smaller batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import batches
from .evaluate import check_targets, classifier_logits
from .forward import check_batch_size, eval_mode, forward_batches, resolve_device

SCORES = ("loss", "curvature")


def _loss_scores(model, data, batch_size, device, show_progress):
    scores, labels = [], []
    for _, y, out in forward_batches(model, data, batch_size=batch_size, device=device,
                                     need_targets=True, what="data", desc="scoring",
                                     show_progress=show_progress):
        logits = classifier_logits(out)
        y = check_targets(y, logits.shape[1], "data")
        scores.append(F.cross_entropy(logits.double(), y, reduction="none").cpu())
        labels.append(y.cpu())
    return torch.cat(scores), torch.cat(labels), logits.shape[1]


def _curvature_scores(model, data, batch_size, device, iters, h, seed, show_progress):
    # forward_batches validates the data and locates failures; gradients need our own loop
    for _ in forward_batches(model, data, batch_size=batch_size, device=device, need_targets=True,
                             what="data", desc="checking", show_progress=False):
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
            scores.append(total / iters)
            labels.append(y.cpu())
    return torch.cat(scores), torch.cat(labels), classes


def _check_loader(data) -> None:
    if isinstance(data, torch.utils.data.DataLoader) and \
            isinstance(data.sampler, torch.utils.data.RandomSampler):
        raise ValueError("data is a shuffling DataLoader, so indices would be meaningless; "
                         "pass one with shuffle=False")


def _scores(model, data, score, batch_size, device, curvature_iters, curvature_h, seed, show_progress):
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    check_batch_size(batch_size)
    _check_loader(data)
    dev = resolve_device(model, device)
    if score == "loss":
        return _loss_scores(model, data, batch_size, dev, show_progress)
    if curvature_iters < 1 or not curvature_h > 0:
        raise ValueError("curvature_iters must be >= 1 and curvature_h > 0")
    return _curvature_scores(model, data, batch_size, dev, curvature_iters, curvature_h, seed,
                             show_progress)


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return n


def lowest_per_class(scores: torch.Tensor, labels: torch.Tensor, classes: int, n: int,
                     class_balanced: bool = True) -> torch.Tensor:
    """Ascending indices of the ``n`` lowest ``scores``: ``n // classes`` per label when
    ``class_balanced``, the remainder (and the quota of classes with too few samples) going to
    the lowest scores left, so that exactly ``n`` come back. Ties keep data order."""
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


def select_trusted(model: nn.Module, data, n: int = 1000, *, score: str = "loss",
                   class_balanced: bool = True, batch_size: int = 256, device=None,
                   curvature_iters: int = 10, curvature_h: float = 1e-3, seed: int = 0,
                   show_progress: Optional[bool] = None) -> torch.Tensor:
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
        curvature_iters, curvature_h, seed: the curvature score's Rademacher draws, step, seed.

    Returns:
        ``torch.LongTensor`` of ``n`` indices, ascending.
    """
    _check_n(n)
    scores, labels, classes = _scores(model, data, score, batch_size, device, curvature_iters,
                                      curvature_h, seed, show_progress)
    return lowest_per_class(scores, labels, classes, n, class_balanced)


def select_suspects(model: nn.Module, data, n: int = 1000, *, score: str = "loss",
                    class_balanced: bool = True, batch_size: int = 256, device=None,
                    curvature_iters: int = 10, curvature_h: float = 1e-3, seed: int = 0,
                    show_progress: Optional[bool] = None) -> torch.Tensor:
    """Indices into ``data`` of the ``n`` samples most likely mislabeled (highest score): the
    forget set that corrective baselines (SSD, SCRUB, GA, ...) need, the counterpart of
    :func:`select_trusted`. Class balance is by the given (noisy) labels, ``n // classes`` per
    class; the arguments are those of :func:`select_trusted`.

    Returns:
        ``torch.LongTensor`` of ``n`` indices, ascending.
    """
    _check_n(n)
    scores, labels, classes = _scores(model, data, score, batch_size, device, curvature_iters,
                                      curvature_h, seed, show_progress)
    # the highest scores are the lowest negated ones; a stable sort keeps data order on ties
    return lowest_per_class(-scores, labels, classes, n, class_balanced)
