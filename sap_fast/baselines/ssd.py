"""SSD, Selective Synaptic Dampening (Foster et al., AAAI 2024; reference code
github.com/if-loops/selective-synaptic-dampening, src/ssd.py). No training.

1. The importance of every parameter element for a labelled set S is the mean over mini-batches
   of the squared gradient of the batch-mean cross-entropy (eval mode): a squared mini-batch
   gradient, not a per-sample Fisher. It is computed on D (all training data) and on D_f.
2. Elements with ``imp_f > selection_weighting * imp_D`` are selected.
3. A selected element is multiplied by ``min(dampening_constant * imp_D / imp_f, 1)``; all other
   elements, frozen parameters (``requires_grad=False``) and buffers (e.g. BatchNorm running
   statistics) are left as they are.

Names: the paper's α is ``selection_weighting`` and its λ ``dampening_constant``, as in the
reference code (α would clash with SAP's α). Defaults are the paper's ResNet-18 setting: α=10,
λ=1, batch 128 (the paper used α=5 for ViT full-class forgetting, α=50, λ=0.1 for faces).

D: the reference uses the full training set; here D defaults to retain ∪ forget, iterated as the
retain batches followed by the forget batches, the same batch size for both (the reference
batches the concatenation, so its one boundary batch mixes the two; that the SAP paper's D was
this union is [UNVERIFIED], see docs/methods.md#ssd). Pass ``full_train`` to use other data.
Importance magnitudes depend on the batch size, hence one batch size for D and D_f. Batches are
in data order as in the reference (``shuffle=True`` reshuffles them with ``seed``).

A consequence worth knowing: because D contains D_f, ``imp_f / imp_D`` can never exceed
(#batches of D) / (#batches of D_f), so with ``selection_weighting`` at or above that ratio
nothing is selected and the model comes back unchanged (a warning says so). With SAP's corrective
budgets (retain 5000, forget 1000, batch 128: 48/8 = 6) the default α=10 is such a case. And
when the model has memorised its training data, the low-loss retain set adds almost no gradient,
so nearly every element the forget set touches sits at that bound: selection is then
all-or-nothing in α, and λ alone sets how much those elements shrink.

``importance="lf"`` is the label-free variant LFSSD (Foster et al., ICLR 2024 Tiny Paper): the
importance is the mean over batches of ``|∂ mean_i ‖f(x_i)‖² / ∂θ|`` (logits, no labels used).
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._runtime.checks import model_device
from .._runtime.evaluate import check_targets
from .._runtime.forward import progress
from ._common import (LabelledBatches, check_choice, check_number, check_positive_int, check_seed,
                      logits, working_copy)

__all__ = ["NAME", "ssd"]

NAME = "ssd"


def _importance(model: nn.Module, params: List[nn.Parameter], batch_lists, kind: str,
                desc: str, show_progress: Optional[bool]) -> List[torch.Tensor]:
    """Mean over all batches of ``batch_lists`` of the squared CE gradient (``"ce"``) or the
    absolute gradient of the mean squared logit norm (``"lf"``), per parameter element."""
    imp = [torch.zeros_like(p) for p in params]
    count = 0
    total = sum(len(b) for b in batch_lists)
    batches = (xy for b in batch_lists for xy in b)
    for x, y in progress(batches, desc=desc, total=total, enabled=show_progress, unit="batch"):
        out = logits(model, x)
        if kind == "ce":
            check_targets(y, out.shape[1], f"{NAME}: {desc}")
            loss = F.cross_entropy(out, y)
        else:
            loss = out.pow(2).sum(1).mean()
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{NAME}: the {desc} loss is {float(loss)}; the model "
                                     "outputs non-finite values")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(imp, grads):
            if g is not None:  # an unused parameter has zero importance
                acc.add_(g.pow(2) if kind == "ce" else g.abs())
        count += 1
    for acc in imp:
        acc.div_(count)
    return imp


def ssd(model: nn.Module, retain, forget, *, selection_weighting: float = 10.0,
        dampening_constant: float = 1.0, batch_size: int = 128, importance: str = "ce",
        full_train=None, shuffle: bool = False, seed: int = 0, inplace: bool = False,
        show_progress: Optional[bool] = None) -> nn.Module:
    """Dampen the parameters that matter much more to ``forget`` than to all training data.

    Args:
        retain, forget: labelled data; D = retain ∪ forget unless ``full_train`` is given.
        selection_weighting: α, select elements with imp_forget > α·imp_D (> 0).
        dampening_constant: λ, a selected element is scaled by min(λ·imp_D/imp_forget, 1) (> 0).
        batch_size: mini-batch size for both importances.
        importance: ``"ce"`` (SSD: squared CE gradients) or ``"lf"`` (LFSSD: absolute gradients
            of the squared logit norm; labels unused).
        full_train: labelled data to use as D instead of retain ∪ forget (e.g. the whole
            training set, as in the reference).
        shuffle: reshuffle each set's batches with ``seed`` (default: data order).
        seed: the shuffle; without ``shuffle`` the result does not depend on it.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        The dampened model (a copy unless ``inplace``), in eval mode.
    """
    check_number(NAME, "selection_weighting", selection_weighting, low=0)
    check_number(NAME, "dampening_constant", dampening_constant, low=0)
    batch_size = check_positive_int(NAME, "batch_size", batch_size)
    check_choice(NAME, "importance", importance, ("ce", "lf"))
    if not isinstance(shuffle, bool):
        raise TypeError(f"{NAME}: shuffle must be a bool, got {type(shuffle).__name__} {shuffle!r}")
    seed = check_seed(NAME, seed)
    model = working_copy(NAME, model, inplace)
    dev = model_device(model)
    gen = torch.Generator().manual_seed(seed)

    def batches(data, what):
        return LabelledBatches(data, batch_size, gen, NAME, what, shuffle=shuffle, device=dev)

    forget_b = batches(forget, "forget")
    full = [batches(full_train, "full_train")] if full_train is not None else \
        [batches(retain, "retain"), forget_b]
    ratio = sum(len(b) for b in full) / len(forget_b)
    if full_train is None and selection_weighting >= ratio:
        warnings.warn(f"{NAME}: selection_weighting={selection_weighting:g} >= {ratio:g} = "
                      "(#batches of retain+forget) / (#batches of forget), so no parameter can be "
                      "selected and the model is unchanged; lower it or pass full_train",
                      stacklevel=2)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    model.eval()
    imp_d = _importance(model, params, full, importance, "D", show_progress)
    imp_f = _importance(model, params, [forget_b], importance, "forget", show_progress)
    with torch.no_grad():
        for p, d, f in zip(params, imp_d, imp_f):
            chosen = f > selection_weighting * d  # implies f > 0: no division by zero below
            beta = (dampening_constant * d[chosen] / f[chosen]).clamp_(max=1.0)
            p[chosen] = p[chosen] * beta
    return model.eval()

