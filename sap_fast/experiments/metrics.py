"""How a correction did: label-noise diagnostics and the classic machine-unlearning metrics.

Label noise: what a model does on the clean and corrupted parts of a noisy training set
(:func:`noise_metrics`), and how clean a selected trusted set is (:func:`trusted_set_quality`).

Unlearning, for judging privacy-forgetting methods on their own task. For a forget set D_f
removed from the training set (retain set D_r) and a test set D_test (the Unlearn-Sparse / SalUn /
UGradSL convention, ``docs/methods.md#unlearning-metrics``), in percent:

- UA  = 100 − accuracy on D_f   (unlearning accuracy: higher = more forgotten)
- RA  = accuracy on D_r
- TA  = accuracy on D_test
- MIA = share of D_f that a membership-inference attacker calls "non-member" (MIA-Efficacy)

The attacker is fit with the first |D_test| retain samples as members and D_test as
non-members. ``attack="loss"`` (default): a threshold on the per-sample loss, the one that best
separates the two (balanced accuracy); ``attack="svc"``: the SalUn code's RBF SVM (C=3,
gamma="auto") on the probability of the true label (needs scikit-learn). Methods are judged by
their distance to a model retrained on D_r alone: :func:`avg_gap`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._runtime.checks import model_device, run_options
from .._runtime.evaluate import check_targets, classifier_logits
from .._runtime.forward import forward_batches

__all__ = ["ATTACKS", "KEYS", "per_sample", "loss_threshold", "mia_efficacy", "unlearning_metrics",
           "avg_gap", "noise_metrics", "trusted_set_quality"]

ATTACKS = ("loss", "svc")
KEYS = ("UA", "RA", "TA", "MIA")


def per_sample(model: nn.Module, data, what: str, batch_size: int = 256):
    """``(loss, correct, p_true)`` per sample: float64 cross-entropy, arg-max hit, true-class probability."""
    dev = model_device(model)
    losses, hits, probs = [], [], []
    for _, y, out in forward_batches(model, data, batch_size=batch_size, device=dev, need_targets=True,
                                     what=what, desc=what, show_progress=False):
        logits = classifier_logits(out, what).double()
        y = check_targets(y, logits.shape[1], what)
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
        hits.append((logits.argmax(1) == y).cpu())
        probs.append(logits.softmax(1).gather(1, y[:, None]).squeeze(1).cpu())
    return torch.cat(losses), torch.cat(hits), torch.cat(probs)


def loss_threshold(member: torch.Tensor, nonmember: torch.Tensor) -> float:
    """The loss threshold t ("member" iff loss ≤ t) with the best balanced accuracy; ties → lowest t."""
    candidates = torch.unique(torch.cat([member, nonmember]))
    m = torch.sort(member).values
    q = torch.sort(nonmember).values
    # balanced accuracy × 2·|m|·|q| in integers, so equal scores tie exactly
    tp = torch.searchsorted(m, candidates, right=True)
    tn = q.numel() - torch.searchsorted(q, candidates, right=True)
    scores = tp * q.numel() + tn * m.numel()
    # "everything is a non-member" (t below every loss) is a candidate too, and first
    scores = torch.cat([torch.tensor([q.numel() * m.numel()]), scores])
    best = int(torch.argmax(scores))  # the first maximum: the lowest threshold
    return float("-inf") if best == 0 else float(candidates[best - 1])


def _attack(retain, test, forget, attack: str) -> float:
    """MIA-Efficacy from ``per_sample`` results of the three sets."""
    r_loss, _, r_prob = retain
    t_loss, _, t_prob = test
    f_loss, _, f_prob = forget
    n = min(r_loss.numel(), t_loss.numel())  # balanced classes, as the reference does
    if attack == "loss":
        t = loss_threshold(r_loss[:n], t_loss[:n])
        return float((f_loss > t).double().mean())
    try:
        from sklearn.svm import SVC
    except ImportError:
        raise ImportError("attack='svc' needs scikit-learn: pip install scikit-learn "
                          "(or use attack='loss')") from None
    x = torch.cat([r_prob[:n], t_prob[:n]]).numpy()[:, None]
    y = torch.cat([torch.ones(n), torch.zeros(n)]).numpy()
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float((clf.predict(f_prob.numpy()[:, None]) == 0).mean())


def _check_attack(attack: str) -> str:
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    return attack


def mia_efficacy(model: nn.Module, retain, forget, test, *, attack: str = "loss",
                 batch_size: int = 256) -> float:
    """Share of ``forget`` (in [0, 1]) that the attacker calls non-member (see the module doc)."""
    _check_attack(attack)
    return _attack(per_sample(model, retain, "retain", batch_size), per_sample(model, test, "test", batch_size),
                   per_sample(model, forget, "forget", batch_size), attack)


def unlearning_metrics(model: nn.Module, retain, forget, test, *, attack: str = "loss",
                       batch_size: int = 256) -> Dict[str, float]:
    """``{"UA", "RA", "TA", "MIA"}`` in percent (see the module doc). ``model`` is not changed."""
    _check_attack(attack)
    r = per_sample(model, retain, "retain", batch_size)
    t = per_sample(model, test, "test", batch_size)
    f = per_sample(model, forget, "forget", batch_size)

    def acc(result):
        return 100.0 * float(result[1].double().mean())

    return {"UA": 100.0 - acc(f), "RA": acc(r), "TA": acc(t), "MIA": 100.0 * _attack(r, t, f, attack)}


def avg_gap(metrics: Dict[str, float], retrained: Dict[str, float]) -> float:
    """Mean over UA, RA, TA, MIA of |metric − the retrained model's| (lower = closer to Retrain)."""
    return sum(abs(metrics[k] - retrained[k]) for k in KEYS) / len(KEYS)


# -- label noise ---------------------------------------------------------------------------------
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
    the functions of :mod:`sap_fast.experiments.noise`).

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

    opts = run_options(model, device=device, batch_size=batch_size, process_group=False,
                       show_progress=show_progress)
    preds = []
    for _, _, out in forward_batches(model, inputs, batch_size=opts.batch_size, device=opts.device,
                                     what="inputs", desc="noise metrics",
                                     show_progress=opts.show_progress):
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
