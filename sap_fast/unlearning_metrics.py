"""The classic machine-unlearning metrics, for judging privacy-forgetting methods on their own task.

For a forget set D_f removed from the training set (retain set D_r) and a test set D_test
(the Unlearn-Sparse / SalUn / UGradSL convention, ``shared/methods.md`` §0), in percent:

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

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import check_targets, classifier_logits
from .forward import forward_batches, resolve_device

ATTACKS = ("loss", "svc")
KEYS = ("UA", "RA", "TA", "MIA")


def per_sample(model: nn.Module, data, what: str, batch_size: int = 256):
    """``(loss, correct, p_true)`` per sample: float64 cross-entropy, arg-max hit, true-class probability."""
    dev = resolve_device(model)
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
