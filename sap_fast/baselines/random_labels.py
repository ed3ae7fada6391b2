"""Random Labels (RL): fine-tune with the forget set relabelled at random (Unlearn-Saliency).

Each epoch is one pass over the forget set, every batch given fresh labels drawn uniformly from
all K classes (a draw may equal the given label), then one pass over the retain set with its own
labels: the CIFAR-10 code's loop. Cross-entropy, SGD momentum 0.9, weight decay 5e-4. Defaults:
10 epochs, lr 0.013 (the CIFAR-10 setting), batch 256.

Steps, defaults and sources: ``docs/methods.md#random-labels``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._runtime.checks import model_device
from .._runtime.evaluate import check_targets
from .._runtime.forward import progress
from ._common import (LabelledBatches, check_sgd, checked_ce, logits, num_classes,
                      seeded, sgd, step, working_copy)

__all__ = ["NAME", "random_labels"]

NAME = "random_labels"


def random_labels(model: nn.Module, retain, forget, *, epochs: int = 10, lr: float = 0.013,
                  momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 256,
                  seed: int = 0, inplace: bool = False,
                  show_progress: Optional[bool] = None) -> nn.Module:
    """Fine-tune on ``forget`` with random labels, then on ``retain``, each epoch.

    Returns:
        The changed model (a copy unless ``inplace``), in eval mode.
    """
    epochs, batch_size, seed = check_sgd(NAME, epochs=epochs, lr=lr, momentum=momentum,
                                         weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    model = working_copy(NAME, model, inplace)
    dev = model_device(model)
    classes = num_classes(model, forget, NAME)
    gen = torch.Generator().manual_seed(seed)
    forget_batches = LabelledBatches(forget, batch_size, gen, NAME, "forget", device=dev)
    retain_batches = LabelledBatches(retain, batch_size, gen, NAME, "retain", device=dev)
    opt = sgd(model, lr, momentum, weight_decay)
    with seeded(seed, dev):
        model.train()
        for _ in progress(range(epochs), desc=NAME, total=epochs, enabled=show_progress):
            for x, y in forget_batches:
                check_targets(y, classes, f"{NAME}: forget")  # bad labels fail even if unused
                random = torch.randint(0, classes, y.shape, generator=gen).to(dev)
                step(opt, checked_ce(NAME, logits(model, x), random, "forget"), NAME)
            for x, y in retain_batches:
                step(opt, checked_ce(NAME, logits(model, x), y, "retain"), NAME)
    return model.eval()
