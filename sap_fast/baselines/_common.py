"""What every baseline shares: hyperparameter checks, the working copy of the model, seeded
shuffled mini-batches of labelled data, the SGD optimiser, and the per-batch training step.

Labelled data is what the rest of the package accepts: an ``(inputs, targets)`` pair of tensors,
a map-style ``Dataset`` yielding ``(input, target, ...)`` (its transforms, e.g. augmentation, run
on every draw), or a ``DataLoader`` (used as is: its own sampler decides the order).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .._runtime import checks
from .._runtime.checks import model_device
from .._runtime.data import is_pair, num_samples, split_item
from .._runtime.evaluate import check_targets, classifier_logits

Batch = Tuple[torch.Tensor, torch.Tensor]


# ---- hyperparameter checks (one line: which method, which argument, what is allowed) ----------

def check_number(method: str, name: str, value, **bounds) -> float:
    """``value`` if it is a finite number in the stated range (:func:`checks.number`)."""
    return checks.number(value, name, where=method, **bounds)


def check_positive_int(method: str, name: str, value) -> int:
    return int(checks.number(value, name, low=1, low_open=False, integer=True, where=method))


def check_seed(method: str, seed) -> int:
    return int(checks.number(seed, "seed", low=0, low_open=False, integer=True, where=method))


def check_choice(method: str, name: str, value, choices) -> str:
    return checks.choice(value, name, choices, where=method)


def check_sgd(method: str, *, epochs, lr, momentum, weight_decay, batch_size, seed,
              max_grad_norm=None) -> tuple:
    """The checks every SGD-trained baseline shares; returns ``(epochs, batch_size, seed)`` as ints."""
    epochs = check_positive_int(method, "epochs", epochs)
    check_number(method, "lr", lr, low=0)
    check_number(method, "momentum", momentum, low=0, high=1, low_open=False, high_open=True)
    check_number(method, "weight_decay", weight_decay, low=0, low_open=False)
    batch_size = check_positive_int(method, "batch_size", batch_size)
    if max_grad_norm is not None:
        check_number(method, "max_grad_norm", max_grad_norm, low=0)
    return epochs, batch_size, check_seed(method, seed)


# ---- the model ---------------------------------------------------------------------------------

def working_copy(method: str, model, inplace: bool = False) -> nn.Module:
    """The model a method may change: a deep copy (the caller's model stays as it was) unless
    ``inplace``. A model in float16/bfloat16 or with no parameters is refused here."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{method}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{method}: the model has no trainable parameters; nothing to unlearn")
    return model if inplace else copy.deepcopy(model)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Seed torch's global RNG (dropout, random init) for the duration; the caller's RNG state is
    restored afterwards, so a method neither depends on nor disturbs it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
        params=None) -> torch.optim.Optimizer:
    """SGD as the unlearning benchmarks configure it (momentum 0.9, weight decay 5e-4)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def step(opt: torch.optim.Optimizer, loss: torch.Tensor, what: str,
         max_grad_norm: Optional[float] = None) -> float:
    """One optimiser step on ``loss``; a non-finite loss stops the run with a one-line error
    (an ascent that diverged) instead of silently writing NaN weights."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{what}: the loss became {value}; lower lr (or epochs) or set "
                                 "max_grad_norm")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    return value


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return classifier_logits(model(x), "model output")


def num_classes(model: nn.Module, data, method: str) -> int:
    """The model's number of outputs, read from one forward pass on the first sample of ``data``."""
    x, _ = next(iter(LabelledBatches(data, 1, torch.Generator(), method, "data", shuffle=False)))
    dev = model_device(model)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return int(logits(model, x.to(dev)).shape[1])
    finally:
        for m, flag in flags:
            m.training = flag


# ---- labelled mini-batches ----------------------------------------------------------------------

class LabelledBatches:
    """Mini-batches ``(x, y)`` of labelled data on the model's device, reshuffled on every pass by
    ``generator`` (tensor pairs and Datasets; a DataLoader keeps its own order)."""

    def __init__(self, data, batch_size: int, generator: torch.Generator, method: str, what: str,
                 shuffle: bool = True, device: Optional[torch.device] = None):
        self.method, self.what = method, what
        if data is None:
            raise ValueError(f"{method}: {what} is None; pass labelled data (an (inputs, targets) "
                             "pair, a Dataset or a DataLoader)")
        if not (is_pair(data) or isinstance(data, (Dataset, DataLoader))) or \
                isinstance(data, IterableDataset):
            raise TypeError(f"{method}: {what} is a {type(data).__name__}; pass an (inputs, targets) "
                            "pair of tensors, a map-style Dataset or a DataLoader")
        n = num_samples(data)
        if n == 0:
            raise ValueError(f"{method}: {what} is empty; pass at least one labelled sample")
        self.data, self.n = data, n
        self.batch_size, self.gen, self.shuffle, self.device = batch_size, generator, shuffle, device

    def __len__(self) -> int:
        if isinstance(self.data, DataLoader):
            return len(self.data)
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        data = self.data
        if is_pair(data):
            inputs, targets = data
            order = torch.randperm(self.n, generator=self.gen) if self.shuffle else torch.arange(self.n)
            items = ((inputs[b], targets[b]) for b in order.split(self.batch_size))
        elif isinstance(data, DataLoader):
            items = (split_item(b, self.what) for b in data)
        else:
            loader = DataLoader(data, batch_size=self.batch_size, shuffle=self.shuffle,
                                generator=self.gen if self.shuffle else None)
            items = (split_item(b, self.what) for b in loader)
        for x, y in items:
            if y is None:
                raise ValueError(f"{self.method}: {self.what} has no targets; pass (inputs, targets)")
            if not x.is_floating_point():
                raise TypeError(f"{self.method}: {self.what} holds {x.dtype} inputs; convert them to "
                                "floating point first (e.g. x.float() / 255)")
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y


def cycled(batches: LabelledBatches) -> Iterator[Batch]:
    """``batches`` without end (a fresh shuffle per pass): pairs a short set with a long one."""
    while True:
        yield from batches


def checked_ce(method: str, out: torch.Tensor, y: torch.Tensor, what: str,
               reduction: str = "mean") -> torch.Tensor:
    check_targets(y, out.shape[1], f"{method}: {what}")
    return F.cross_entropy(out, y, reduction=reduction)


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss T²·KL(softmax(teacher/T) ‖ softmax(student/T)), summed over
    classes and averaged over the batch (repdistiller's DistillKL, used by SCRUB)."""
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True)
    return kl * temperature ** 2 / student.shape[0]
