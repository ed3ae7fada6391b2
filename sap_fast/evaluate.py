"""Accuracy and loss of a classifier on labelled data (the sweep's model-selection metric), and
label-noise diagnostics: what a model does on the clean and corrupted parts of a noisy training
set (:func:`noise_metrics`) and how clean a selected trusted set is (:func:`trusted_set_quality`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .forward import forward_batches, resolve_device


def classifier_logits(out, what: str = "data") -> torch.Tensor:
    """The ``(N, classes)`` logits of a classifier's output (a tensor, or a tuple led by one)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what}: the model returned {shape}; a classifier returning "
                         "(batch, classes) logits is needed here")
    return out


def check_targets(y: torch.Tensor, classes: int, what: str) -> torch.Tensor:
    if y.dtype.is_floating_point or y.dim() != 1:
        raise ValueError(f"{what}: targets must be a 1-D integer class tensor, got "
                         f"{y.dtype} of shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"{what}: targets must lie in [0, {classes}) (the model has {classes} "
                         f"outputs), got range [{int(y.min())}, {int(y.max())}]")
    return y


@dataclass
class Evaluation:
    accuracy: float   # fraction correct, in [0, 1]
    loss: float       # mean cross-entropy
    samples: int


def evaluate(model: nn.Module, data, *, batch_size: int = 256, device=None,
             what: str = "data", show_progress: Optional[bool] = None) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on labelled ``data`` (eval mode, no grad)."""
    correct, loss, n = evaluation_sums(model, data, batch_size=batch_size, device=device, what=what,
                                       show_progress=show_progress)
    return Evaluation(correct / n, loss / n, n)


def evaluation_sums(model: nn.Module, data, *, batch_size: int = 256, device=None, what: str = "data",
                    show_progress: Optional[bool] = None, allow_empty: bool = False):
    """``(correct, summed cross-entropy, samples)`` over ``data``: the sums that shards add up."""
    dev = resolve_device(model, device)
    correct, loss, n = 0, 0.0, 0
    for _, y, out in forward_batches(model, data, batch_size=batch_size, device=dev,
                                     need_targets=True, what=what, desc="evaluate",
                                     show_progress=show_progress, allow_empty=allow_empty):
        logits = classifier_logits(out, what)
        y = check_targets(y, logits.shape[1], what)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits.double(), y, reduction="sum"))
        n += y.numel()
    return correct, loss, n


def _label_tensor(y, what: str) -> torch.Tensor:
    """``y`` as a 1-D CPU int64 tensor (from a tensor or a sequence of ints), with one-line errors."""
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{what} must be a 1-D tensor of integers, got {type(y).__name__}; "
                             "wrap it with torch.as_tensor(..., dtype=torch.long)") from None
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D tensor of integers, got {y.dtype} of shape "
                         f"{tuple(y.shape)}; pass class indices / sample indices (e.g. y.long())")
    return y.detach().to("cpu", torch.long)


def _mask_tensor(mask, what: str, n: Optional[int] = None) -> torch.Tensor:
    """``mask`` as a 1-D CPU bool tensor, optionally of length ``n``."""
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError):
            mask = None
    if mask is None or mask.dtype != torch.bool or mask.dim() != 1:
        shape = "" if mask is None else f" ({mask.dtype} of shape {tuple(mask.shape)})"
        raise ValueError(f"{what} must be a 1-D bool mask, one entry per training sample{shape}; "
                         "pass the mask returned by the noise function")
    if n is not None and mask.numel() != n:
        raise ValueError(f"{what} has {mask.numel()} entries but there are {n} samples; pass the "
                         "mask returned together with these labels")
    return mask.detach().to("cpu")


def _fraction(num: int, den: int) -> Optional[float]:
    """``num / den``, or None (JSON null) when the part is empty."""
    return num / den if den else None


def noise_metrics(model: nn.Module, inputs, noisy_labels, clean_labels, corrupted, *,
                  batch_size: int = 256, device=None,
                  show_progress: Optional[bool] = None) -> Dict[str, Any]:
    """How a model trained on noisy labels behaves on the clean and corrupted training samples.

    One forward pass (eval mode, no grad, every module's training flag restored) over
    ``inputs``, whose samples must be in the same order as the labels: a tensor, an
    (inputs, targets) pair (targets ignored), a Dataset or an *unshuffled* DataLoader.
    ``corrupted`` must be True exactly where ``noisy_labels != clean_labels`` (as returned by
    the functions of :mod:`sap_fast.noise`).

    Returns a JSON-ready dict (accuracies are fractions in [0, 1], or None for an empty part):

    - ``samples``, ``clean_samples``, ``corrupted_samples``: counts;
    - ``clean_accuracy``: accuracy on the uncorrupted samples (noisy label = clean label);
      ``clean_correct`` its count;
    - ``memorised``: share of corrupted samples predicted as their *noisy* label (accuracy
      on the corrupted part w.r.t. the noisy labels); ``memorised_count`` its count;
    - ``recovered``: share of corrupted samples predicted as their *clean* label (accuracy on
      the corrupted part w.r.t. the clean labels); ``recovered_count`` its count;
    - ``noisy_label_accuracy`` / ``clean_label_accuracy``: accuracy on all samples w.r.t. the
      noisy / the clean labels.
    """
    noisy = _label_tensor(noisy_labels, "noisy_labels")
    clean = _label_tensor(clean_labels, "clean_labels")
    if noisy.numel() != clean.numel():
        raise ValueError(f"noisy_labels has {noisy.numel()} entries but clean_labels has "
                         f"{clean.numel()}; pass both label vectors of the same training set")
    mask = _mask_tensor(corrupted, "corrupted", noisy.numel())
    changed = noisy != clean
    if not torch.equal(changed, mask):
        bad = int((changed != mask).sum())
        raise ValueError(f"corrupted must be True exactly where noisy_labels != clean_labels, "
                         f"but {bad} entries disagree; pass the mask returned with these labels")
    if isinstance(inputs, torch.utils.data.DataLoader) and \
            isinstance(inputs.sampler, torch.utils.data.RandomSampler):
        raise ValueError("inputs is a shuffling DataLoader, so predictions would not line up with "
                         "the labels; pass one with shuffle=False")

    dev = resolve_device(model, device)
    preds = []
    for _, _, out in forward_batches(model, inputs, batch_size=batch_size, device=dev,
                                     what="inputs", desc="noise metrics",
                                     show_progress=show_progress):
        logits = classifier_logits(out, "inputs")
        preds.append(logits.argmax(1).cpu())
        classes = logits.shape[1]
    pred = torch.cat(preds)
    if pred.numel() != noisy.numel():
        raise ValueError(f"inputs holds {pred.numel()} samples but there are {noisy.numel()} "
                         "labels; pass the training inputs the labels belong to")
    check_targets(noisy, classes, "noisy_labels")
    check_targets(clean, classes, "clean_labels")

    hit_noisy, hit_clean = pred == noisy, pred == clean
    n, n_corrupted = noisy.numel(), int(mask.sum())
    n_clean = n - n_corrupted
    clean_correct = int(hit_noisy[~mask].sum())
    memorised = int(hit_noisy[mask].sum())
    recovered = int(hit_clean[mask].sum())
    return {
        "samples": n,
        "clean_samples": n_clean,
        "corrupted_samples": n_corrupted,
        "clean_correct": clean_correct,
        "memorised_count": memorised,
        "recovered_count": recovered,
        "clean_accuracy": _fraction(clean_correct, n_clean),
        "memorised": _fraction(memorised, n_corrupted),
        "recovered": _fraction(recovered, n_corrupted),
        "noisy_label_accuracy": int(hit_noisy.sum()) / n,
        "clean_label_accuracy": int(hit_clean.sum()) / n,
    }


def trusted_set_quality(indices, corrupted) -> Dict[str, Any]:
    """How many of the selected (trusted) samples carry a corrupted label.

    Args:
        indices: 1-D integer tensor (or sequence) of distinct positions in the training set,
            e.g. the output of :func:`sap_fast.select_trusted`.
        corrupted: 1-D bool mask over the whole training set (True = label corrupted).

    Returns a JSON-ready dict: ``selected``, ``corrupted`` (count), ``corrupted_fraction``,
    ``clean`` (count), and ``base_corrupted_fraction`` (the corrupted share of the whole
    training set, what a random selection would get on average).
    """
    idx = _label_tensor(indices, "indices")
    mask = _mask_tensor(corrupted, "corrupted")
    n = mask.numel()
    if idx.numel() == 0:
        raise ValueError("indices is empty; select at least one sample")
    if n == 0:
        raise ValueError("corrupted is empty; pass the mask over the whole training set")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"indices must lie in [0, {n}) (the training set has {n} samples), got "
                         f"range [{lo}, {hi}]; pass positions into the same training set")
    if torch.unique(idx).numel() != idx.numel():
        dup = idx.numel() - torch.unique(idx).numel()
        raise ValueError(f"indices holds {dup} duplicate(s); pass each selected sample once "
                         "(e.g. torch.unique(indices))")
    k = int(mask[idx].sum())
    return {
        "selected": idx.numel(),
        "corrupted": k,
        "corrupted_fraction": k / idx.numel(),
        "clean": idx.numel() - k,
        "base_corrupted_fraction": int(mask.sum()) / n,
    }
