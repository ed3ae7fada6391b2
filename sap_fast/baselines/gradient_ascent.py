"""Gradient Ascent (GA): maximise the cross-entropy of the forget set (Unlearn-Sparse/SalUn).

Minimises −CE over mini-batches of the forget set, in train mode, SGD momentum 0.9, weight decay
5e-4. Defaults: batch 256, lr 1e-4, 5 epochs (the reference's MultiStepLR milestones 91/136 leave
the rate constant). The ascent is unbounded: ``max_grad_norm`` clips it, and a loss that becomes
non-finite stops the run with an error rather than returning NaN weights.

Steps, defaults and sources: ``docs/methods.md#gradient-ascent``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._runtime.checks import model_device
from .._runtime.forward import progress
from ._common import (LabelledBatches, check_sgd, checked_ce, logits, seeded,
                      sgd, step, working_copy)

__all__ = ["NAME", "gradient_ascent"]

NAME = "gradient_ascent"


def gradient_ascent(model: nn.Module, retain, forget, *, epochs: int = 5, lr: float = 1e-4,
                    momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 256,
                    max_grad_norm: Optional[float] = None, seed: int = 0, inplace: bool = False,
                    show_progress: Optional[bool] = None) -> nn.Module:
    """Gradient ascent on ``forget`` (labelled); ``retain`` is accepted and not used.

    Returns:
        The changed model (a copy unless ``inplace``), in eval mode.
    """
    epochs, batch_size, seed = check_sgd(NAME, epochs=epochs, lr=lr, momentum=momentum,
                                         weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                                         max_grad_norm=max_grad_norm)
    model = working_copy(NAME, model, inplace)
    dev = model_device(model)
    forget_batches = LabelledBatches(forget, batch_size, torch.Generator().manual_seed(seed), NAME,
                                     "forget", device=dev)
    opt = sgd(model, lr, momentum, weight_decay)
    with seeded(seed, dev):
        model.train()
        for _ in progress(range(epochs), desc=NAME, total=epochs, enabled=show_progress):
            for x, y in forget_batches:
                step(opt, -checked_ce(NAME, logits(model, x), y, "forget"), NAME, max_grad_norm)
    return model.eval()
