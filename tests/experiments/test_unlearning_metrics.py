"""UA/RA/TA/MIA: the definitions on fixed logits, the loss-threshold attack, and Avg Gap."""
import pytest
import torch
from torch import nn

from sap_fast.experiments.metrics import avg_gap, loss_threshold, mia_efficacy, unlearning_metrics


class Table(nn.Module):
    """A 'model' whose logits are looked up from the input's first feature (a sample id)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone(), requires_grad=False)

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def _data(ids, labels):
    return torch.tensor(ids, dtype=torch.float32)[:, None], torch.tensor(labels)


def test_loss_threshold_separates_and_prefers_the_lowest_tie():
    member = torch.tensor([0.1, 0.2, 0.3])
    nonmember = torch.tensor([1.0, 2.0, 3.0])
    assert loss_threshold(member, nonmember) == pytest.approx(0.3)
    # no separation possible at all: "nobody is a member" ties with every threshold; keep -inf
    same = torch.tensor([1.0, 1.0])
    assert loss_threshold(same, same) == float("-inf")
    # one overlap: best balanced accuracy at t = 0.5 (tpr 1, tnr 2/3) beats t = 0.2 (2/3, 1)? equal
    # -> the lowest threshold wins the tie
    assert loss_threshold(torch.tensor([0.1, 0.2, 0.5]), torch.tensor([0.4, 1.0, 2.0])) == pytest.approx(0.2)


def test_metrics_on_fixed_logits():
    # samples 0-3 retain (all right, confident), 4-7 test (right but unsure), 8-11 forget
    logits = torch.zeros(12, 2)
    logits[:4, 0] = 8.0          # retain, label 0: loss ≈ 3e-4
    logits[4:8, 0] = 0.5         # test, label 0: loss ≈ 0.47
    logits[8:10, 0] = 8.0        # forget 8, 9: look like members, and right
    logits[10:12, 1] = 0.5       # forget 10, 11: wrong (label 0) with a test-like-or-worse loss
    model = Table(logits)
    retain, test = _data(range(4), [0] * 4), _data(range(4, 8), [0] * 4)
    forget = _data(range(8, 12), [0] * 4)
    m = unlearning_metrics(model, retain, forget, test)
    assert m["RA"] == 100.0 and m["TA"] == 100.0
    assert m["UA"] == 50.0                           # 2 of 4 forget samples misclassified
    assert m["MIA"] == 50.0                          # the two high-loss ones look like non-members
    assert mia_efficacy(model, retain, forget, test) == 0.5
    assert avg_gap(m, {"UA": 40.0, "RA": 100.0, "TA": 90.0, "MIA": 50.0}) == pytest.approx(5.0)


def test_svc_attack_agrees_on_a_separable_case():
    pytest.importorskip("sklearn")
    logits = torch.zeros(12, 2)
    logits[:4, 0] = 8.0
    logits[4:8, 0] = -1.0        # test: wrong, p_true low
    logits[8:12, 0] = -1.0       # forget looks exactly like test
    model = Table(logits)
    retain, test = _data(range(4), [0] * 4), _data(range(4, 8), [0] * 4)
    forget = _data(range(8, 12), [0] * 4)
    assert unlearning_metrics(model, retain, forget, test, attack="svc")["MIA"] == 100.0


def test_bad_attack_is_one_line():
    model = Table(torch.zeros(2, 2))
    d = _data([0, 1], [0, 1])
    with pytest.raises(ValueError, match="attack must be one of"):
        unlearning_metrics(model, d, d, d, attack="entropy")
