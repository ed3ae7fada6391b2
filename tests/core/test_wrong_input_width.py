"""An input the model rejects is reported in the model's own words: the statistics hooks step
aside for an input a layer cannot read, so PyTorch's own check speaks (naming the layer), not a
reshape inside the statistics."""
import pytest
import torch
from torch import nn

import sap_fast


def _conv_model():
    return nn.Sequential(nn.Conv2d(3, 4, 7, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


@pytest.mark.parametrize("call", ["collect_stats", "correct", "select_trusted", "sweep"])
def test_a_conv_fed_the_wrong_channels_reports_pytorchs_own_message(call):
    model = _conv_model()
    x = torch.randn(4, 1, 16, 16)   # one channel; the conv reads three
    y = torch.tensor([0, 1, 0, 1])
    run = {"collect_stats": lambda: sap_fast.collect_stats(model, x),
           "correct": lambda: sap_fast.correct(model, x, alpha=10.0),
           "select_trusted": lambda: sap_fast.select_trusted(model, (x, y), n=2),
           "sweep": lambda: sap_fast.sweep(model, x, (x, y))}[call]
    with pytest.raises(ValueError) as err:
        run()
    text = str(err.value)
    assert "layer '0' rejected inputs of shape (4, 1, 16, 16)" in text
    assert "to have 3 channels" in text and "is invalid" not in text
    assert "\n" not in text


def test_a_linear_fed_the_wrong_width_reports_pytorchs_own_message():
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"layer '0' rejected inputs of shape \(4, 6\): .*cannot be multiplied"):
        sap_fast.collect_stats(model, torch.randn(4, 6))


def test_attention_fed_the_wrong_width_reports_pytorchs_own_message():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    with pytest.raises(ValueError, match=r"layer 'attn' rejected inputs of shape \(2, 3, 6\)") as err:
        sap_fast.collect_stats(Net(), torch.randn(2, 3, 6))
    assert "is invalid" not in str(err.value)
