"""The Triton implicit-im2col Gram kernel (sap_fast/backends/triton/gram.py) against independent
float64 oracles: one-hot convolutions (F.conv1d/2d/3d with an identity weight read every patch
exactly), F.unfold for 2-D, the pipeline's own rows (accumulate.conv_row_chunks) and the native
op (torch.ops.sap_fast.conv_gram) where it is built.

On a machine without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``;
see triton_support.py); with CUDA the same tests also run compiled.

Errors are entrywise, scaled by Cauchy–Schwarz: ``|G − O|_ij / sqrt(O_ii O_jj)`` (the size of the
sum of |products| behind entry ij), max over all entries, against the float64 oracle ``O`` of the
mode's rounded inputs. The devices, the modes and their tolerances are tests/cases.py's (fp64
1e-12; fp32, tf32, bf16 1e-5). For tf32/bf16 the oracle's inputs are rounded to 11/8 significant
bits by round-half-to-even (torch.frexp/round, independent of the module's bit trick), while the
unrounded Gram is visibly farther (checked, so a kernel that skipped the rounding would fail).

What the interpreter can and cannot prove: it runs the kernel's index math, masks, tiling,
split-K atomics, mirror and in-kernel TF32/BF16 rounding exactly as written, but its ``tl.dot``
is ``numpy.matmul`` in the accumulator dtype: ``input_precision="tf32"`` is ignored and the bf16
dot is replaced by an fp32 one (triton 3.8's interpreter multiplies bf16 bit patterns as
integers). Since the operands are rounded in the kernel first, that is the same value up to
summation order, but the tensor-core lowering (and the fp64 MMA, atomics and register use) is
only exercised by the CUDA parametrisation.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sap_fast.accumulate import conv_row_chunks
from sap_fast.backends.native import native
from sap_fast.backends.precision import round_inputs as _round_inputs

from cases import (DTYPE, DTYPES, MODE_OF, MODES, ONE_ROUNDING_TOL, SIGNIFICANT_BITS, TOL, devices_param,
                   modes_param)

from .triton_support import kernel_module

gt, DEVICES = kernel_module("gram")

pytestmark = pytest.mark.usefixtures("one_thread")


# name: (N, C, spatial size, kernel, stride, padding, dilation, groups, launch options).
# Small blocks (16) give several tiles, ragged last tiles (d not a multiple of 16) and, with
# splits, several row ranges meeting by atomics; "default" uses the module's own choice.
SMALL = dict(block_d=16, block_k=16)
CASES = {
    "2d-k3-s2-p1-split3": (2, 3, (9, 7), (3, 3), (2, 2), (1, 1), (1, 1), 1, dict(SMALL, splits=3)),
    "2d-dil2-batch1": (1, 2, (11, 10), (3, 3), (1, 1), (2, 2), (2, 2), 1, SMALL),
    "2d-groups2-k1x3": (2, 6, (7, 6), (1, 3), (2, 1), (0, 1), (1, 1), 2, SMALL),
    "2d-depthwise": (2, 5, (8, 9), (3, 3), (1, 1), (1, 1), (1, 1), 5, dict(SMALL, splits=2)),
    "2d-k3x1": (2, 4, (7, 8), (3, 1), (1, 2), (1, 0), (1, 1), 1, SMALL),
    "2d-k5x2-dil-split2": (2, 3, (10, 9), (5, 2), (2, 1), (2, 1), (1, 2), 1, dict(SMALL, splits=2)),
    "2d-stride3-gaps": (2, 3, (10, 8), (2, 2), (3, 3), (0, 0), (1, 1), 1, SMALL),
    "2d-1x1-d37": (3, 37, (5, 3), (1, 1), (1, 1), (0, 0), (1, 1), 1, SMALL),
    "2d-default-blocks": (2, 4, (6, 5), (3, 3), (1, 1), (1, 1), (1, 1), 1, {}),
    "1d-s2-p1-dil2": (3, 5, (17,), (3,), (2,), (1,), (2,), 1, SMALL),
    "1d-groups3-k4": (2, 6, (11,), (4,), (1,), (2,), (1,), 3, SMALL),
    "3d-mixed": (2, 2, (5, 6, 4), (3, 2, 3), (1, 2, 1), (1, 0, 1), (1, 1, 2), 1, dict(SMALL, splits=2)),
    "3d-groups2": (1, 4, (4, 5, 3), (2, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1), 2, SMALL),
}


HEAVY = ("2d-depthwise", "3d-mixed")  # the interpreter's slowest cases: in the full suite only


def geometry(case):
    n, c, size, k, s, p, dil, g, launch = CASES[case]
    return dict(kernel_size=list(k), stride=list(s), padding=list(p), dilation=list(dil), groups=g), launch


def make_x(case, seed, device="cpu", dtype=torch.float32, integers=False):
    n, c, size = CASES[case][:3]
    gen = torch.Generator().manual_seed(seed)
    if integers:  # small integers: every product and every partial sum is exact in all modes
        x = torch.randint(-3, 4, (n, c, *size), generator=gen).to(dtype)
    else:
        x = torch.randn(n, c, *size, generator=gen, dtype=torch.float64).to(dtype)
    return x.to(device)


def round_significand(x, bits):
    """Round to ``bits`` significant bits, ties to even (independent of the module's bit trick)."""
    m, e = torch.frexp(x.double())  # x = m·2^e, |m| in [0.5, 1): m·2^bits is exact in float64
    return torch.ldexp(torch.round(m * 2.0**bits) / 2.0**bits, e)


def mode_inputs(x, precision):
    """The float64 values that a precision mode multiplies."""
    if precision == "fp64":
        return x.double()
    x = x.float().double()
    return round_significand(x, SIGNIFICANT_BITS[precision]) if precision in SIGNIFICANT_BITS else x


def oracle_rows(x, kernel_size, stride, padding, dilation, groups):
    """(groups, rows, d) patch matrices in float64 from a one-hot convolution: output channel
    ``g·d + j`` has a single 1 at patch element j of group g (weight.view(out, -1) order), so the
    conv output is the patch matrix, exactly (products by 1, sums with 0)."""
    x = x.double()
    spatial = x.dim() - 2
    cg = x.shape[1] // groups
    d = cg * math.prod(kernel_size)
    eye = torch.eye(d, dtype=torch.float64, device=x.device).reshape(d, cg, *kernel_size)
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    out = conv(x, eye.repeat(groups, *[1] * (spatial + 1)), stride=stride, padding=padding,
               dilation=dilation, groups=groups)  # (N, groups·d, *out)
    out = out.unflatten(1, (groups, d)).movedim(2, -1)  # (N, groups, *out, d)
    return out.movedim(1, 0).reshape(groups, -1, d)  # rows: (sample, position) row-major


def oracle_gram(x, precision, **geo):
    r = oracle_rows(mode_inputs(x, precision), **geo)
    return r.transpose(1, 2) @ r


def scaled_err(got, want):
    """max_ij |got − want| / sqrt(want_ii want_jj) (0/0 counts as 0)."""
    got, want = got.double().cpu(), want.double().cpu()
    diag = want.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    scale = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt()
    diff = (got - want).abs()
    assert torch.all((scale > 0) | (diff == 0)), "a nonzero entry where the oracle's column is 0"
    return float((diff / scale.clamp_min(1e-300)).max()) if diff.numel() else 0.0


def check_gram(got, x, precision, device):
    assert got.device.type == device
    assert got.dtype == (torch.float64 if precision == "fp64" else torch.float32)
    assert got.is_contiguous()
    assert torch.equal(got, got.transpose(1, 2)), "not exactly symmetric"


# ---------------------------------------------------------------------------------------------


def test_the_kernel_has_the_modes_of_the_cases():
    assert tuple(gt.PRECISIONS) == MODES


def test_oracle_matches_unfold():
    """The one-hot-conv oracle agrees with F.unfold, column order included (2-D, groups)."""
    geo, _ = geometry("2d-groups2-k1x3")
    x = make_x("2d-groups2-k1x3", seed=1).double()
    rows = oracle_rows(x, **geo)
    cols = F.unfold(x, geo["kernel_size"], dilation=geo["dilation"], padding=geo["padding"],
                    stride=geo["stride"])  # (N, C·taps, L): channel-major = weight.view order
    d = rows.shape[-1]
    for g in range(geo["groups"]):
        want = cols[:, g * d:(g + 1) * d].transpose(1, 2).reshape(-1, d)
        assert torch.equal(rows[g], want)


@devices_param(DEVICES)
@modes_param()
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in HEAVY else c for c in CASES])
def test_matches_oracle(case, precision, device):
    geo, launch = geometry(case)
    x = make_x(case, seed=len(case) * 31 + len(precision), device=device)
    got = gt.conv_gram(x, **geo, precision=precision, **launch)
    check_gram(got, x, precision, device)
    want = oracle_gram(x, precision, **geo)
    groups, d = geo["groups"], want.shape[-1]
    assert got.shape == (groups, d, d)
    assert scaled_err(got, want) < TOL[precision]
    twin = gt.conv_gram_reference(x, **geo, precision=precision)
    assert twin.dtype == got.dtype and torch.equal(twin, twin.transpose(1, 2))
    # the twin rounds a float64 Gram once to the output dtype: eps64 or half an ulp of fp32
    assert scaled_err(twin, want) < ONE_ROUNDING_TOL[DTYPE[precision]]
    if precision in SIGNIFICANT_BITS:  # the rounding really happened: unrounded is farther away
        unrounded = oracle_gram(x, "fp32", **geo)
        assert scaled_err(got, unrounded) > 3 * TOL[precision]  # observed ≥ 1.3e-4


@devices_param(DEVICES)
@modes_param()
@pytest.mark.parametrize("case", ["2d-k3-s2-p1-split3", pytest.param("3d-mixed", marks=pytest.mark.slow),
                                  "1d-groups3-k4"])
def test_integer_inputs_are_exact(case, precision, device):
    """Small integers make every product and partial sum exact in every mode (bf16 holds them
    too), so the kernel must equal the oracle bit for bit, atomics and all."""
    geo, launch = geometry(case)
    x = make_x(case, seed=7, device=device, integers=True)
    got = gt.conv_gram(x, **geo, precision=precision, **launch)
    check_gram(got, x, precision, device)
    assert torch.equal(got.cpu(), oracle_gram(x, "fp64", **geo).to(got.dtype).cpu())


# value → its rounding, ties included: half-up and truncation both give other answers somewhere
ROUNDING = {
    "tf32": [(1 + 2**-11, 1.0),                     # tie, even is below
             (1 + 3 * 2**-11, 1 + 2**-9),           # tie, even is above
             (1 + 2**-11 + 2**-20, 1 + 2**-10),     # just above the tie
             (-(1 + 3 * 2**-11), -(1 + 2**-9)),     # sign
             (2 - 2**-12, 2.0),                     # carry into the exponent
             (3.0, 3.0), (0.0, 0.0)],
    "bf16": [(1 + 2**-8, 1.0), (1 + 3 * 2**-8, 1 + 2**-6), (1 + 2**-8 + 2**-20, 1 + 2**-7),
             (-(1 + 3 * 2**-8), -(1 + 2**-6)), (2 - 2**-9, 2.0), (3.0, 3.0), (0.0, 0.0)],
}


@devices_param(DEVICES)
@modes_param(SIGNIFICANT_BITS)
def test_input_rounding_is_nearest_even(precision, device):
    """One row (N = 1, length 1, 1×1 kernel) makes G = r rᵀ of the rounded inputs: single
    products, exact in fp32, so each entry shows exactly how the kernel rounded."""
    values, rounded = (torch.tensor(v, dtype=torch.float64) for v in zip(*ROUNDING[precision]))
    assert torch.equal(values.float().double(), values)  # the test values are fp32 numbers
    assert torch.equal(round_significand(values, SIGNIFICANT_BITS[precision]), rounded)
    x = values.float().reshape(1, -1, 1).to(device)
    want = torch.outer(rounded, rounded).float().unsqueeze(0)
    got = gt.conv_gram(x, [1], [1], [0], [1], 1, precision)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(gt.conv_gram_reference(x, [1], [1], [0], [1], 1, precision).cpu(), want)
    assert torch.equal(gt.round_inputs(values, precision).double(), rounded)
    # the module's twin rounds as the pipeline's input_precision emulation does
    x = torch.randn(1000, dtype=torch.float32)
    assert torch.equal(gt.round_inputs(x, precision), _round_inputs(x, precision))


@pytest.mark.slow  # a few seconds: left out of the fast target
@devices_param(DEVICES)
def test_any_strides_without_copy(device, monkeypatch):
    """channels_last (2-D and 3-D), a channel/spatial slice and an expanded (stride 0) batch read
    through their strides: with one row range the summation order is the same, so the result
    equals the contiguous input's bit for bit. Tensor.contiguous is never called."""
    cases = []
    geo, launch = geometry("2d-k5x2-dil-split2")
    x = make_x("2d-k5x2-dil-split2", seed=3, device=device)
    cases.append((x, x.contiguous(memory_format=torch.channels_last), geo))
    geo3, _ = geometry("3d-mixed")
    x3 = make_x("3d-mixed", seed=4, device=device)
    cases.append((x3, x3.contiguous(memory_format=torch.channels_last_3d), geo3))
    big = torch.randn(2, 7, 21, 9, dtype=torch.float64).float().to(device)
    sliced = big[:, 1::2, ::2, 1:]  # channel step 2, row step 2, offset start
    cases.append((sliced.contiguous(), sliced, geo))
    expanded = x[:1].expand(3, *x.shape[1:])
    cases.append((expanded.contiguous(), expanded, geo))
    for plain, strided, g in cases:
        assert not strided.is_contiguous()
        want = gt.conv_gram(plain, **g, precision="fp64", block_d=16, block_k=16, splits=1)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("copied the input"))
            got = gt.conv_gram(strided, **g, precision="fp64", block_d=16, block_k=16, splits=1)
        assert torch.equal(got, want)
        assert scaled_err(got, oracle_gram(plain, "fp64", **g)) < TOL["fp64"]


@devices_param(DEVICES)
@modes_param(MODE_OF.values())
def test_float64_input(precision, device):
    """float64 x: fp64 mode multiplies it as is (float64 products round: still ~eps64), fp32 mode
    rounds it to fp32 first."""
    geo, launch = geometry("2d-k3-s2-p1-split3")
    x = make_x("2d-k3-s2-p1-split3", seed=5, device=device, dtype=torch.float64)
    got = gt.conv_gram(x, **geo, precision=precision, **launch)
    check_gram(got, x, precision, device)
    assert scaled_err(got, oracle_gram(x, precision, **geo)) < TOL[precision]


@devices_param(DEVICES)
def test_split_counts_agree(device):
    """1, 2 and 7 row ranges (atomics into zeros vs plain stores) give the same Gram."""
    geo, _ = geometry("2d-1x1-d37")
    x = make_x("2d-1x1-d37", seed=6, device=device)
    one = gt.conv_gram(x, **geo, block_d=16, block_k=16, splits=1)
    for splits in (2, 7):
        many = gt.conv_gram(x, **geo, block_d=16, block_k=16, splits=splits)
        assert torch.equal(many, many.transpose(1, 2))
        assert scaled_err(many, one) < 1e-14


def test_choose_splits():
    """Split-K covers every row once, in whole BLOCK_K steps, with no empty range; it fills ~132
    SMs when the rows allow, keeps ≥ 32 steps per range, and caps the grid's axis 1."""
    for rows, tile_programs, block_k, sms, forced in [(10**7, 3, 16, 132, None), (5000, 1, 32, 132, None),
                                                      (100, 6, 16, 132, None), (10**12, 1, 16, 10**6, None),
                                                      (60, 3, 16, 1, 3), (60, 3, 16, 1, 100)]:
        splits, per = gt.choose_splits(rows, tile_programs, block_k, sms, forced)
        assert per % block_k == 0 and 1 <= splits <= 65535
        assert (splits - 1) * per < rows <= splits * per
        if forced:
            assert splits <= forced
        elif rows >= 4 * sms * 32 * block_k:
            assert splits * tile_programs >= 4 * sms or splits == 65535
        if forced is None and splits > 1:
            assert per >= 32 * block_k
    assert gt.choose_splits(10**7, 3, 16, 132)[0] * 3 >= 4 * 132
    assert gt.choose_splits(100, 6, 16, 132)[0] == 1


@devices_param(DEVICES)
@modes_param()
def test_linear_gram(precision, device):
    """A transposed (non-contiguous) row block (m, d) of a linear layer: (1, d, d) = rowsᵀ rows."""
    gen = torch.Generator().manual_seed(8)
    rows = torch.randn(21, 45, generator=gen, dtype=torch.float64).float().to(device).T  # (45, 21)
    got = gt.linear_gram(rows, precision, block_d=16, block_k=16, splits=2)
    check_gram(got, rows, precision, device)
    r = mode_inputs(rows, precision)
    assert got.shape == (1, 21, 21)
    assert scaled_err(got, (r.T @ r).unsqueeze(0)) < TOL[precision]
    assert torch.equal(gt.linear_gram_reference(rows, precision),
                       gt.conv_gram_reference(rows.unsqueeze(-1), [1], [1], [0], [1], 1, precision))


@devices_param(DEVICES)
@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 2, 3, stride=2, padding=2, dilation=2),
    nn.Conv2d(6, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), groups=2),
    nn.Conv3d(2, 2, (2, 3, 1), stride=(1, 1, 2), padding=(0, 1, 0)),
], ids=["1d", "2d-groups", "3d"])
def test_matches_pipeline_rows(conv, device):
    """Same Gram as the pipeline's own rows (accumulate.conv_row_chunks) for a conv module."""
    spatial = len(conv.kernel_size)
    x = torch.randn(2, conv.in_channels, *(7, 6, 5)[:spatial], dtype=torch.float64).float().to(device)
    d = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    rows = torch.cat(list(conv_row_chunks(conv, x, conv.groups, d, 10**6, torch.float64)), dim=1)
    want = rows.transpose(1, 2) @ rows
    got = gt.conv_gram(x, list(conv.kernel_size), list(conv.stride), list(conv.padding),
                       list(conv.dilation), conv.groups, "fp64", block_d=16, block_k=16)
    assert scaled_err(got, want) < TOL["fp64"]


@pytest.mark.skipif(native() is None, reason="sap_fast._C is not built")
@pytest.mark.parametrize("case", ["2d-k3-s2-p1-split3", "2d-depthwise", "1d-s2-p1-dil2", "3d-mixed"])
def test_matches_native_op(case):
    """Same contract as torch.ops.sap_fast.conv_gram (its CPU kernel), float64 and float32."""
    geo, launch = geometry(case)
    x = make_x(case, seed=9)
    args = (geo["kernel_size"], geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    for dtype in DTYPES:
        precision = MODE_OF[dtype]
        native = torch.ops.sap_fast.conv_gram(x, *args, dtype)
        got = gt.conv_gram(x.to(DEVICES[0]), *args, precision, **launch)
        assert got.shape == native.shape and got.dtype == native.dtype
        assert scaled_err(got, native) < 2 * TOL[precision]


@devices_param(DEVICES)
def test_empty_inputs(device):
    x = torch.zeros(0, 4, 5, 5, device=device)  # no samples: no rows
    for precision in ("fp64", "fp32"):
        got = gt.conv_gram(x, [3, 3], [1, 1], [1, 1], [1, 1], 2, precision)
        assert got.shape == (2, 18, 18) and not got.any()
        assert torch.equal(got, gt.conv_gram_reference(x, [3, 3], [1, 1], [1, 1], [1, 1], 2, precision))
    none = gt.conv_gram(torch.zeros(2, 0, 5, device=device), [3], [1], [0], [1], 1)  # no channels
    assert none.shape == (1, 0, 0)
    one = gt.conv_gram(torch.full((2, 1, 3), 2.0, device=device), [1], [1], [0], [1], 1)  # d = 1
    assert one.shape == (1, 1, 1) and one.item() == 24.0


@pytest.mark.slow  # a few seconds: left out of the fast target
def test_configs_and_defaults():
    """Every autotune candidate and the defaults launch and agree (the interpreter ignores
    num_warps/num_stages; on a GPU this also compiles each one)."""
    geo, _ = geometry("2d-groups2-k1x3")
    x = make_x("2d-groups2-k1x3", seed=10, device=DEVICES[-1])
    for precision in MODES:
        want = oracle_gram(x, precision, **geo)
        default = gt.default_config(want.shape[-1], precision)
        for cfg in [default] + gt.configs(precision):
            assert cfg["block_d"] >= 16 and cfg["block_k"] >= 16 and cfg["num_warps"] in (4, 8)
            got = gt.conv_gram(x, **geo, precision=precision, **cfg)
            assert scaled_err(got, want) < TOL[precision], (precision, cfg)


def _bad_calls():
    x = torch.randn(2, 6, 5, 5)
    good = dict(x=x, kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=2,
                precision="fp64")
    cases = {  # name: (changes, exception, message pattern)
        "x-2d": (dict(x=x[0, 0]), ValueError, r"x must be \(N, C, \*spatial\) with 1 to 3 spatial dims"),
        "x-6d": (dict(x=x[None, None]), ValueError, r"x must be \(N, C, \*spatial\)"),
        "int-input": (dict(x=x.long()), ValueError, "x must be float32 or float64, got torch.int64"),
        "half-input": (dict(x=x.half()), ValueError, "x must be float32 or float64, got torch.float16"),
        "groups-not-dividing": (dict(groups=4), ValueError, "groups=4 must be a positive int dividing the 6"),
        "groups-zero": (dict(groups=0), ValueError, "groups=0 must be a positive int"),
        "bad-precision": (dict(precision="fp16"), ValueError, r"precision must be one of \('fp64'"),
        "precision-dtype": (dict(precision=torch.float64), ValueError, "precision must be one of"),
        "kernel-entries": (dict(kernel_size=[3]), ValueError, "kernel_size must be an int or 2 ints"),
        "negative-padding": (dict(padding=[1, -1]), ValueError, "padding non-negative"),
        "zero-stride": (dict(stride=[0, 1]), ValueError, "stride and dilation must be positive"),
        "kernel-too-large": (dict(kernel_size=[9, 3]), ValueError, "smaller than the dilated kernel"),
        "not-tensor": (dict(x=x.tolist()), TypeError, "x must be a tensor"),
    }
    return good, cases


_GOOD, _BAD = _bad_calls()


@pytest.mark.parametrize("fn", ["conv_gram", "conv_gram_reference"])
@pytest.mark.parametrize("bad", list(_BAD))
def test_errors(fn, bad):
    """Kernel launcher and twin reject the same calls with the same one-line message."""
    args, cases = _bad_calls()
    changes, exc, match = cases[bad]
    args.update(changes)
    with pytest.raises(exc, match=match) as info:
        getattr(gt, fn)(args.pop("x"), **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("options, match", [
    (dict(block_d=24), "block_d must be a power of 2 >= 16"),
    (dict(block_k=8), "block_k must be a power of 2 >= 16"),
    (dict(splits=0), "splits must be a positive int"),
    (dict(num_warps=0), "num_warps must be a positive int"),
])
def test_launch_option_errors(options, match):
    with pytest.raises(ValueError, match=match):
        gt.conv_gram(torch.randn(2, 4, 5), [3], [1], [1], [1], 1, **options)
    with pytest.raises(ValueError, match="configs|precision must be one of"):
        gt.configs("double")


def test_linear_gram_errors():
    for fn in (gt.linear_gram, gt.linear_gram_reference):
        with pytest.raises(ValueError, match=r"rows must be 2-D \(m, d\), got shape \(2, 3, 4\)"):
            fn(torch.randn(2, 3, 4))
        with pytest.raises(TypeError, match="rows must be a tensor"):
            fn([[1.0]])


def test_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(gt, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="CPU tensors need TRITON_INTERPRET=1"):
        gt.conv_gram(torch.randn(2, 4, 5), [3], [1], [1], [1], 1)
