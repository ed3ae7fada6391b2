"""The README's quick start runs as written (on a small model), so the docs cannot drift from the API."""
import os
import re

import torch
from torch import nn

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    x = torch.randn(1200, 1, 6, 6)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.chdir(tmp_path)  # the quick start writes stats.pt
    scope = {"model": model, "train_data": (x[:1100], y[:1100]), "val_data": (x[1100:], y[1100:])}
    exec(compile(code, "README quick start", "exec"), scope)
    assert isinstance(scope["fixed"], nn.Module) and scope["trusted"][0].shape[0] == 1000
    assert (tmp_path / "stats.pt").exists()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
