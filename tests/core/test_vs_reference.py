"""The portable pipeline against the float64 oracle (materialized R, SVD), every layer kind.

Both solvers (``"cholesky"``, what correct()'s ``solver="auto"`` picks for its one α, and
``"eigh"``) are held to the oracle. Tolerances (tests/cases.py's WEIGHT_TOL): float64
accumulation (default) ≤ 1e-8 relative error of every weight; float32 accumulation ≤ 1e-3 at
α = 1e3 (it loses eigenvalues below ~1e-7 of the largest; see benchmarks/README.md for the full
precision table).
"""
import pytest
import torch
from torch import nn

import sap_fast
from sap_fast import reference
from cases import WEIGHT_TOL
from support import CONV_CASES, Attention, Tokens, conv_case, max_weight_rel_err, rel_err

F64_TOL = WEIGHT_TOL[torch.float64]


SOLVERS = pytest.mark.parametrize("solver", ["cholesky", "eigh"])


@SOLVERS
@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("alpha", [30.0, 3e4])
def test_conv_layers_match_reference(case, alpha, solver):
    model, x = conv_case(case, batch=5, seed=hash((case, alpha)) % 2**31)
    fast = sap_fast.correct(model, x, alpha=alpha, batch_size=2, solver=solver)
    ref = reference.correct(model, x, alpha=alpha)
    assert max_weight_rel_err(fast, ref) <= F64_TOL


@SOLVERS
def test_batch_of_one_matches_reference(solver):
    model, x = conv_case("2d-groups2", batch=1, seed=11)
    fast = sap_fast.correct(model, x, alpha=1e3, solver=solver)
    assert max_weight_rel_err(fast, reference.correct(model, x, alpha=1e3)) <= F64_TOL


@SOLVERS
def test_tokens_and_repeated_module_match_reference(solver):
    torch.manual_seed(1)
    model = Tokens().double()
    x = torch.randn(7, 5, 6, dtype=torch.float64)
    for alpha in (10.0, 1e5):
        fast = sap_fast.correct(model, x, alpha=alpha, batch_size=3, solver=solver)
        assert max_weight_rel_err(fast, reference.correct(model, x, alpha=alpha)) <= F64_TOL
    stats = sap_fast.collect_stats(model, x, batch_size=3)
    assert stats["mix"].count == 2 * 7 * 5  # both calls of `mix` contribute


@SOLVERS
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_multihead_attention_matches_reference(batch_first, cross, solver):
    torch.manual_seed(2 + batch_first + 2 * cross)
    model = Attention(batch_first=batch_first, cross=cross).double()
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    stats = sap_fast.collect_stats(model, x)
    expected = {"attn.q", "attn.k", "attn.v", "attn.out_proj"}
    if cross:
        expected |= {"xattn.q", "xattn.k", "xattn.v", "xattn.out_proj"}
    assert expected <= set(stats)
    for alpha in (100.0, 1e5):
        fast = sap_fast.correct(model, stats=stats, alpha=alpha, solver=solver)
        assert max_weight_rel_err(fast, reference.correct(model, x, alpha=alpha)) <= F64_TOL


def test_attention_masks_reach_out_proj_input():
    """key_padding_mask / attn_mask change the heads; the captured out_proj input must follow."""
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            pad[:, -2:] = True
            causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
            return self.attn(x, x, x, key_padding_mask=pad, attn_mask=causal)[0].mean(1)

    model = Masked()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    rows = reference.representations(model, x)["attn.out_proj"][0]
    stats = sap_fast.collect_stats(model, x)
    assert rel_err(stats["attn.out_proj"].gram[0], rows.T @ rows) <= 1e-12


def test_wide_layer_keeps_rows_and_matches_reference():
    """Fewer rows than width: rows are kept (thin SVD) and the answer is the oracle's."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 4)).double()
    x = torch.randn(20, 300, dtype=torch.float64)
    stats = sap_fast.collect_stats(model, x, batch_size=6)
    assert stats["0"].mode == "rows" and stats["0"].count == 20
    fast = sap_fast.correct(model, stats=stats, alpha=1e4)
    assert max_weight_rel_err(fast, reference.correct(model, x, alpha=1e4)) <= F64_TOL


def test_rows_switch_to_gram_once_they_outnumber_width():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 3)).double()
    x = torch.randn(25, 10, dtype=torch.float64)
    stats = sap_fast.collect_stats(model, x, batch_size=4)
    assert stats["0"].mode == "gram"
    assert rel_err(stats["0"].gram[0], x.T @ x) <= 1e-14
    fast = sap_fast.correct(model, stats=stats, alpha=1e3)
    assert max_weight_rel_err(fast, reference.correct(model, x, alpha=1e3)) <= F64_TOL


def test_float32_accumulation_within_stated_tolerance():
    model, x = conv_case("2d-nonsquare-stride-dil", batch=6, seed=7)
    stats32 = sap_fast.collect_stats(model, x, dtype=torch.float32)
    assert stats32["0"].gram.dtype == torch.float32
    fast = sap_fast.correct(model, stats=stats32, alpha=1e3)
    err = max_weight_rel_err(fast, reference.correct(model, x, alpha=1e3))
    assert err <= WEIGHT_TOL[torch.float32]


@pytest.mark.parametrize("rows, alpha, tol", [
    (8, 1e14, 1e-9),    # fewer rows than width: thin SVD of the rows, exact to round-off
    (40, 1e10, 1e-5),   # Gram: round-off eigenvalues (s ~ 1e-16) get λ ~ α·1e-16, so α·ε ≪ 1
])
def test_large_alpha_gives_projector_onto_input_span(rows, alpha, tol):
    """α → ∞: λ → 1 on every direction with energy, so W Wpᵀ → W P with P the projector onto span(R)."""
    torch.manual_seed(6)
    basis = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))[0]  # inputs live in 4 dims
    x = torch.randn(rows, 4, dtype=torch.float64) @ basis.T
    model = nn.Sequential(nn.Linear(12, 5)).double()
    fast = sap_fast.correct(model, x, alpha=alpha)
    expected = model[0].weight.detach() @ (basis @ basis.T)
    assert rel_err(fast[0].weight.detach(), expected) <= tol
    # the corrected layer maps every trusted input as the original does, and kills the orthogonal complement
    assert rel_err(fast(x), model(x)) <= tol
    null = torch.linalg.qr(torch.cat([basis, torch.randn(12, 8, dtype=torch.float64)], 1))[0][:, 4:]
    assert fast[0].weight.detach().matmul(null).norm() <= tol * model[0].weight.norm()
