"""Synthetic label noise, as in the SAP experiments (methods.md section 8).

Symmetric noise: exactly ``floor(rate * N)`` samples, picked uniformly without replacement, each
get a label drawn uniformly from the ``K - 1`` *other* classes, so every picked sample is truly
wrong. The corruption is a pure function of ``(labels, rate, num_classes, seed)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["symmetric_noise"]


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"labels must be a torch.Tensor, got {type(labels).__name__}; "
            "wrap them with torch.as_tensor(labels, dtype=torch.long)"
        )
    if labels.dim() != 1:
        raise ValueError(
            f"labels must be 1-D (one class index per sample), got shape {tuple(labels.shape)}; "
            "pass class indices, not one-hot rows (use labels.argmax(1))"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must have an integer dtype, got {labels.dtype}; convert with labels.long()"
        )
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, "
                f"found values in [{lo}, {hi}]; fix num_classes or remap the labels"
            )


def symmetric_noise(
    labels: torch.Tensor, rate: float, num_classes: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt exactly ``floor(rate * N)`` labels, each to a different class.

    Args:
        labels: 1-D integer tensor of clean class indices in ``[0, num_classes)``. Not modified.
        rate: fraction of samples to corrupt, in ``[0, 1)``.
        num_classes: number of classes ``K`` (at least 2).
        seed: seed of the private ``torch.Generator``; the global RNG is not touched.

    Returns:
        ``(noisy_labels, corrupted)``: a new int64 tensor of labels on ``labels``' device and a
        bool mask, ``True`` exactly where the label was changed.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise ValueError(f"rate must be a finite number in [0, 1), got {rate!r}")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(
            f"rate must be in [0, 1) (a fraction, e.g. 0.25 for 25%), got {rate!r}"
        )
    _check_labels(labels, num_classes)

    n = labels.numel()
    n_noisy = math.floor(float(rate) * n)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen)[:n_noisy]
    # An offset in [1, K-1] added modulo K is uniform over the K-1 other classes.
    offset = torch.randint(1, num_classes, (n_noisy,), generator=gen)

    clean = labels.detach().to("cpu", torch.long)
    noisy = clean.clone()
    noisy[idx] = (clean[idx] + offset) % num_classes
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[idx] = True
    return noisy.to(labels.device), corrupted.to(labels.device)
