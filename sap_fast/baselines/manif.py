"""ManiF-SMC: push each forget sample's representation away from the centroid of its nearest
retained neighbours while pulling a neighbour towards it, with a margin from self mode
connectivity (Wang et al., KDD 2026, arXiv 2605.22871; ``docs/methods.md#manif-smc``).

Pre-computation on the original model θ_o (eval mode, no grad): the representation z(x) of every
retain and forget sample, normalised ẑ = z/‖z‖; for each forget sample x_f its k retained
neighbours S_k(x_f) of highest cosine similarity and the centroid c(x_f) = mean of ẑ over S_k
(not re-normalised). Then ``epochs`` passes over shuffled forget mini-batches, in train mode,
Adam (weight decay 0, as the public code), each step minimising

    L = s·max(0, d(z_θ(x_p), c) − d(z_θ(x_f), c) + m)        d = mean squared error,

the clamp applied to the batch mean (code), x_p a positive from S_k(x_f): one member drawn at
random per use (``positive="random"``, paper/rebuttal) or the top-1 neighbour (``"top1"``, code).
Defaults (code): k = 5, s = 0.1 (MNIST), Adam lr 5e-4, batch 16, 1 epoch, fixed margin 0.001.

[INTERPRETATION] (``docs/methods.md#manif-smc``, corrective use): z of an ordinary classifier is
the input of its last ``nn.Linear`` (the one called last in a forward pass: the penultimate
features), flattened, or the input of the module named ``feature_layer``; the method was
designed for MMCR-trained VIB latents, so expect weaker behaviour on a plain classifier.

Margins m (``margin=``):
- ``"smc"`` [INTERPRETATION] (``docs/methods.md#manif-smc``): once per epoch, a quadratic Bézier
  path φ(t) = (1−t)²θ_u + 2t(1−t)w + t²θ_o between the current model θ_u and θ_o; the control
  point w starts at (θ_u+θ_o)/2 and takes ``w_steps`` Adam steps (lr ``w_lr``) of CE on
  mini-batches (``w_batch_size``) of the neighbour union ∪S_k with their own labels, evaluated at
  φ(0.5), θ_u and θ_o frozen, in train mode on a private copy of the buffers (so BN statistics
  are recalibrated for φ(0.5) and the model's own are untouched). Per forget sample
  m_i = d(z_φ(x_f), c) − mean_{x∈S_k} d(z_φ(x), c) at φ(0.5) in eval mode (mean over S_k since
  the positive is drawn per use); a batch uses the mean of its m_i.
- ``"random"`` (public code): m = d(z_c(x_f), c) − d(z_c(x_p), c) at θ_c = ½θ_current + ½w_rand,
  w_rand a freshly initialised model (every submodule's ``reset_parameters``; a parameter of a
  module without one keeps the original model's value), re-drawn every batch, no grad, eval mode
  [INTERPRETATION: eval mode, so the margin pass changes no BN statistics].
- ``"fixed"``: m = ``fixed_margin`` (the ManiF ablation, 0.001).

``with_label=True`` [INTERPRETATION] adds CE(logits(x_p), y_p) with the positive's own label,
scaled by s like the triplet term (the code's ``0.1*H_p_q`` with s = 0.1).
Models are evaluated at a parameter vector with ``torch.func.functional_call`` (no copy per
batch).

Observed on plain classifiers (tests' blobs MLP, 8x8 digits CNN): under Adam, s barely matters
(both terms are scaled by it); since c has norm ≤ 1 while ‖z‖ is large, d is dominated by ‖z‖²
and the step mostly shrinks the positives' norm (d(z_f, c) can fall too, though less: the gap
grows); the label-free loss does not lower the forget set's accuracy before the retain
accuracy collapses, while ``with_label=True`` does (mostly through the CE term).

Data must be indexable per sample: an ``(inputs, targets)`` pair or a map-style Dataset (a
DataLoader's dataset is used, not its order).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, IterableDataset, default_collate

from .._runtime.checks import model_device
from .._runtime.data import is_pair, split_item
from .._runtime.evaluate import classifier_logits
from .._runtime.forward import eval_mode, progress
from ._common import (LabelledBatches, check_choice, check_number, check_positive_int,
                      check_seed, checked_ce, seeded, step, working_copy)

__all__ = ["NAME", "Params", "manif_neighbours", "triplet_loss", "bezier_point", "manif_smc"]

NAME = "manif_smc"
Params = Dict[str, torch.Tensor]


# ---- data with per-sample access -----------------------------------------------------------------

class _Samples:
    """Labelled data gathered by index (positives are picked per forget sample)."""

    def __init__(self, data, what: str, device: torch.device):
        if isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                raise TypeError(f"{NAME}: {what} is a DataLoader over an IterableDataset; "
                                "ManiF needs per-sample access (a pair or a map-style Dataset)")
            data = data.dataset
        # validates the data (None, empty, targets, float inputs) on the in-order pass
        self.batches = LabelledBatches(data, 256, torch.Generator(), NAME, what, shuffle=False,
                                       device=device)
        self.data, self.n, self.what, self.device = data, self.batches.n, what, device

    def get(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if is_pair(self.data):
            x, y = self.data[0][idx], self.data[1][idx]
        else:
            x, y = split_item(default_collate([self.data[int(i)] for i in idx]), self.what)
        return x.to(self.device), y.to(self.device)


# ---- representation ------------------------------------------------------------------------------

class _Features:
    """The representation z (input of one module, flattened) and the logits of a forward pass."""

    def __init__(self, model: nn.Module, feature_layer: Optional[str], sample: torch.Tensor):
        modules = dict(model.named_modules())
        if feature_layer is None:
            order = []
            handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n))
                       for n, m in modules.items() if isinstance(m, nn.Linear)]
            try:
                with eval_mode(model), torch.no_grad():
                    model(sample)
            finally:
                for h in handles:
                    h.remove()
            if not order:
                raise ValueError(f"{NAME}: the model calls no nn.Linear; pass feature_layer= (the "
                                 "name of the module whose input is the representation)")
            feature_layer = order[-1]
        elif not feature_layer or feature_layer not in modules:
            raise ValueError(f"{NAME}: feature_layer={feature_layer!r} is not a submodule name of "
                             "the model (see model.named_modules())")
        self.name, self._z = feature_layer, None
        self._handle = modules[feature_layer].register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self._z = args[0] if args else None

    def __call__(self, model: nn.Module, x: torch.Tensor, params: Optional[Params] = None):
        self._z = None
        out = model(x) if params is None else functional_call(model, params, (x,))
        if self._z is None:
            raise ValueError(f"{NAME}: feature_layer {self.name!r} was not called in the "
                             "forward pass")
        return self._z.flatten(1), classifier_logits(out, f"{NAME}: model output")

    def remove(self):
        self._handle.remove()
        self._z = None  # holds the last graph


@torch.no_grad()
def _encode(model, feats: _Features, samples: _Samples) -> torch.Tensor:
    with eval_mode(model):
        return torch.cat([feats(model, x)[0] for x, _ in samples.batches])


def _neighbours(z_retain: torch.Tensor, z_forget: torch.Tensor, k: int, chunk: int = 1024):
    """S_k (indices into retain, most similar first) and centroids c per forget sample."""
    zr, zf = F.normalize(z_retain, dim=1), F.normalize(z_forget, dim=1)
    idx = torch.cat([torch.topk(part @ zr.T, k, dim=1).indices for part in zf.split(chunk)])
    return idx.cpu(), zr[idx].mean(dim=1)  # indices on the CPU, where the data is gathered


def manif_neighbours(model: nn.Module, retain, forget, *, k: int = 5,
                     feature_layer: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pre-computation of :func:`manif_smc` on ``model`` (eval mode): ``(S, c)`` with
    ``S[i]`` the indices of forget sample i's k nearest retain samples by cosine similarity of
    the representation (most similar first) and ``c[i]`` the mean of their normalised
    representations."""
    k = check_positive_int(NAME, "k", k)
    dev = model_device(model)
    r, f = _Samples(retain, "retain", dev), _Samples(forget, "forget", dev)
    if k > r.n:
        raise ValueError(f"{NAME}: k must be <= the retain size {r.n}, got {k}")
    feats = _Features(model, feature_layer, r.get(torch.arange(1))[0])
    try:
        return _neighbours(_encode(model, feats, r), _encode(model, feats, f), k)
    finally:
        feats.remove()


# ---- the loss and the Bézier path ---------------------------------------------------------------

def triplet_loss(z_forget: torch.Tensor, z_positive: torch.Tensor, centroid: torch.Tensor,
                 margin, scale: float) -> torch.Tensor:
    """s·max(0, d(z_p, c) − d(z_f, c) + m), d = mean squared error over batch and features."""
    gap = F.mse_loss(z_positive, centroid) - F.mse_loss(z_forget, centroid) + margin
    return scale * gap.clamp(min=0)


def bezier_point(theta_u: Params, theta_o: Params, w: Params, t: float) -> Params:
    """φ(t) = (1−t)²θ_u + 2t(1−t)w + t²θ_o, per parameter."""
    a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
    return {n: a * theta_u[n] + b * w[n] + c * theta_o[n] for n in theta_u}


def _per_sample_d(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (z - c).pow(2).mean(dim=1)


def _control_point(model, feats, theta_u: Params, theta_o: Params, buffers: Params,
                   union: torch.Tensor, retain: _Samples, w_steps, w_lr, w_batch_size,
                   gen) -> Params:
    """w of the Bézier path, from (θ_u+θ_o)/2, after ``w_steps`` Adam steps of CE on the
    neighbour union at φ(0.5), θ_u and θ_o frozen (train mode, on the given buffers)."""
    w = {n: ((theta_u[n] + theta_o[n]) / 2).requires_grad_(True) for n in theta_u}
    if w_steps:
        opt = torch.optim.Adam(w.values(), lr=w_lr)
        order = iter(())
        with eval_mode(model):  # restores the flags afterwards
            model.train()
            for _ in range(w_steps):
                b = next(order, None)
                if b is None:  # a fresh shuffle of the union per pass
                    order = iter(union[torch.randperm(union.numel(), generator=gen)]
                                 .split(w_batch_size))
                    b = next(order)
                x, y = retain.get(b)
                _, out = feats(model, x, {**bezier_point(theta_u, theta_o, w, 0.5), **buffers})
                step(opt, checked_ce(NAME, out, y, "retain"), f"{NAME} (SMC control point)")
    return {n: v.detach() for n, v in w.items()}


def _smc_margins(model, feats, theta_o: Params, S, centroids, retain: _Samples,
                 forget: _Samples, w_steps, w_lr, w_batch_size, gen) -> torch.Tensor:
    """Per forget sample: d(z_φ(x_f), c) − mean over S_k of d(z_φ(x), c), at φ(0.5)."""
    theta_u = {n: p.detach().clone() for n, p in model.named_parameters() if n in theta_o}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # the model's stay untouched
    w = _control_point(model, feats, theta_u, theta_o, buffers, torch.unique(S), retain,
                       w_steps, w_lr, w_batch_size, gen)
    with torch.no_grad(), eval_mode(model):
        phi = {**bezier_point(theta_u, theta_o, w, 0.5), **buffers}
        k = S.shape[1]
        margins = []
        for rows in torch.arange(forget.n).split(256):
            zf = feats(model, forget.get(rows)[0], phi)[0]
            zp = feats(model, retain.get(S[rows].flatten())[0], phi)[0]
            c = centroids[rows]
            d_p = _per_sample_d(zp, c.repeat_interleave(k, dim=0)).view(-1, k).mean(dim=1)
            margins.append(_per_sample_d(zf, c) - d_p)
    return torch.cat(margins)


def _random_margin(model, feats, scratch: nn.Module, x_f, x_p, c) -> torch.Tensor:
    for m in scratch.modules():  # a fresh initialisation (global RNG, seeded)
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    rand = dict(scratch.named_parameters())
    mid = {n: (p.detach() + rand[n].detach()) / 2 for n, p in model.named_parameters()}
    with torch.no_grad(), eval_mode(model):
        z_f = feats(model, x_f, mid)[0]
        z_p = feats(model, x_p, mid)[0]
        return F.mse_loss(z_f, c) - F.mse_loss(z_p, c)


# ---- the method ---------------------------------------------------------------------------------

def manif_smc(model: nn.Module, retain, forget, *, k: int = 5, margin: str = "smc",
              scale: float = 0.1, positive: str = "random", with_label: bool = False,
              epochs: int = 1, lr: float = 5e-4, batch_size: int = 16,
              feature_layer: Optional[str] = None, fixed_margin: float = 0.001,
              w_steps: int = 50, w_lr: float = 5e-4, w_batch_size: int = 128, seed: int = 0,
              inplace: bool = False, show_progress: Optional[bool] = None) -> nn.Module:
    """ManiF-SMC unlearning of ``forget`` (labelled; labels unused unless ``with_label``).

    Args:
        k: neighbours per forget sample in S_k (from ``retain``).
        margin: "smc" (adaptive, our reading of the paper), "random" (the public code's random
            midpoint) or "fixed" (``fixed_margin``); see the module docstring.
        scale: s, the loss scale (0.1 MNIST, 0.001 CIFAR in the code).
        positive: "random" (one of S_k per use, paper) or "top1" (code).
        with_label: add s·CE on the positive with its own label.
        epochs, lr, batch_size: the Adam run over forget mini-batches.
        feature_layer: name of the module whose input is z; default the last nn.Linear called.
        w_steps, w_lr, w_batch_size: training of the Bézier control point (margin="smc").
        seed: batch order, positives, random inits and dropout; same seed, same weights on CPU.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        The changed model (a copy unless ``inplace``), in eval mode.
    """
    k = check_positive_int(NAME, "k", k)
    check_choice(NAME, "margin", margin, ("smc", "random", "fixed"))
    check_number(NAME, "scale", scale, low=0)
    check_choice(NAME, "positive", positive, ("random", "top1"))
    if not isinstance(with_label, bool):
        raise TypeError(f"{NAME}: with_label must be a bool, got {type(with_label).__name__}")
    epochs = check_positive_int(NAME, "epochs", epochs)
    check_number(NAME, "lr", lr, low=0)
    batch_size = check_positive_int(NAME, "batch_size", batch_size)
    check_number(NAME, "fixed_margin", fixed_margin, low=0, low_open=False)
    w_steps = int(check_number(NAME, "w_steps", w_steps, low=0, low_open=False, integer=True))
    check_number(NAME, "w_lr", w_lr, low=0)
    w_batch_size = check_positive_int(NAME, "w_batch_size", w_batch_size)
    seed = check_seed(NAME, seed)
    if feature_layer is not None and not isinstance(feature_layer, str):
        raise TypeError(f"{NAME}: feature_layer must be a module name (str) or None, got "
                        f"{type(feature_layer).__name__}")

    model = working_copy(NAME, model, inplace)
    dev = model_device(model)
    retain_s, forget_s = _Samples(retain, "retain", dev), _Samples(forget, "forget", dev)
    if k > retain_s.n:
        raise ValueError(f"{NAME}: k must be <= the retain size {retain_s.n}, got {k}")
    gen = torch.Generator().manual_seed(seed)
    scratch = copy.deepcopy(model) if margin == "random" else None  # before the hook is added
    feats = _Features(model, feature_layer, retain_s.get(torch.arange(1))[0])
    try:
        with seeded(seed, dev):
            S, centroids = _neighbours(_encode(model, feats, retain_s),
                                       _encode(model, feats, forget_s), k)
            theta_o = {n: p.detach().clone() for n, p in model.named_parameters()
                       if p.requires_grad}
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
            for _ in progress(range(epochs), desc=NAME, total=epochs, enabled=show_progress):
                if margin == "smc":
                    m_all = _smc_margins(model, feats, theta_o, S, centroids, retain_s,
                                         forget_s, w_steps, w_lr, w_batch_size, gen)
                model.train()
                for b in torch.randperm(forget_s.n, generator=gen).split(batch_size):
                    col = (torch.zeros(len(b), dtype=torch.long) if positive == "top1"
                           else torch.randint(k, (len(b),), generator=gen))
                    x_f = forget_s.get(b)[0]
                    x_p, y_p = retain_s.get(S[b, col])
                    c = centroids[b]
                    if margin == "fixed":
                        m = fixed_margin
                    elif margin == "smc":
                        m = m_all[b].mean()
                    else:
                        m = _random_margin(model, feats, scratch, x_f, x_p, c)
                    z_f, _ = feats(model, x_f)
                    z_p, out_p = feats(model, x_p)
                    loss = triplet_loss(z_f, z_p, c, m, scale)
                    if with_label:
                        loss = loss + scale * checked_ce(NAME, out_p, y_p, "retain")
                    step(opt, loss, NAME)
    finally:
        feats.remove()
    return model.eval()
