"""SCRUB (Kurmanji et al., NeurIPS 2023, "Towards Unbounded Machine Unlearning"; reference code
github.com/meghdadk/SCRUB, large_scale_unlearning.ipynb and repdistiller's train_distill).

A teacher (a frozen copy of the original model, eval mode) and a student initialised from it
(train mode). With KL_T = T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batch-mean, each epoch
e = 1..epochs:

1. if e ≤ msteps ("max steps"): one pass over the forget set minimising −KL_T (move away from
   the teacher on the forget data; its labels are not used);
2. one pass over the retain set minimising gamma·CE + kd_weight·KL_T;

at the learning rate lr·lr_decay_rate^(number of lr_decay_epochs d with d < e), as the
reference's adjust_learning_rate does (no decay within the default 3 epochs). ``kd_weight`` is
the paper's α (renamed: SAP has its own α).

Defaults: the large-scale CIFAR-10 notebook: SGD lr 5e-4, momentum 0.9, weight decay 5e-4,
3 epochs, msteps 2, gamma 0.99, kd_weight 0.001, T 4, retain batch 128, forget batch 32, decay
epochs (3, 5, 9) × 0.1. The small-scale notebook's setting is ``optimizer="adam", lr=5e-4,
weight_decay=0.1, epochs=10, msteps=3, gamma=1, kd_weight=0.5, temperature=2`` (Adam with L2
weight decay, as torch.optim.Adam; ``momentum`` is then unused).

``msteps`` may be 0 (no max steps) but not above ``epochs``: the extra max steps would never run,
which in a hyperparameter grid only duplicates the ``msteps == epochs`` trial.

Pitfall: the student is in train mode throughout, as in the reference, so BatchNorm running
statistics are updated by the forget-only batches of the max steps too; and too many max steps
destroy accuracy. The first max step starts where the KL is at its minimum (student = teacher,
zero gradient); without BatchNorm (whose train/eval difference separates the two at once) only
weight decay and the retain steps move the student off it, after which the max steps widen the
gap quickly, so results are very sensitive to lr. SCRUB+R (checkpoint selection by forget error)
is not implemented.

Steps, defaults and sources: ``docs/methods.md#scrub``.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .._runtime.checks import model_device
from .._runtime.evaluate import check_targets
from .._runtime.forward import progress
from ._common import (LabelledBatches, check_choice, check_number, check_positive_int, check_seed,
                      checked_ce, distill_kl, logits, seeded, sgd, step, working_copy)

__all__ = ["NAME", "scrub"]

NAME = "scrub"


def _decay_epochs(value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{NAME}: lr_decay_epochs must be a sequence of ints, got "
                        f"{type(value).__name__} {value!r}")
    return tuple(check_positive_int(NAME, "lr_decay_epochs[]", v) for v in value)


def scrub(model: nn.Module, retain, forget, *, epochs: int = 3, msteps: int = 2, lr: float = 5e-4,
          momentum: float = 0.9, weight_decay: float = 5e-4, gamma: float = 0.99,
          kd_weight: float = 0.001, temperature: float = 4.0, retain_batch_size: int = 128,
          forget_batch_size: int = 32, lr_decay_epochs: Sequence[int] = (3, 5, 9),
          lr_decay_rate: float = 0.1, optimizer: str = "sgd",
          max_grad_norm: Optional[float] = None, seed: int = 0, inplace: bool = False,
          show_progress: Optional[bool] = None) -> nn.Module:
    """Distil the original model into a student that stays close on ``retain`` and moves away
    on ``forget`` (both labelled).

    Args:
        epochs: passes over ``retain``; the first ``msteps`` (0..epochs) are preceded by a pass
            over ``forget``.
        lr, momentum, weight_decay, optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        gamma, kd_weight: weights of CE and KL_T in the retain loss (the paper's γ and α).
        temperature: T of the distillation loss (> 0).
        retain_batch_size, forget_batch_size: the two mini-batch sizes.
        lr_decay_epochs, lr_decay_rate: multiply lr by the rate once per listed epoch passed.
        max_grad_norm: clip each step's gradient norm (not in the reference; the max steps
            are unbounded and can diverge at large lr).
        seed: batch order and any dropout; a fixed seed gives the same weights on CPU.
        inplace: change ``model`` itself instead of a copy (the teacher is always a copy).

    Returns:
        The student (a copy unless ``inplace``), in eval mode.
    """
    epochs = check_positive_int(NAME, "epochs", epochs)
    msteps = int(check_number(NAME, "msteps", msteps, low=0, low_open=False, integer=True))
    if msteps > epochs:
        raise ValueError(f"{NAME}: msteps must be <= epochs={epochs} (the extra max steps would "
                         f"never run), got {msteps}")
    check_number(NAME, "lr", lr, low=0)
    check_number(NAME, "momentum", momentum, low=0, high=1, low_open=False, high_open=True)
    check_number(NAME, "weight_decay", weight_decay, low=0, low_open=False)
    check_number(NAME, "gamma", gamma, low=0, low_open=False)
    check_number(NAME, "kd_weight", kd_weight, low=0, low_open=False)
    check_number(NAME, "temperature", temperature, low=0)
    retain_batch_size = check_positive_int(NAME, "retain_batch_size", retain_batch_size)
    forget_batch_size = check_positive_int(NAME, "forget_batch_size", forget_batch_size)
    decay_epochs = _decay_epochs(lr_decay_epochs)
    check_number(NAME, "lr_decay_rate", lr_decay_rate, low=0, high=1)
    check_choice(NAME, "optimizer", optimizer, ("sgd", "adam"))
    if max_grad_norm is not None:
        check_number(NAME, "max_grad_norm", max_grad_norm, low=0)
    seed = check_seed(NAME, seed)

    student = working_copy(NAME, model, inplace)
    teacher = copy.deepcopy(student).eval()  # the original, before any step
    teacher.requires_grad_(False)
    dev = model_device(student)
    gen = torch.Generator().manual_seed(seed)
    forget_batches = LabelledBatches(forget, forget_batch_size, gen, NAME, "forget", device=dev)
    retain_batches = LabelledBatches(retain, retain_batch_size, gen, NAME, "retain", device=dev)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = sgd(student, lr, momentum, weight_decay, params) if optimizer == "sgd" else \
        torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    with seeded(seed, dev):
        student.train()
        for epoch in progress(range(1, epochs + 1), desc=NAME, total=epochs,
                              enabled=show_progress):
            rate = lr * lr_decay_rate ** sum(d < epoch for d in decay_epochs)
            for group in opt.param_groups:
                group["lr"] = rate
            if epoch <= msteps:
                for x, y in forget_batches:
                    out = logits(student, x)
                    check_targets(y, out.shape[1], f"{NAME}: forget")  # unused, still validated
                    with torch.no_grad():
                        target = logits(teacher, x)
                    step(opt, -distill_kl(out, target, temperature), f"{NAME} (forget step)",
                         max_grad_norm)
            for x, y in retain_batches:
                out = logits(student, x)
                with torch.no_grad():
                    target = logits(teacher, x)
                loss = gamma * checked_ce(NAME, out, y, "retain") + \
                    kd_weight * distill_kl(out, target, temperature)
                step(opt, loss, NAME, max_grad_norm)
    return student.eval()
