"""The public Projector: one decomposition per run, owned by one object and reused by every
consumer (the sweep's result, the report, the command line)."""
import copy

import pytest
import torch

import sap_fast
from sap_fast import spectrum
from sap_fast.project import Projector
from support import Attention, assert_unchanged, conv_case, max_weight_rel_err, snapshot


@pytest.fixture
def decompositions(monkeypatch):
    """Counts every layer decomposition (eigh or thin SVD) from here on."""
    calls = []
    real = spectrum.layer_spectrum
    monkeypatch.setattr(spectrum, "layer_spectrum", lambda record: calls.append(1) or real(record))
    return calls


def _case():
    model, x = conv_case("2d-groups2", batch=6, seed=4)
    return model, x, sap_fast.collect_stats(model, x)


def test_eigh_projector_decomposes_once_and_serves_every_alpha(decompositions):
    model, x, stats = _case()
    projector = Projector(model, stats)
    assert projector.has_spectra and len(decompositions) == len(stats)
    fixed = [copy.deepcopy(model) for _ in range(3)]
    for work, alpha in zip(fixed, (10.0, 1e3, 1e5)):
        projector.apply(work, alpha)
    spectra = projector.spectra
    assert projector.spectra is spectra and len(decompositions) == len(stats)  # no second one
    for work, alpha in zip(fixed, (10.0, 1e3, 1e5)):
        want = sap_fast.correct(model, stats=stats, alpha=alpha, solver="eigh")
        assert max_weight_rel_err(work, want) <= 1e-12


def test_cholesky_projector_decomposes_only_when_spectra_are_asked_for(decompositions):
    model, x, stats = _case()
    projector = Projector(model, stats, solver="cholesky")
    projector.weights(1e3)
    assert not projector.has_spectra and decompositions == []
    lazy = projector.spectra
    assert projector.has_spectra and len(decompositions) == len(stats)
    assert projector.spectra is lazy and len(decompositions) == len(stats)  # computed once, kept
    eager = Projector(model, stats, solver="eigh").spectra
    for name in eager:
        assert torch.allclose(lazy[name].eigvals, eager[name].eigvals, rtol=0, atol=1e-12)


def test_weights_of_none_are_the_original_weights_and_the_model_is_untouched():
    model, x, stats = _case()
    snap = snapshot(model)
    projector = Projector(model, stats, solver="cholesky")
    original = projector.weights(None)
    assert torch.equal(original["0"].reshape(model[0].weight.shape), model[0].weight.double())
    projector.weights(1e2)
    assert_unchanged(model, snap)


def test_sweep_returns_its_projector_and_the_report_reuses_it(decompositions):
    torch.manual_seed(10)
    model = Attention().double()
    x = torch.randn(12, 4, 5, dtype=torch.float64)
    val = (torch.randn(8, 4, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))
    stats = sap_fast.collect_stats(model, x)
    result = sap_fast.sweep(model, None, val, stats=stats, alphas=[10.0, 1e3])
    count = len(decompositions)
    assert count == len({id(stats[n]) for n in stats})  # q/k/v share one record, one decomposition
    assert isinstance(result.projector, Projector) and result.projector.has_spectra
    assert set(result.projector.spectra) == set(stats)
    again = copy.deepcopy(model)
    result.projector.apply(again, result.best_alpha)
    assert max_weight_rel_err(again, result.model) == 0.0
    assert len(decompositions) == count


def test_bad_arguments_are_one_line_errors():
    model, x, stats = _case()
    for call, kind, match in [
        (lambda: Projector(model, stats, solver="svd"), ValueError, r"solver must be one of"),
        (lambda: Projector(model, {"0": stats["0"]}), TypeError, r"stats must be a sap_fast.Stats"),
        (lambda: Projector(torch.nn.DataParallel(model), stats), TypeError, r"pass model.module"),
        (lambda: Projector(model, stats).weights(-1.0), ValueError, r"alpha must be finite and > 0"),
        (lambda: Projector(model, stats, layers=["nope"]), ValueError, r"no module named 'nope'"),
    ]:
        with pytest.raises(kind, match=match) as err:
            call()
        assert "\n" not in str(err.value)
