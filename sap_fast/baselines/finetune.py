"""Finetune: train the noisy model further on the trusted (retain) set only (SAP paper baseline).

No forget set. Cross-entropy, SGD (momentum 0.9, weight decay 5e-4). The epochs and learning rate
of the SAP paper's runs are not public; the defaults are the common reference (10 epochs, lr
0.01, as in Unlearn-Sparse and the SCRUB notebooks). With ``val`` given, the epoch with the best
validation accuracy is kept, as the SAP paper's protocol does.

Steps, defaults and sources: ``docs/methods.md#finetune``.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .._runtime.checks import model_device
from .._runtime.evaluate import evaluate
from .._runtime.forward import progress
from ._common import LabelledBatches, check_sgd, checked_ce, logits, seeded, sgd, step, working_copy

__all__ = ["NAME", "finetune"]

NAME = "finetune"


def finetune(model: nn.Module, retain, forget=None, *, epochs: int = 10, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 64,
             val=None, seed: int = 0, inplace: bool = False,
             show_progress: Optional[bool] = None) -> nn.Module:
    """Fine-tune ``model`` on ``retain`` (labelled; ``forget`` is accepted and ignored).

    Args:
        epochs, lr, momentum, weight_decay, batch_size: the SGD run.
        val: labelled validation data; if given, the epoch with the best validation accuracy
            (ties: lower loss; the starting model counts as epoch 0) is returned.
        seed: batch order and any dropout; a fixed seed gives the same weights on CPU.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        The fine-tuned model (a copy unless ``inplace``), in eval mode.
    """
    epochs, batch_size, seed = check_sgd(NAME, epochs=epochs, lr=lr, momentum=momentum,
                                         weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    model = working_copy(NAME, model, inplace)
    dev = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    retain_batches = LabelledBatches(retain, batch_size, gen, NAME, "retain", device=dev)
    opt = sgd(model, lr, momentum, weight_decay)

    def score():
        e = evaluate(model, val, what=f"{NAME}: val", show_progress=False)
        return (e.accuracy, -e.loss)

    best = (score(), copy.deepcopy(model.state_dict())) if val is not None else None
    with seeded(seed, dev):
        for _ in progress(range(epochs), desc=NAME, total=epochs, enabled=show_progress):
            model.train()
            for x, y in retain_batches:
                step(opt, checked_ce(NAME, logits(model, x), y, "retain"), NAME)
            if best is not None:
                s = score()
                if s > best[0]:
                    best = (s, copy.deepcopy(model.state_dict()))
    if best is not None:
        model.load_state_dict(best[1])
    return model.eval()
