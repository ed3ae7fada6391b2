"""The float64 SAP oracle checked against the layers' own definitions.

If ``R_g @ W_g.T + b_g`` reproduces a layer's real output, R's rows and columns are exactly what
the layer's weight multiplies — so a projection built from R acts on the right space.
"""

import copy

import pytest
import torch
from torch import nn

from sap_fast.reference import correct, projection_matrix, representations

ATOL = 1e-10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _model(seed: int, *modules: nn.Module) -> nn.Module:
    torch.manual_seed(seed)  # module init uses the global RNG
    return nn.Sequential(*modules).double()


def _assert_reproduces(R_groups, weight, bias, out):
    """R_g @ W_g.T + b_g equals the layer output (channels moved last, rows flattened)."""
    groups = len(R_groups)
    out_g = weight.shape[0] // groups
    real = out.movedim(1, -1).reshape(-1, weight.shape[0]) if out.dim() > 2 else out
    for g, R in enumerate(R_groups):
        rows = slice(g * out_g, (g + 1) * out_g)
        pred = R @ weight[rows].flatten(1).T
        if bias is not None:
            pred = pred + bias[rows]
        torch.testing.assert_close(pred, real[:, rows], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 6), (6,)], ids=["2d", "tokens", "unbatched"])
def test_linear_rows_reproduce_output(shape):
    model = _model(1, nn.Linear(6, 4))
    x = _randn(2, *shape)
    R = representations(model, x)["0"]
    assert len(R) == 1 and R[0].dtype == torch.float64 and R[0].shape[1] == 6
    out = model(x).reshape(-1, 4)
    torch.testing.assert_close(R[0] @ model[0].weight.T + model[0].bias, out, atol=ATOL, rtol=0)


def test_shared_module_and_batching_and_tuples():
    lin = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(self.lin(x))

    torch.manual_seed(3)
    model = Twice().double()
    x = _randn(4, 70, 3)  # 70 rows → two batches of the single-tensor path
    R = representations(model, x)["lin"][0]
    with torch.no_grad():
        h = model.lin(x)
    # Per batch: first call's rows, then the second call's.
    expected = torch.cat([x[:64], h[:64], x[64:], h[64:]])
    torch.testing.assert_close(R, expected, atol=ATOL, rtol=0)

    loader = [(x[:64], torch.zeros(64)), [x[64:], torch.zeros(6), "extra"]]
    torch.testing.assert_close(representations(model, loader)["lin"][0], expected, atol=ATOL, rtol=0)


def test_layers_selection_and_unknown_name():
    model = _model(5, nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = _randn(6, 3, 4)
    assert set(representations(model, x)) == {"0", "2"}
    assert set(representations(model, x, layers=["2"])) == {"2"}
    with pytest.raises(ValueError):
        representations(model, x, layers=["1"])  # ReLU is not covered


def test_unused_layer_gets_empty_matrix():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(7)
    model = Unused().double()
    reps = representations(model, _randn(8, 4, 3))
    assert reps["spare"][0].shape == (0, 5)
    fixed = correct(model, _randn(8, 4, 3), alpha=10.0)
    torch.testing.assert_close(fixed.spare.weight, model.spare.weight, atol=0, rtol=0)


# ------------------------------------------------------------------------------- Convolutions

CONV_CASES = [
    # (id, conv ctor, input shape)
    ("1d", lambda: nn.Conv1d(3, 4, 3), (2, 3, 9)),
    ("1d-stride-pad", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)),
    ("1d-same-even-dil", lambda: nn.Conv1d(2, 4, 4, padding="same", dilation=2), (2, 2, 10)),
    ("1d-groups", lambda: nn.Conv1d(4, 6, 3, groups=2, padding=2), (2, 4, 7)),
    ("1d-reflect", lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="reflect"), (2, 2, 8)),
    ("1d-circular-same", lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="circular"), (2, 2, 8)),
    ("1d-unbatched", lambda: nn.Conv1d(2, 3, 3), (2, 8)),
    ("2d", lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
    ("2d-stride2", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 7)),
    ("2d-kernel32-tuplepad", lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2)), (2, 3, 7, 6)),
    ("2d-dilation2", lambda: nn.Conv2d(2, 3, 3, dilation=2, padding=1), (2, 2, 8, 8)),
    ("2d-same", lambda: nn.Conv2d(2, 3, (4, 3), padding="same", dilation=(1, 2)), (2, 2, 7, 8)),
    ("2d-valid", lambda: nn.Conv2d(2, 3, 3, padding="valid"), (2, 2, 6, 5)),
    ("2d-groups2", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 5, 5)),
    ("2d-depthwise", lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1, bias=False), (2, 4, 5, 5)),
    ("2d-reflect", lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="reflect"), (2, 2, 6, 6)),
    ("2d-replicate", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=2, padding_mode="replicate"), (2, 2, 6, 6)),
    ("2d-circular", lambda: nn.Conv2d(4, 4, (3, 2), padding=1, groups=2, padding_mode="circular"), (2, 4, 6, 6)),
    ("2d-reflect-same", lambda: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect"), (2, 2, 6, 6)),
    ("2d-batch1", lambda: nn.Conv2d(3, 2, 3, stride=2), (1, 3, 7, 7)),
    ("3d", lambda: nn.Conv3d(2, 3, (3, 2, 2)), (2, 2, 5, 4, 4)),
    ("3d-stride-pad-dil", lambda: nn.Conv3d(2, 3, 2, stride=2, padding=1, dilation=(1, 2, 1)), (2, 2, 5, 6, 5)),
    ("3d-groups-same", lambda: nn.Conv3d(4, 4, (2, 3, 1), groups=2, padding="same"), (1, 4, 4, 5, 3)),
    ("3d-depthwise-circular", lambda: nn.Conv3d(3, 3, 3, groups=3, padding=1, padding_mode="circular"), (2, 3, 4, 4, 4)),
    ("3d-reflect", lambda: nn.Conv3d(2, 2, 3, padding=(1, 0, 2), padding_mode="reflect"), (1, 2, 4, 4, 5)),
    ("3d-replicate", lambda: nn.Conv3d(2, 2, 2, stride=(1, 2, 2), padding=1, padding_mode="replicate"), (2, 2, 3, 4, 4)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("make,shape", [c[1:] for c in CONV_CASES], ids=[c[0] for c in CONV_CASES])
def test_conv_patches_reproduce_output(make, shape):
    model = _model(11, make())
    conv = model[0]
    x = _randn(12, *shape)
    R = representations(model, x)["0"]
    d = conv.in_channels // conv.groups * torch.Size(conv.kernel_size).numel()
    assert len(R) == conv.groups and all(r.shape[1] == d for r in R)
    out = model(x)
    if x.dim() == len(conv.kernel_size) + 1:
        out = out.unsqueeze(0)  # unbatched
    _assert_reproduces(R, conv.weight, conv.bias, out)


# ------------------------------------------------------------------------------- Attention


class Attn(nn.Module):
    """Calls its MHA on x as query, with fixed key/value/masks (self- or cross-attention)."""

    def __init__(self, mha, kv=None, **call_kwargs):
        super().__init__()
        self.mha, self.kv, self.call_kwargs = mha, kv, call_kwargs

    def forward(self, x):
        k, v = self.kv if self.kv is not None else (x, x)
        return self.mha(x, k, v, **self.call_kwargs)[0]


def _mha_case(seed, batch_first, cross, B=3, L=4, S=5, E=8, H=2, kdim=None, vdim=None, bias=True):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias).double()
    layout = (lambda n, f: (B, n, f)) if batch_first else (lambda n, f: (n, B, f))
    x = _randn(seed + 1, *layout(L, E))
    kv = None
    if cross:
        kv = (_randn(seed + 2, *layout(S, mha.kdim)), _randn(seed + 3, *layout(S, mha.vdim)))
    return mha, x, kv


def _check_mha(model, x):
    mha = model.mha
    reps = representations(model, x)
    assert set(reps) == {"mha.q", "mha.k", "mha.v", "mha.out_proj"}
    out = model(x).reshape(-1, mha.embed_dim)
    R = reps["mha.out_proj"][0]
    pred = R @ mha.out_proj.weight.T
    if mha.out_proj.bias is not None:
        pred = pred + mha.out_proj.bias
    torch.testing.assert_close(pred, out, atol=ATOL, rtol=0)
    torch.testing.assert_close(reps["mha.q"][0], x.reshape(-1, mha.embed_dim), atol=0, rtol=0)
    return reps


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_mha_out_proj_rows_reproduce_output(batch_first, cross):
    kdim, vdim = (6, 5) if cross else (None, None)
    mha, x, kv = _mha_case(21, batch_first, cross, kdim=kdim, vdim=vdim)
    reps = _check_mha(Attn(mha, kv), x)
    key = kv[0] if cross else x
    assert reps["mha.k"][0].shape == (key.shape[0] * key.shape[1], mha.kdim)
    assert reps["mha.v"][0].shape[1] == mha.vdim


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_masks(batch_first):
    B, L, S = 3, 4, 5
    mha, x, kv = _mha_case(31, batch_first, cross=True, B=B, L=L, S=S, kdim=6, vdim=6)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[2, 0] = True
    _check_mha(Attn(mha, kv, key_padding_mask=kpm), x)
    attn_bool = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=2)
    _check_mha(Attn(mha, kv, key_padding_mask=kpm, attn_mask=attn_bool), x)
    attn_float = _randn(32, B * mha.num_heads, L, S)
    _check_mha(Attn(mha, kv, attn_mask=attn_float), x)


def test_mha_need_weights_false_fast_path():
    # Self-attention, batch_first, eval, no grad, need_weights=False: PyTorch may take its
    # native fused path; the unrolled oracle must still agree.
    mha, x, _ = _mha_case(45, batch_first=True, cross=False)
    _check_mha(Attn(mha, need_weights=False), x)


def test_correct_separate_qkv_weights():
    mha, x, kv = _mha_case(47, batch_first=False, cross=True, kdim=6, vdim=5)
    model = Attn(mha, kv)
    reps = representations(model, x)
    fixed = correct(model, x, alpha=7.0)
    for part in "qkv":
        W = getattr(mha, f"{part}_proj_weight")
        expected = W @ projection_matrix(reps[f"mha.{part}"][0], 7.0).T
        torch.testing.assert_close(getattr(fixed.mha, f"{part}_proj_weight"), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(fixed.mha.in_proj_bias, mha.in_proj_bias, atol=0, rtol=0)


def test_mha_unbatched_no_bias():
    mha, x, _ = _mha_case(41, batch_first=False, cross=False, bias=False)
    _check_mha(Attn(mha), x[:, 0])


@pytest.mark.parametrize(
    "ctor,call",
    [
        (dict(add_bias_kv=True), {}),
        (dict(add_zero_attn=True), {}),
        ({}, dict(is_causal=True, attn_mask=torch.ones(3, 3, dtype=torch.bool).triu(1))),
    ],
    ids=["bias_kv", "zero_attn", "is_causal"],
)
def test_mha_unsupported_raise(ctor, call):
    torch.manual_seed(51)
    model = Attn(nn.MultiheadAttention(4, 2, **ctor).double(), **call)
    with pytest.raises(NotImplementedError):
        representations(model, _randn(52, 3, 2, 4))


def test_mha_excludes_out_proj_linear_and_selects_by_name():
    torch.manual_seed(61)
    model = nn.Sequential(Attn(nn.MultiheadAttention(4, 2).double()), nn.Linear(4, 2).double())
    x = _randn(62, 3, 2, 4)
    assert set(representations(model, x)) == {"0.mha.q", "0.mha.k", "0.mha.v", "0.mha.out_proj", "1"}
    assert set(representations(model, x, layers=["0.mha"])) == {"0.mha.q", "0.mha.k", "0.mha.v", "0.mha.out_proj"}


# ------------------------------------------------------------------------------- projection_matrix


def _rank_deficient(seed, n=12, d=6, rank=3):
    g = _gen(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    span, null = basis[:, :rank], basis[:, rank:]
    R = torch.randn(n, rank, generator=g, dtype=torch.float64) @ span.T
    return R, span, null


@pytest.mark.parametrize("alpha", [1.0, 30.0, 1e6])
def test_projection_symmetric_and_bounded(alpha):
    R = _randn(71, 10, 5) * torch.tensor([5.0, 1.0, 0.1, 0.01, 1.0], dtype=torch.float64)
    Wp = projection_matrix(R, alpha)
    assert Wp.shape == (5, 5) and Wp.dtype == torch.float64
    torch.testing.assert_close(Wp, Wp.T, atol=1e-14, rtol=0)
    eig = torch.linalg.eigvalsh(Wp)
    assert eig.min() > -1e-12 and eig.max() < 1 + 1e-12
    # Independent form from the Gram: Wp = α G̃ ((α−1) G̃ + I)⁻¹, G̃ = RᵀR / tr(RᵀR).
    G = R.T @ R
    Gt = G / G.trace()
    expected = alpha * Gt @ torch.linalg.inv((alpha - 1) * Gt + torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(Wp, expected, atol=1e-9, rtol=0)


def test_projection_alpha_one_is_normalised_gram():
    R = _randn(81, 4, 7)  # fewer rows than width: thin SVD keeps 4 directions
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    s = S**2 / (S**2).sum()
    Wp = projection_matrix(R, 1.0)
    torch.testing.assert_close(Wp, Vh.T @ torch.diag(s) @ Vh, atol=1e-14, rtol=0)
    torch.testing.assert_close(Wp, R.T @ R / (R**2).sum(), atol=1e-14, rtol=0)


def test_projection_large_alpha_is_row_space_projector():
    R, span, null = _rank_deficient(91)
    Wp = projection_matrix(R, 1e12)
    torch.testing.assert_close(Wp @ R.T, R.T, atol=1e-9, rtol=0)
    torch.testing.assert_close(Wp @ null, torch.zeros_like(null), atol=1e-9, rtol=0)
    torch.testing.assert_close(Wp, span @ span.T, atol=1e-9, rtol=0)


def test_projection_rejects_bad_input():
    with pytest.raises(ValueError):
        projection_matrix(torch.zeros(3, 2, dtype=torch.float64), 10.0)
    with pytest.raises(ValueError):
        projection_matrix(_randn(1, 3, 2), 0.0)


# ------------------------------------------------------------------------------- correct


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(6, 6)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (B, 6, 6) → treated as 2-channel 3×6 images after fc0
        h = torch.relu(self.fc0(x)).reshape(x.shape[0], 2, 3, 6)
        h = torch.relu(self.bn(self.conv(h)))  # (B, 4, 3, 6)
        t = h.flatten(2).transpose(1, 2)  # (B, 18, 4) tokens
        t = self.attn(t, t, t)[0]
        return self.head(t.mean(1))


def _small(seed):
    torch.manual_seed(seed)
    model = Small().double()
    with torch.no_grad():  # non-trivial BN statistics so the buffers are worth checking
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


def test_correct_leaves_caller_model_unchanged():
    model = _small(101)
    before = copy.deepcopy(model.state_dict())
    fixed = correct(model, _randn(102, 5, 6, 6), alpha=100.0)
    assert fixed is not model
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert model.training  # the caller's mode is not flipped either


def test_correct_changes_only_covered_weights():
    model = _small(111)
    fixed = correct(model, _randn(112, 5, 6, 6), alpha=100.0)
    covered = {"fc0.weight", "conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"}
    new = fixed.state_dict()
    for k, v in model.state_dict().items():
        if k in covered:
            assert not torch.allclose(new[k], v), k
        else:
            torch.testing.assert_close(new[k], v, atol=0, rtol=0, msg=k)


def test_correct_applies_each_records_projection():
    model = _small(121)
    data = _randn(122, 5, 6, 6)
    alpha = 50.0
    reps = representations(model, data)
    fixed = correct(model, data, alpha=alpha)

    def wp(rec, g=0):
        return projection_matrix(reps[rec][g], alpha)

    torch.testing.assert_close(fixed.fc0.weight, model.fc0.weight @ wp("fc0").T, atol=1e-12, rtol=0)
    W = model.conv.weight.flatten(1)
    for g in range(2):
        rows = slice(2 * g, 2 * g + 2)
        torch.testing.assert_close(fixed.conv.weight.flatten(1)[rows], W[rows] @ wp("conv", g).T, atol=1e-12, rtol=0)
    for i, part in enumerate("qkv"):
        rows = slice(4 * i, 4 * i + 4)
        expected = model.attn.in_proj_weight[rows] @ wp(f"attn.{part}").T
        torch.testing.assert_close(fixed.attn.in_proj_weight[rows], expected, atol=1e-12, rtol=0)
    expected = model.attn.out_proj.weight @ wp("attn.out_proj").T
    torch.testing.assert_close(fixed.attn.out_proj.weight, expected, atol=1e-12, rtol=0)


def test_correct_large_alpha_keeps_trusted_rows_and_kills_orthogonal_ones():
    R, _, null = _rank_deficient(131, n=12, d=6, rank=3)
    model = _model(132, nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    fixed = correct(model, R, alpha=1e12)
    first, orig = fixed[0], model[0]
    with torch.no_grad():
        # Trusted rows r: corrected layer gives W Wpᵀ r ≈ W r (r lies in the kept span).
        torch.testing.assert_close(first(R), orig(R), atol=1e-8, rtol=0)
        # Directions orthogonal to every trusted row are removed: only the bias is left.
        torch.testing.assert_close(first(null.T), first.bias.expand(3, 4), atol=1e-8, rtol=0)


def test_correct_keeps_float32_dtype_and_conv3d_grouped():
    torch.manual_seed(141)
    model = nn.Sequential(nn.Conv3d(2, 4, 2, groups=2, padding_mode="circular", padding=1), nn.Flatten())
    x = torch.randn(2, 2, 3, 3, 3, generator=_gen(142))
    fixed = correct(model, x, alpha=20.0)
    assert fixed[0].weight.dtype == torch.float32
    reps = representations(model, x)["0"]
    W = model[0].weight.detach().double().flatten(1)
    for g in range(2):
        rows = slice(2 * g, 2 * g + 2)
        expected = (W[rows] @ projection_matrix(reps[g], 20.0).T).float()
        torch.testing.assert_close(fixed[0].weight.flatten(1)[rows], expected, atol=0, rtol=0)
