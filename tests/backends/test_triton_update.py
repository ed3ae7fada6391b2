"""The Triton update kernel against its torch twin and a float64 direct formula.

On a machine without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``;
see triton_support.py); with CUDA the same tests also run compiled.
Note: the interpreter computes ``tl.dot`` with numpy (exact fp32), so TF32 error only shows on GPU.

Errors are ``‖x − y‖_F / ‖W‖_F`` over the whole tensor. The devices, dtypes and tolerances are
tests/cases.py's (dtype: twin, direct): float64 1e-12 for both (observed ≤ ~1e-15); float32 1e-6
vs the float32 twin (same formula, only the summation order of r ≤ 70 products differs: a few
eps32) and 1e-5 vs the float64 formula (that adds the float32 rounding of ``wu = W U`` and the
non-orthonormality, O(eps32), of the rounded ``U``, which the full form's ``W − …`` sees as
``W (I − U Uᵀ)``).
"""
import math

import pytest
import torch

from sap_fast.project import projected_weight
from sap_fast.spectrum import LayerSpectrum

from cases import DTYPES, SAME_FORMULA_TOL, devices_param, dtypes_param, tol

from .triton_support import kernel_module

pt, DEVICES = kernel_module("update")

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHAS = [1.0, 10.0, 1e3, 1e6]
TOL = {dtype: (SAME_FORMULA_TOL[dtype], tol(dtype)) for dtype in DTYPES}  # (vs twin, vs float64 direct)
TOL64 = tol(torch.float64)

# name: (groups, out, d, r); block sizes are (≤64, ≤64, ≤32), so r = 37, 45, 70 leave ragged K steps
CASES = {
    "full-5x37": (1, 5, 37, 37),
    "thin-33x20-r7": (1, 33, 20, 7),
    "out1-full": (2, 1, 17, 17),
    "groups3-full": (3, 9, 20, 20),
    "groups3-thin": (3, 17, 40, 19),
    "tiles-2x2-full": (1, 70, 70, 70),
    "tiles-thin-r45": (2, 70, 70, 45),
}


def make_inputs(groups, out, d, r, seed, zero_groups=()):
    """float64 W, orthonormal U, and a spectrum over 10 decades with a zero tail (rank-deficient
    Gram), so large α pushes some λ to ≈ 1 and leaves others ≪ 1."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(groups, out, d, generator=gen, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(groups, d, d, generator=gen, dtype=torch.float64))[0][..., :r]
    e = 10.0 ** (torch.rand(groups, r, generator=gen, dtype=torch.float64) * 10 - 8)
    e = e.sort(-1, descending=True).values
    e[:, r - r // 5:] = 0  # the last fifth carries no energy
    for g in zero_groups:
        e[g] = 0
    return w, u, e


def direct(w, u, e, alpha):
    """``W U diag(λ) Uᵀ`` in float64, written out independently of the module."""
    w, u, e = w.double(), u.double(), e.double()
    total = e.sum(-1, keepdim=True)
    s = torch.where(total > 0, e / total.clamp_min(1e-300), torch.zeros_like(e))
    lam = alpha * s / ((alpha - 1) * s + 1)
    return w @ u @ torch.diag_embed(lam) @ u.transpose(-1, -2)


def rel(x, y, w):
    return ((x.double() - y.double()).norm() / w.double().norm()).item()


@devices_param(DEVICES)
@dtypes_param()
@pytest.mark.parametrize("case", list(CASES))
def test_matches_twin_and_direct(case, dtype, device):
    groups, out, d, r = CASES[case]
    w, u, e = (t.to(device, dtype) for t in make_inputs(groups, out, d, r, seed=len(case) * 7 + r))
    wu = w @ u
    tol_twin, tol_direct = TOL[dtype]
    for alpha in ALPHAS:  # one loop, not a parameter: wu is reused per α exactly as in Projector
        got = pt.scaled_update(w, wu, u, e, alpha)
        assert got.dtype == dtype and got.device == w.device and got.shape == w.shape
        assert rel(got, pt.scaled_update_reference(w, wu, u, e, alpha), w) < tol_twin, alpha
        assert rel(got, direct(w, u, e, alpha), w) < tol_direct, alpha


@pytest.mark.parametrize("r", [20, 6], ids=["full", "thin"])
def test_twin_matches_projected_weight(r):
    """The oracle agrees with the pipeline's own update (sap_fast.project.projected_weight)."""
    w, u, e = make_inputs(2, 9, 20, r, seed=9)
    spectrum = LayerSpectrum(e, u)
    for alpha in ALPHAS:
        want = projected_weight(w, spectrum, alpha)
        assert rel(pt.scaled_update_reference(w, w @ u, u, e, alpha), want, w) < TOL64


@devices_param(DEVICES)
@pytest.mark.parametrize("r", [20, 6], ids=["full", "thin"])
def test_group_without_energy(device, r):
    """Σe = 0 gives s = 0 and λ = 0: the full form's W − W U Uᵀ is ≈ 0, the thin form exactly 0;
    the other groups are untouched by it."""
    w, u, e = (t.to(device) for t in make_inputs(3, 9, 20, r, seed=1, zero_groups=(1,)))
    wu = w @ u
    for alpha in (1.0, 1e6):
        got = pt.scaled_update(w, wu, u, e, alpha)
        assert torch.isfinite(got).all()
        assert rel(got[1], torch.zeros_like(got[1]), w[1]) < TOL64
        if r < 20:
            assert torch.equal(got[1], torch.zeros_like(got[1]))
        assert rel(got, pt.scaled_update_reference(w, wu, u, e, alpha), w) < TOL64
        assert rel(got, direct(w, u, e, alpha), w) < TOL64


@devices_param(DEVICES)
def test_alpha_one_gives_energies(device):
    """α = 1 makes λ = s, in both forms."""
    w, u, e = (t.to(device) for t in make_inputs(2, 6, 24, 24, seed=2))
    s = e / e.sum(-1, keepdim=True)
    want = w @ u @ torch.diag_embed(s) @ u.transpose(-1, -2)
    for full in (True, False):
        assert rel(pt.scaled_update(w, w @ u, u, e, 1.0, full=full), want, w) < TOL64


@devices_param(DEVICES)
@dtypes_param()
def test_non_contiguous_inputs(device, dtype):
    """Any strides: transposed W and U, every other column of wu and e, U shared across groups
    (stride 0). The result is a new contiguous tensor."""
    groups, out, d, r = 2, 11, 24, 24
    w0, u0, e0 = (t.to(device, dtype) for t in make_inputs(groups, out, d, r, seed=3))
    u0 = u0[:1].expand(groups, d, r)
    w = w0.transpose(-1, -2).contiguous().transpose(-1, -2)
    u = u0[0].T.contiguous().T.expand(groups, d, r)
    wu = torch.zeros(groups, out, 2 * r, dtype=dtype, device=device)[..., ::2]
    wu.copy_(w0 @ u0)
    e = torch.zeros(groups, 2 * r, dtype=dtype, device=device)[:, ::2]
    e.copy_(e0)
    assert not any(t.is_contiguous() for t in (w, u, wu, e))
    tol = TOL[dtype][0]
    for alpha in (10.0, 1e6):
        got = pt.scaled_update(w, wu, u, e, alpha)
        assert got.is_contiguous()
        want = pt.scaled_update_reference(w0, (w0 @ u0).contiguous(), u0.contiguous(), e0, alpha)
        assert rel(got, want, w0) < tol


@devices_param(DEVICES)
def test_thin_form_on_full_basis_and_fresh_output(device):
    """``full=False`` on a square basis gives the same Ŵ; the output never aliases an input and
    the inputs are left as they were."""
    w, u, e = (t.to(device) for t in make_inputs(1, 7, 18, 18, seed=4))
    wu = w @ u
    before = [t.clone() for t in (w, wu, u, e)]
    careful = pt.scaled_update(w, wu, u, e, 1e3)
    thin = pt.scaled_update(w, wu, u, e, 1e3, full=False)
    assert rel(careful, thin, w) < TOL64
    assert careful.data_ptr() not in {t.data_ptr() for t in (w, wu, u, e)}
    for t, b in zip((w, wu, u, e), before):
        assert torch.equal(t, b)


@devices_param(DEVICES)
def test_empty_shapes(device):
    w, u, e = (t.to(device) for t in make_inputs(2, 3, 8, 8, seed=5))
    none = pt.scaled_update(w[:, :0], w[:, :0] @ u, u, e, 10.0)
    assert none.shape == (2, 0, 8)
    args = (w, w @ u[..., :0], u[..., :0], e[:, :0], 10.0)  # thin basis spanning nothing
    zero_rank = pt.scaled_update(*args)
    assert torch.equal(zero_rank, torch.zeros_like(w))
    assert torch.equal(zero_rank, pt.scaled_update_reference(*args))


def _bad_inputs():
    w, u, e = make_inputs(2, 5, 8, 8, seed=6)
    wu = w @ u
    t = dict(weight=w, wu=wu, basis=u, eigvals=e, alpha=10.0)
    cases = {  # name: (changes, exception, message pattern)
        "alpha-zero": (dict(alpha=0.0), ValueError, "alpha must be finite and > 0"),
        "alpha-negative": (dict(alpha=-1.0), ValueError, "alpha must be finite and > 0"),
        "alpha-nan": (dict(alpha=math.nan), ValueError, "alpha must be finite and > 0"),
        "alpha-inf": (dict(alpha=math.inf), ValueError, "alpha must be finite and > 0"),
        "alpha-str": (dict(alpha="10"), TypeError, "alpha must be a positive number"),
        "weight-2d": (dict(weight=w[0]), ValueError, "weight must be 3-D"),
        "eigvals-1d": (dict(eigvals=e[0]), ValueError, "eigvals must be 2-D"),
        "basis-rows": (dict(basis=u[:, :7]), ValueError, r"basis must be \(groups, d, r\)"),
        "basis-groups": (dict(basis=u[:1]), ValueError, r"basis must be \(groups, d, r\)"),
        "r-over-d": (dict(basis=torch.zeros(2, 8, 9, dtype=torch.float64)), ValueError,
                     "r must be <= d"),
        "wu-shape": (dict(wu=wu[:, :4]), ValueError, "wu must be weight @ basis"),
        "eigvals-shape": (dict(eigvals=e[:, :7]), ValueError, r"eigvals must be \(groups, r\)"),
        "half": ({k: t[k].half() for k in ("weight", "wu", "basis", "eigvals")}, ValueError,
                 "dtype must be float32 or float64"),
        "mixed-dtype": (dict(basis=u.float()), ValueError,
                        "basis is torch.float32 but weight is torch.float64"),
        "mixed-device": (dict(eigvals=e.to("meta")), ValueError,
                         "eigvals is on meta but weight is on cpu"),
        "not-tensor": (dict(wu=wu.tolist()), TypeError, "wu must be a tensor"),
    }
    return t, cases


_, _BAD = _bad_inputs()


@pytest.mark.parametrize("fn", ["scaled_update", "scaled_update_reference"])
@pytest.mark.parametrize("bad", list(_BAD))
def test_errors(fn, bad):
    """Kernel launcher and twin reject the same inputs with the same one-line message."""
    args, cases = _bad_inputs()
    changes, exc, match = cases[bad]
    args.update(changes)
    alpha = args.pop("alpha")
    with pytest.raises(exc, match=match) as info:
        getattr(pt, fn)(*args.values(), alpha)
    assert "\n" not in str(info.value)


def test_full_needs_square_basis():
    w, u, e = make_inputs(1, 4, 10, 6, seed=7)
    for fn in (pt.scaled_update, pt.scaled_update_reference):
        with pytest.raises(ValueError, match=r"full=True needs a square basis \(r == d\), got r=6, d=10"):
            fn(w, w @ u, u, e, 10.0, full=True)


def test_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(pt, "interpreted", lambda: False)
    w, u, e = make_inputs(1, 4, 10, 10, seed=8)
    with pytest.raises(ValueError, match="CPU tensors need TRITON_INTERPRET=1"):
        pt.scaled_update(w, w @ u, u, e, 10.0)


@devices_param(DEVICES)
@pytest.mark.parametrize("config", pt.CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_every_autotune_config_is_correct(config, device):
    """Each tile configuration the GPU autotuner may pick gives the twin's result, on a shape
    with ragged tiles in every dimension (out, d and r are not multiples of any block)."""
    w, u, e = (t.to(device) for t in make_inputs(2, 37, 150, 150, seed=21))
    wu = w @ u
    got = pt.scaled_update(w, wu, u, e, 3e4, config=config)
    assert rel(got, pt.scaled_update_reference(w, wu, u, e, 3e4), w) < TOL[torch.float64][0]
    thin = pt.scaled_update(w, wu[..., :40], u[..., :40], e[:, :40], 3e4, config=config)
    assert rel(thin, pt.scaled_update_reference(w, wu[..., :40], u[..., :40], e[:, :40], 3e4), w) \
        < TOL[torch.float64][0]
