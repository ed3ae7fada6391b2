"""The shift-correlation Gram in torch ops (:mod:`sap_fast.shift`, the GPU's ``SAP_FAST_GRAM_KERNEL
=shift`` route) against an ``F.unfold`` oracle, on every device of tests/cases.py, float64: ≤ 1e-12
relative (the same products, summed in another order)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sap_fast
from sap_fast.backends import gram as gram_backend
from sap_fast.backends.shift import pays, shift_gram
from cases import DEVICES, devices_param, tol
from support import rel_err

from .gram_support import force_gram, real_route, rows_only

TOL64 = tol(torch.float64)

pytestmark = pytest.mark.usefixtures("one_thread")


def unfold_gram(x, kernel, padding, dilation, groups):
    if x.dim() == 3:
        x, kernel, padding, dilation = x.unsqueeze(2), (1, *kernel), (0, *padding), (1, *dilation)
    n, c = x.shape[:2]
    rows = F.unfold(x.double(), kernel, dilation=dilation, padding=padding)  # (n, c·taps, L)
    cg, taps = c // groups, kernel[0] * kernel[1]
    rows = rows.view(n, groups, cg * taps, -1).permute(1, 0, 3, 2).reshape(groups, -1, cg * taps)
    return rows.transpose(1, 2) @ rows


CASES = {  # (N, C, spatial, kernel, padding, dilation, groups)
    "3x3": (2, 4, (9, 8), (3, 3), (1, 1), (1, 1), 1),
    "nonsquare-dil-groups": (3, 6, (11, 7), (3, 2), (1, 0), (2, 1), 2),
    "5x5-depthwise-batch1": (1, 3, (10, 10), (5, 5), (2, 2), (1, 1), 3),
    "1x3-dil2": (2, 4, (12, 9), (1, 3), (0, 1), (1, 2), 1),
    "no-padding": (2, 5, (9, 9), (3, 3), (0, 0), (1, 1), 1),
    "1d": (3, 4, (17,), (3,), (1,), (2,), 2),
}


@devices_param(DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_shift_gram_matches_unfold(case, device):
    n, c, size, k, p, dil, g = CASES[case]
    x = torch.randn(n, c, *size, generator=torch.Generator().manual_seed(len(case))).to(device)
    got = shift_gram(x, list(k), list(p), list(dil), g, torch.float64)
    d = c // g * (k[0] if len(k) == 1 else k[0] * k[1])
    assert got.shape == (g, d, d) and got.dtype == torch.float64 and got.device == x.device
    assert rel_err(got, unfold_gram(x, k, p, dil, g)) <= TOL64


def test_no_core_means_no_shift_gram():
    x = torch.randn(1, 2, 4, 4)  # 3×3, no padding: out 2×2, core 0×0
    assert shift_gram(x, [3, 3], [0, 0], [1, 1], 1, torch.float64) is None


@pytest.mark.parametrize("side, expected", [(56, True), (28, True), (14, True), (7, False)])
def test_pays_on_resnet_maps(side, expected):
    """ResNet-50's 3×3 pad-1 convs: fewer multiply-adds than the direct upper triangle on 56²
    (1.56×), 28² (1.38×) and 14² (1.13×) maps, more on 7² (0.86×)."""
    assert pays((side + 2, side + 2), (3, 3), (1, 1)) is expected
    assert not pays((side + 2, side + 2), (1, 1), (1, 1))  # 1×1: nothing to share


def test_shift_route_through_collect_stats(monkeypatch):
    """SAP_FAST_GRAM_KERNEL=shift as on a GPU (the real router, told the tensors are on a GPU
    without CUDA or Triton kernels): the stride-1 3×3 layers where it pays take the torch shift
    form, the others (reflect-padded too) fall back, and the Grams equal the portable path's."""
    calls = []
    import sap_fast.backends.shift as shift_module
    real = shift_module.shift_gram
    monkeypatch.setattr(shift_module, "shift_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(4, 4, 3, stride=2), nn.Conv2d(4, 2, 3)).double()
    x = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    monkeypatch.setattr(gram_backend, "_choice_for", lambda device_type: "shift")
    force_gram(monkeypatch, lambda call: real_route(
        "cuda", call.dtype, call.input_precision, conv=call.conv, stride_one_spatial=call.stride_one,
        shift_pays=call.shift_pays, native_cpu=True, native_cuda=False, triton_ok=False, choice=call.choice))
    got = sap_fast.collect_stats(model, x, batch_size=2)
    assert calls, "the shift form never ran"
    rows_only(monkeypatch)
    want = sap_fast.collect_stats(model, x, batch_size=2)
    for name in want:
        assert rel_err(got[name].gram, want[name].gram) <= TOL64, name


@pytest.mark.parametrize("call, message", [
    (lambda x: shift_gram(x[0, 0], [3, 3], [1, 1], [1, 1], 1, torch.float64), "x must be a floating"),
    (lambda x: shift_gram(x.long(), [3, 3], [1, 1], [1, 1], 1, torch.float64), "x must be a floating"),
    (lambda x: shift_gram(x, [3], [1, 1], [1, 1], 1, torch.float64), "kernel_size must be 2 int"),
    (lambda x: shift_gram(x, [3, 3], [-1, 1], [1, 1], 1, torch.float64), "padding must be 2 int"),
    (lambda x: shift_gram(x, [3, 3], [1, 1], [0, 1], 1, torch.float64), "dilation must be 2 int"),
    (lambda x: shift_gram(x, [3, 3], [1, 1], [1, 1], 3, torch.float64), "groups must be a positive int"),
    (lambda x: shift_gram(x, [3, 3], [1, 1], [1, 1], 1, torch.float16), "dtype must be"),
])
def test_bad_arguments_are_one_line_errors(call, message):
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=message) as err:
        call(x)
    assert "\n" not in str(err.value)
