"""Accuracy and loss of a classifier on labelled data: the sweep's model-selection metric."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .forward import forward_batches


__all__ = ["classifier_logits", "check_targets", "Evaluation", "EvaluationSums", "evaluate",
           "evaluation_sums", "finite_scores", "non_finite_logits"]


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


class EvaluationSums(NamedTuple):
    """What shards of the data add up: correct predictions, summed cross-entropy, samples."""
    correct: int
    loss: float
    samples: int


def evaluate(model: nn.Module, data, *, batch_size: int = 256, device=None,
             what: str = "data", show_progress: Optional[bool] = None, amp=None,
             desc: str = "evaluate") -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on labelled ``data`` (eval mode, no grad).
    ``amp``: ``"bf16"``/``"fp16"`` runs the forward passes under autocast (None: as the model is);
    ``desc``: the progress bar's label."""
    opts = checks.run_options(model, device=device, batch_size=batch_size, process_group=False,
                              show_progress=show_progress, amp=amp)
    checks.finite_parameters(model)
    correct, loss, n = evaluation_sums(model, data, opts.batch_size, opts.device, what=what,
                                       show_progress=opts.show_progress, amp=opts.amp, desc=desc)
    return Evaluation(correct / n, loss / n, n)


def evaluation_sums(model: nn.Module, data, batch_size: int, device: torch.device, *,
                    what: str = "data", show_progress: Optional[bool] = None, allow_empty: bool = False,
                    amp: Optional[torch.dtype] = None, desc: str = "evaluate") -> EvaluationSums:
    """:class:`EvaluationSums` over ``data`` (arguments resolved by the caller). A sample whose
    logits hold NaN/Inf is a :class:`~sap_fast._runtime.checks.NonFiniteSample` naming ``desc``
    (the stage) and its position; the check rides on the batch's loss, read anyway."""
    correct, loss, n = 0, 0.0, 0
    for _, y, out in forward_batches(model, data, batch_size=batch_size, device=device,
                                     need_targets=True, what=what, desc=desc,
                                     show_progress=show_progress, allow_empty=allow_empty, amp=amp):
        logits = classifier_logits(out, what)
        y = check_targets(y, logits.shape[1], what)
        correct += int((logits.argmax(1) == y).sum())
        batch_loss = F.cross_entropy(logits.double(), y, reduction="sum")
        batch_loss = float(torch.where(torch.isfinite(logits).all(), batch_loss, math.nan))
        if not math.isfinite(batch_loss):
            raise non_finite_logits(logits, n, desc, what, amp)
        loss += batch_loss
        n += y.numel()
    return EvaluationSums(correct, loss, n)


def finite_scores(scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``scores`` (one per sample) where the sample's logits are all finite, NaN elsewhere: a
    sample's score is then finite exactly when its logits are (no host read)."""
    return torch.where(torch.isfinite(logits).all(1), scores, math.nan)


def non_finite_logits(logits: torch.Tensor, start: int, stage: str, what: str,
                      amp: Optional[torch.dtype] = None) -> checks.NonFiniteSample:
    """The error for a batch (its first sample at position ``start``) with non-finite logits."""
    rows = (~torch.isfinite(logits).all(1)).nonzero().flatten()
    first = int(rows[0]) if rows.numel() else 0
    hint = ("; under fp16 autocast, logits beyond its range (65504) overflow: try amp='bf16'"
            if amp == torch.float16 else "")
    return checks.NonFiniteSample(stage, start + first, what, hint=hint)
