"""A tiny label-noise problem for the baseline tests: 16-D Gaussian blobs, an MLP that has
memorised a set of flipped labels (the forget set), and the clean retain set."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 4
DIM = 16


class TinyMLP(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(DIM, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@functools.lru_cache(maxsize=1)
def _problem():
    gen = torch.Generator().manual_seed(0)
    centres = 1.5 * torch.randn(CLASSES, DIM, generator=gen)
    y = torch.arange(CLASSES).repeat_interleave(100)
    x = centres[y] + torch.randn(y.numel(), DIM, generator=gen)
    flip = torch.randperm(y.numel(), generator=gen)[:40]
    noisy = y.clone()
    noisy[flip] = (y[flip] + 1 + torch.randint(0, CLASSES - 1, (40,), generator=gen)) % CLASSES
    keep = torch.ones(y.numel(), dtype=torch.bool)
    keep[flip] = False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; also makes the trained weights thread-count independent
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # full batch until the flipped labels are memorised
        loss = F.cross_entropy(model(x), noisy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    test_y = torch.arange(CLASSES).repeat_interleave(50)
    test_x = centres[test_y] + torch.randn(test_y.numel(), DIM, generator=gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, (x[keep], noisy[keep]), (x[flip], noisy[flip]), (test_x, test_y)


def noisy_blobs():
    """``(model, retain, forget, test)``: a fresh copy of the memorising model each call; retain
    = the 360 clean samples, forget = the 40 flipped ones with their wrong labels, test clean."""
    state, retain, forget, test = _problem()
    model = TinyMLP()
    model.load_state_dict(state)
    return model.eval(), retain, forget, test


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())
