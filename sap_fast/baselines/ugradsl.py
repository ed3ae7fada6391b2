"""UGradSL and UGradSL+: gradient ascent on the forget set with negative label smoothing, mixed
with gradient descent on the retain set (Di et al., arXiv 2406.07698; ``docs/methods.md#ugradsl``).

Generalised label smoothing (GLS) with rate α ∈ (−∞, 1] uses the soft target
ỹ = (1 − α)·e_y + (α/K)·𝟙, i.e. ℓ_GLS = (1 − α)(−log p_y) + α·(1/K)Σ_k(−log p_k); α < 0 is
negative label smoothing (NLS). Each step minimises

    L = β·CE(retain batch) − (1 − β)·GLS(forget batch, α)

with SGD (momentum 0.9, weight decay 5e-4), in train mode. UGradSL loops over the forget
mini-batches, each paired with the next batch of a cycled retain loader (cost ∝ |D_f|);
UGradSL+ loops over the retain mini-batches with the forget set cycled (cost ∝ |D_r|).
A term whose weight is 0 (β = 0 or β = 1) is not computed at all, so β = 1 is plain retain
descent and β = 0, α = 0 is exactly :func:`gradient_ascent` (same forget batches for the same
seed: the forget order has its own generator, seeded like gradient_ascent's).

[UNVERIFIED]: the weighting (the NegGrad+ form β/(1−β) of the SCRUB repo) and all defaults;
the official code was not retrievable. The defaults here are OUR choice, picked on the
8x8-digits demo (25% symmetric noise, 600 trusted / 120 suspects, three noisy models):
α = −1.0 and β = 0.99 (ends of the search lists in docs/methods.md#ugradsl), 10 epochs, and
batch 64 / lr 0.03, which lie outside that search (batch 256, lr ≤ 1e-2): those changed nothing
or lowered test accuracy there. With the defaults UGradSL+ gained 2–12 points of test accuracy; UGradSL (one
step per forget batch) lost 5–8. Tune them on validation data.
α is allowed anywhere in (−∞, 1] (α > 0 is ordinary smoothing, α = 0 plain CE); the method
itself uses α < 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._runtime.checks import model_device
from .._runtime.evaluate import check_targets
from .._runtime.forward import progress
from ._common import (LabelledBatches, check_number, check_sgd, checked_ce,
                      cycled, logits, seeded, sgd, step, working_copy)

__all__ = ["gls_loss", "ugradsl", "ugradsl_plus"]

# The retain order gets its own generator (so the forget order equals gradient_ascent's); any
# fixed offset that keeps the two streams apart will do.
_RETAIN_STREAM = 0x5EED


def gls_loss(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Generalised label smoothing cross-entropy, batch mean:
    (1 − α)(−log p_y) + α·(1/K)Σ_k(−log p_k), for any α ≤ 1 (negative α included).

    Written out directly: a probability-target CE may reject the negative targets of α < 0.
    With α = 0 it is exactly ``F.cross_entropy``.
    """
    smoothing = check_number("gls_loss", "smoothing", smoothing, high=1)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"gls_loss: logits must be a (batch, classes) tensor, got {got}")
    check_targets(y, logits.shape[1], "gls_loss")
    logp = F.log_softmax(logits, dim=1)
    loss = F.nll_loss(logp, y)
    if smoothing == 0:
        return loss
    return (1 - smoothing) * loss + smoothing * (-logp.mean())  # mean over batch and K


def _check(name, smoothing, beta, epochs, lr, momentum, weight_decay, batch_size, max_grad_norm,
           seed):
    check_number(name, "smoothing", smoothing, high=1)
    check_number(name, "beta", beta, low=0, high=1, low_open=False)
    return check_sgd(name, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     batch_size=batch_size, seed=seed, max_grad_norm=max_grad_norm)


def _run(name: str, over_forget: bool, model, retain, forget, smoothing, beta, epochs, lr,
         momentum, weight_decay, batch_size, max_grad_norm, seed, inplace, show_progress):
    epochs, batch_size, seed = _check(name, smoothing, beta, epochs, lr, momentum, weight_decay,
                                      batch_size, max_grad_norm, seed)
    model = working_copy(name, model, inplace)
    dev = model_device(model)
    forget_batches = LabelledBatches(forget, batch_size, torch.Generator().manual_seed(seed),
                                     name, "forget", device=dev)
    retain_batches = LabelledBatches(retain, batch_size,
                                     torch.Generator().manual_seed(seed ^ _RETAIN_STREAM),
                                     name, "retain", device=dev)
    opt = sgd(model, lr, momentum, weight_decay)

    def loss(retain_batch, forget_batch):
        total = 0.0
        if beta > 0:
            x, y = retain_batch
            total = beta * checked_ce(name, logits(model, x), y, "retain")
        if beta < 1:
            x, y = forget_batch
            out = logits(model, x)
            check_targets(y, out.shape[1], f"{name}: forget")
            total = total - (1 - beta) * gls_loss(out, y, smoothing)
        return total

    with seeded(seed, dev):
        model.train()
        for _ in progress(range(epochs), desc=name, total=epochs, enabled=show_progress):
            if over_forget:
                other = cycled(retain_batches) if beta > 0 else None
                for fb in forget_batches:
                    step(opt, loss(next(other) if other else None, fb), name, max_grad_norm)
            else:
                other = cycled(forget_batches) if beta < 1 else None
                for rb in retain_batches:
                    step(opt, loss(rb, next(other) if other else None), name, max_grad_norm)
    return model.eval()


def ugradsl(model: nn.Module, retain, forget, *, smoothing: float = -1.0, beta: float = 0.99,
            epochs: int = 10, lr: float = 0.03, momentum: float = 0.9, weight_decay: float = 5e-4,
            batch_size: int = 64, max_grad_norm: Optional[float] = None, seed: int = 0,
            inplace: bool = False, show_progress: Optional[bool] = None) -> nn.Module:
    """UGradSL: one SGD step per forget mini-batch (paired with a cycled retain batch).

    Args:
        smoothing: the GLS rate α ≤ 1; the method uses α < 0 (negative label smoothing).
        beta: weight of the retain CE in [0, 1]; the forget term gets 1 − β.
        epochs, lr, momentum, weight_decay, batch_size: the SGD run (defaults: our choice, see
            the module docstring).
        max_grad_norm: clip the gradient norm (the ascent is unbounded); None = no clipping.
        seed: batch orders and any dropout; a fixed seed gives the same weights on CPU.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        The changed model (a copy unless ``inplace``), in eval mode.
    """
    return _run("ugradsl", True, model, retain, forget, smoothing, beta, epochs, lr, momentum,
                weight_decay, batch_size, max_grad_norm, seed, inplace, show_progress)


def ugradsl_plus(model: nn.Module, retain, forget, *, smoothing: float = -1.0, beta: float = 0.99,
                 epochs: int = 10, lr: float = 0.03, momentum: float = 0.9,
                 weight_decay: float = 5e-4, batch_size: int = 64,
                 max_grad_norm: Optional[float] = None, seed: int = 0, inplace: bool = False,
                 show_progress: Optional[bool] = None) -> nn.Module:
    """UGradSL+: one SGD step per retain mini-batch (paired with a cycled forget batch); same
    loss and arguments as :func:`ugradsl`.

    Returns:
        The changed model (a copy unless ``inplace``), in eval mode.
    """
    return _run("ugradsl_plus", False, model, retain, forget, smoothing, beta, epochs, lr,
                momentum, weight_decay, batch_size, max_grad_norm, seed, inplace, show_progress)
