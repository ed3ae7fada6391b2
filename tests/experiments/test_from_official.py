"""docs/from-official.md: the projection-step snippet runs as written and gives what the calls it
makes give when run directly; every ``sap_fast.<name>`` the page mentions exists; its relative
links point at files that exist.

The model and data are made so that SAP clearly helps: the network's first layer carries large
weights on four input features that are (nearly) zero in the training inputs and not in the
validation inputs, so the projection removes them and validation accuracy rises.
"""
import importlib
import os
import re

import pytest
import torch
from torch import nn

import sap_fast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join(ROOT, "docs", "from-official.md")
MARKER = "<!-- snippet: the projection step"
ALPHAS = [1e4, 3e4, 1e5, 3e5, 1e6]  # the official scripts' grid, as the snippet spells it out


def _page() -> str:
    with open(PAGE, encoding="utf-8") as f:
        return f.read()


def _snippet(text: str) -> str:
    """The first ```python block after the marker comment."""
    assert MARKER in text, f"the snippet marker {MARKER!r} is missing from {PAGE}"
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.DOTALL)
    assert match, "no ```python block after the snippet marker"
    return match.group(1)


def _problem():
    """A trained-looking 2-layer MLP and (train, val) pairs; the labels are the model's own
    predictions without its spurious weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x_train, x_val = torch.randn(1200, 8), torch.randn(300, 8)
    x_train[:, 4:] *= 1e-3  # the spurious features barely vary on the training data
    with torch.no_grad():
        model[0].weight[:, 4:] = 0
        y_train, y_val = model(x_train).argmax(1), model(x_val).argmax(1)
        model[0].weight[:, 4:] = 3 * torch.randn(16, 4)
    return model.eval(), (x_train, y_train), (x_val, y_val)


def _run(code: str, scope: dict) -> dict:
    exec(compile(code, "docs/from-official.md snippet", "exec"), scope)  # noqa: S102 (the page's own code)
    return scope


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_snippet_runs_and_matches_the_direct_calls(tmp_path, monkeypatch):
    code = _snippet(_page())
    model, train_set, val_set = _problem()
    original = _state(model)
    monkeypatch.chdir(tmp_path)  # the snippet saves model_SAP.pt in the working directory
    scope = _run(code, {"model": model, "train_set": train_set, "val_set": val_set})

    # the snippet left the model alone and produced a different, corrected one
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    corrected = scope["corrected"]
    assert isinstance(corrected, nn.Module) and corrected is not model
    assert scope["result"].best_alpha in ALPHAS, scope["result"].to_markdown()
    assert not torch.allclose(corrected[0].weight, model[0].weight)
    saved = torch.load(tmp_path / "model_SAP.pt", weights_only=True)
    assert saved.keys() == original.keys()

    # the same calls made directly
    idx = sap_fast.select_trusted(model, train_set, n=1000)
    assert torch.equal(scope["idx"], idx)
    trusted = sap_fast.subset(train_set, idx)
    stats = sap_fast.collect_stats(model, trusted)
    direct = sap_fast.sweep(model, None, val_set, stats=stats, alphas=ALPHAS)
    assert direct.best_alpha == scope["result"].best_alpha
    for k, v in direct.model.state_dict().items():
        torch.testing.assert_close(corrected.state_dict()[k], v)
        torch.testing.assert_close(saved[k], v)
    # correct() at the chosen α (Cholesky route, from the trusted inputs): the same weights
    fixed = sap_fast.correct(model, trusted, alpha=direct.best_alpha)
    for k, v in fixed.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=1e-5, atol=1e-5)
    # and the accuracy gain the construction promises
    assert sap_fast.evaluate(corrected, val_set).accuracy > sap_fast.evaluate(model, val_set).accuracy + 0.2


def test_fixed_alpha_alternative_runs():
    """The page's one-line replacement of the sweep for a fixed α."""
    text = _page()
    lines = re.findall(r"`(corrected = sap_fast\.correct\([^`]*\))`", text)
    assert lines, "the fixed-α alternative is missing from the page"
    code = _snippet(text)
    head = code[:code.index("result = ")]  # imports, selection and statistics
    model, train_set, val_set = _problem()
    scope = _run(head + lines[0] + "\n", {"model": model, "train_set": train_set, "val_set": val_set})
    expected = sap_fast.correct(model, stats=scope["stats"], alpha=3e4)
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(scope["corrected"].state_dict()[k], v)


def test_broken_snippet_fails():
    """The harness is not vacuous: a call to a function that does not exist raises."""
    code = _snippet(_page()).replace("sap_fast.sweep(", "sap_fast.sweep_v2(")
    model, train_set, val_set = _problem()
    with pytest.raises(AttributeError, match="sweep_v2"):
        _run(code, {"model": model, "train_set": train_set, "val_set": val_set})


def test_names_and_links_exist():
    text = _page()
    missing = []
    for name in sorted(set(re.findall(r"\bsap_fast\.([A-Za-z_]\w*)", text))):
        if hasattr(sap_fast, name):
            continue
        try:
            importlib.import_module(f"sap_fast.{name}")
        except ImportError:
            missing.append(f"sap_fast.{name}")
    assert not missing, f"the page names what sap_fast does not have: {missing}"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert os.path.exists(os.path.join(ROOT, "docs", target)), f"broken link: {target}"
