"""The solve route (``solver="cholesky"``, :mod:`sap_fast.solve`) against the eigen route and
closed forms: ``α G̃ ((α−1) G̃ + I)⁻¹`` is ``U diag(λ) Uᵀ``, for Gram and thin (rows) records.

Tolerances (float64 throughout): ≤ 1e-10 relative between the two routes for α in [0.3, 1e6]
(measured ≤ 1e-13; κ(M) ≤ max(α, 1/α) bounds the solve's error growth).
"""
import pytest
import torch

import sap_fast
from sap_fast import solve
from sap_fast.project import Projector, projected_weight
from sap_fast.spectrum import layer_spectrum
from sap_fast.stats import LayerStats
from support import conv_case, max_weight_rel_err, rel_err

ALPHAS = (0.3, 1.0, 10.0, 1e3, 1e6)
TOL = 1e-10


def _record(rows: torch.Tensor) -> LayerStats:
    record = LayerStats(rows.shape[-1], rows.shape[0])
    record.add(rows)
    return record


def _decaying_rows(groups, m, d, seed):
    """Rows whose Gram has a spread spectrum (s from ~1 down to ~1e-9), like real activations."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -4.5, d, dtype=torch.float64)
    return torch.randn(groups, m, d, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("mode, m", [("gram", 40), ("rows", 7)])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_solve_matches_eigen_route(mode, m, alpha):
    rows = _decaying_rows(2, m, 12, seed=int(alpha * 10) + m)
    record = _record(rows)
    assert record.mode == mode
    weight = torch.randn(2, 5, 12, dtype=torch.float64)
    want = projected_weight(weight, layer_spectrum(record), alpha)
    got, info = solve.solved_weight(solve.prepare(record, weight), alpha)
    assert int(info.abs().sum()) == 0
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("mode, m", [("gram", 30), ("rows", 4)])
def test_alpha_one_is_the_normalised_gram(mode, m):
    """At α = 1, Wp = G̃ = G / tr G exactly: Ŵ = W G̃."""
    rows = _decaying_rows(1, m, 9, seed=3)
    gram = rows[0].T @ rows[0]
    weight = torch.randn(1, 4, 9, dtype=torch.float64)
    got, _ = solve.solved_weight(solve.prepare(_record(rows), weight), 1.0)
    assert rel_err(got[0], weight[0] @ (gram / gram.trace())) <= 1e-13


def test_scale_of_the_gram_does_not_matter():
    rows = _decaying_rows(1, 20, 8, seed=4)
    weight = torch.randn(1, 3, 8, dtype=torch.float64)
    a, _ = solve.solved_weight(solve.prepare(_record(rows), weight), 3e4)
    b, _ = solve.solved_weight(solve.prepare(_record(rows * 1e3), weight), 3e4)
    assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("m", [30, 3])
def test_group_without_energy_gives_zero_like_eigh(m):
    """A group whose inputs are all zero: λ = 0 everywhere, so that group's weight becomes 0."""
    rows = _decaying_rows(2, m, 6, seed=5)
    rows[1] = 0
    record = _record(rows)
    weight = torch.randn(2, 3, 6, dtype=torch.float64)
    got, _ = solve.solved_weight(solve.prepare(record, weight), 1e3)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    want = projected_weight(weight, layer_spectrum(record), 1e3)
    assert torch.equal(want[1], torch.zeros_like(want[1]))
    assert rel_err(got[0], want[0]) <= TOL


def test_rows_route_never_forms_a_d_by_d_matrix():
    """A thin record (m < d rows) solves an m × m system: nothing in its LayerSolve is d × d."""
    rows = _decaying_rows(1, 5, 300, seed=6)
    prep = solve.prepare(_record(rows), torch.randn(1, 4, 300, dtype=torch.float64))
    assert prep.mode == "rows"
    assert prep.normalised.shape == (1, 5, 5)
    assert all(t.shape[-1] != 300 or t.shape[-2] != 300 for t in (prep.normalised, prep.rhs, prep.rows))


def test_failed_factorisation_names_the_layer():
    """α so small that (α−1)G̃ + I is singular in float64 (a rank-1 Gram: eigenvalue α)."""
    model, x = conv_case("2d-groups2", batch=2, seed=7)
    stats = sap_fast.collect_stats(model, x)
    name = next(iter(stats))
    record = stats[name]
    rank_one = torch.zeros_like(record.gram)
    rank_one[:, 0, 0] = 1.0
    stats[name]._gram = rank_one  # a rank-1 Gram: (α−1)·1 + 1 = α = 0 in float64 at α = 1e-300
    with pytest.raises(ValueError, match=f"Cholesky.*'{name}'.*solver='eigh'"):
        sap_fast.correct(model, stats=stats, alpha=1e-300)


def test_correct_routes_agree_on_a_model_and_leave_it_untouched():
    model, x = conv_case("2d-nonsquare-stride-dil", batch=4, seed=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = sap_fast.collect_stats(model, x)
    for alpha in (30.0, 3e4):
        a = sap_fast.correct(model, stats=stats, alpha=alpha, solver="cholesky")
        b = sap_fast.correct(model, stats=stats, alpha=alpha, solver="eigh")
        assert max_weight_rel_err(a, b) <= TOL
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sweep_routes_pick_the_same_alpha():
    torch.manual_seed(9)
    model, x = conv_case("2d-groups2", batch=6, seed=9)
    y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % model(x).shape[1]
    a = sap_fast.sweep(model, x, (x, y), alphas=[3.0, 30.0, 3e3], solver="cholesky")
    b = sap_fast.sweep(model, x, (x, y), alphas=[3.0, 30.0, 3e3], solver="eigh")
    assert a.best_alpha == b.best_alpha
    assert [r.val_accuracy for r in a.table] == [r.val_accuracy for r in b.table]
    assert [r.val_loss for r in a.table] == pytest.approx([r.val_loss for r in b.table], rel=1e-9)
    assert max_weight_rel_err(a.model, b.model) <= TOL


def test_cholesky_projector_shares_one_normalised_gram_for_q_k_v():
    from support import Attention
    torch.manual_seed(10)
    model = Attention().double()
    x = torch.randn(5, 4, 5, dtype=torch.float64)
    stats = sap_fast.collect_stats(model, x)
    projector = Projector(model, stats, solver="cholesky")
    new = projector.weights(1e3)
    assert not projector.has_spectra  # no eigendecomposition on the solve route
    assert len(projector._normalised) == len({id(stats[n]) for n in new})
    assert projector._solves["attn.q"].normalised is projector._solves["attn.k"].normalised


@pytest.mark.parametrize("bad", ["svd", None, "Cholesky"])
def test_bad_solver_is_a_one_line_error(bad):
    model, x = conv_case("2d-groups2", batch=2, seed=11)
    for call in (lambda: sap_fast.correct(model, x, alpha=10.0, solver=bad),
                 lambda: sap_fast.sweep(model, x, (x, torch.zeros(2, dtype=torch.long)), solver=bad)):
        with pytest.raises(ValueError, match=r"solver must be one of \('eigh', 'cholesky'\)") as err:
            call()
        assert "\n" not in str(err.value)


# -- solver="auto": the one rule (sap_fast.project.resolve_solver) --------------------------------

@pytest.mark.parametrize("solver, alphas, spectra, want", [
    ("auto", 1, False, "cholesky"),     # one α, no spectrum: correct(), a fixed --alpha
    ("auto", 1, True, "eigh"),          # one α whose spectra are reported (--spectra)
    ("auto", 2, False, "eigh"),         # several α share one decomposition
    ("auto", 11, False, "eigh"),        # the default grid
    ("auto", None, False, "eigh"),      # a Projector: any number of α, on demand
    ("eigh", 1, False, "eigh"),         # an explicit solver is kept
    ("cholesky", None, True, "cholesky"),
])
def test_auto_solver_rule(solver, alphas, spectra, want):
    from sap_fast.project import resolve_solver
    assert resolve_solver(solver, alphas=alphas, spectra=spectra) == want


def test_every_entry_point_defaults_to_auto_and_resolves_it_by_the_rule(monkeypatch):
    import inspect
    import sys
    from sap_fast import project
    for fn in (sap_fast.correct, sap_fast.sweep, Projector.__init__):
        assert inspect.signature(fn).parameters["solver"].default == "auto"
    built = []
    real = project.build_projector

    def spy(model, targets, stats, solver, group):
        built.append(solver)
        return real(model, targets, stats, solver, group)

    monkeypatch.setattr(project, "build_projector", spy)
    monkeypatch.setattr(sys.modules["sap_fast.sweep"], "build_projector", spy)
    model, x = conv_case("2d-groups2", batch=4, seed=12)
    y = model(x).argmax(1)
    sap_fast.correct(model, x, alpha=30.0)
    sap_fast.sweep(model, x, (x, y), alphas=[3.0, 30.0])
    sap_fast.sweep(model, x, (x, y), alphas=[30.0])
    sap_fast.sweep(model, x, (x, y), alphas=[30.0, 30.0])  # one distinct α
    projector = Projector(model, sap_fast.collect_stats(model, x))
    assert built == ["cholesky", "eigh", "cholesky", "cholesky", "eigh"]
    assert projector.solver == "eigh" and projector.has_spectra


def test_auto_is_accepted_and_named_in_the_solver_error():
    model, x = conv_case("2d-groups2", batch=2, seed=13)
    with pytest.raises(ValueError, match=r"or 'auto' \(the default") as err:
        sap_fast.correct(model, x, alpha=10.0, solver="Auto")
    assert "\n" not in str(err.value)
