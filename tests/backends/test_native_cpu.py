"""The native CPU kernels (csrc/cpu/) against the float64 oracle, their dispatch, and the
fallback when the extension is missing.

The C++ kernels run on the CPU alone; their dtypes and tolerances are tests/cases.py's (max-abs
error relative to max |G|): float64 accumulation 1e-12 (the kernels reorder exact products of
float64 inputs); float32 accumulation 1e-5 (a few hundred fp32 products per entry, so a few ulps
of 6e-8 times √rows).
"""
import os
import sys

import pytest
import torch
from torch import nn

import sap_fast
from sap_fast import reference
from sap_fast.backends import native as backend
from sap_fast.backends.info import backend_info
from sap_fast._runtime.geometry import kernel_input as _native_padding
from cases import CPU, DTYPES, devices_param, tol
from support import CONV_CASES, conv_case, rel_err

if backend.native() is None:  # CI builds the extension; there a missing one is a failure
    if os.environ.get("SAP_FAST_REQUIRE_NATIVE") == "1":
        raise RuntimeError(backend_info()["native"]["reason"])
    pytest.skip("sap_fast._C is not built (pip install --no-build-isolation -e .)",
                allow_module_level=True)

# extra shapes beyond CONV_CASES: batch of 1, padding wider than the kernel, a kernel as large
# as the image, 1x1, depthwise stride 1, 3-D dilation, odd everything
EXTRA_CASES = {
    "2d-pad-wider-than-kernel": (2, dict(kernel_size=3, padding=3), (5, 4)),
    "2d-kernel-covers-image": (2, dict(kernel_size=(4, 5)), (4, 5)),
    "2d-1x1": (2, dict(kernel_size=1), (3, 7)),
    "2d-depthwise-s1-dil": (2, dict(kernel_size=3, padding=2, dilation=2, groups=4), (7, 9)),
    "1d-k5-pad1": (1, dict(kernel_size=5, padding=1), (13,)),
    "3d-dil-pad": (3, dict(kernel_size=(3, 1, 2), padding=(2, 0, 1), dilation=(2, 1, 3)), (5, 3, 7)),
}
CASES = {**CONV_CASES, **EXTRA_CASES}


def _case(name, batch, seed):
    if name in CONV_CASES:
        return conv_case(name, batch, seed)
    dim, kwargs, size = EXTRA_CASES[name]
    torch.manual_seed(seed)
    model = nn.Sequential({1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](4, 4, **kwargs)).double()
    return model, torch.randn(batch, 4, *size, dtype=torch.float64)


def _oracle_gram(model, x):
    rs = reference.representations(model, x, layers=["0"])["0"]
    return torch.stack([r.T @ r for r in rs])


def _max_rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


def _run(op, conv, x, dtype):
    x, padding = _native_padding(conv, x)
    k, dil = list(conv.kernel_size), list(conv.dilation)
    if op == "shift":
        return torch.ops.sap_fast.conv_gram_shift(x, k, padding, dil, conv.groups, dtype)
    return torch.ops.sap_fast.conv_gram(x, k, list(conv.stride), padding, dil, conv.groups, dtype)


def _stride_one(name):
    stride = CASES[name][1].get("stride", 1)
    return all(s == 1 for s in (stride if isinstance(stride, tuple) else (stride,)))


# the shift-correlation kernel is for stride-1 convs only (the dispatch never sends it others)
KERNEL_CASES = [(name, op) for name in sorted(CASES) for op in ("tiled", "shift")
                if op == "tiled" or _stride_one(name)]


@devices_param(CPU)
@pytest.mark.parametrize("name, op", KERNEL_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_gram_matches_oracle(name, op, batch, device):
    model, x = _case(name, batch, seed=batch * 7 + len(name))
    conv = model[0]
    for dtype in DTYPES:  # float64 inputs summed in float64; their float32 rounding in float32
        inputs = x.to(device, dtype)
        got = _run(op, conv, inputs, dtype)
        assert got.dtype == dtype and got.device == inputs.device
        assert _max_rel(got, _oracle_gram(model, inputs.double())) <= tol(dtype)


@pytest.mark.parametrize("op", ["tiled", "shift"])
def test_conv_gram_float32_input_float64_accumulation_is_exact(op):
    """fp32 inputs accumulated in fp64 are exact products: no fp32 rounding anywhere."""
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 9, 8) * 1e3
    expected = _oracle_gram(nn.Sequential(conv).double(), x.double())
    assert _max_rel(_run(op, conv, x, torch.float64), expected) <= 1e-13


@pytest.mark.parametrize("op", ["tiled", "shift"])
def test_conv_gram_reads_non_contiguous_input(op):
    conv = nn.Conv2d(4, 2, 3, padding=1).double()
    x = torch.randn(3, 4, 6, 7, dtype=torch.float64)
    channels_last = x.to(memory_format=torch.channels_last)
    sliced = torch.randn(3, 8, 6, 7, dtype=torch.float64)[:, ::2]
    for variant, base in ((channels_last, x), (sliced, sliced.contiguous())):
        assert torch.equal(_run(op, conv, variant, torch.float64), _run(op, conv, base, torch.float64))


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.sap_fast.conv_gram(torch.randn(4, 5), [3], [1], [0], [1], 1, torch.float64),
     "1 to 3 spatial dims"),
    (lambda: torch.ops.sap_fast.conv_gram(torch.ones(1, 2, 5, dtype=torch.int64), [3], [1], [0], [1], 1,
                                          torch.float64), "float32 or float64"),
    (lambda: torch.ops.sap_fast.conv_gram(torch.randn(1, 2, 5), [3], [1], [0], [1], 1, torch.float16),
     "accumulation"),
    (lambda: torch.ops.sap_fast.conv_gram(torch.randn(1, 3, 5), [3], [1], [0], [1], 2, torch.float64),
     "divide"),
    (lambda: torch.ops.sap_fast.conv_gram(torch.randn(1, 2, 5, 5), [3], [1], [0], [1], 1, torch.float64),
     "one per spatial dim"),
    (lambda: torch.ops.sap_fast.conv_gram(torch.randn(1, 2, 5), [3], [0], [0], [1], 1, torch.float64),
     "must be positive"),
    (lambda: torch.ops.sap_fast.conv_gram_shift(torch.randn(1, 2, 2), [3], [0], [1], 1, torch.float64),
     "no output"),
])
def test_native_ops_reject_bad_arguments_in_one_line(call, message):
    with pytest.raises(RuntimeError, match=message) as info:
        call()
    assert "\n" not in str(info.value).split("\nException raised from")[0].strip()


@pytest.mark.parametrize("op, args", [
    (torch.ops.sap_fast.conv_gram.default, ([3, 2], [2, 1], [1, 0], [1, 2], 2, torch.float64)),
    (torch.ops.sap_fast.conv_gram_shift.default, ([3, 2], [1, 0], [1, 2], 2, torch.float64)),
])
@pytest.mark.slow  # a few seconds: left out of the fast target
def test_native_ops_pass_opcheck(op, args):
    x = torch.randn(2, 4, 6, 5)
    torch.library.opcheck(op, (x, *args))


@pytest.mark.parametrize("name", sorted(CASES))
def test_collect_stats_native_equals_portable(name, monkeypatch):
    """The dispatch: stride-1 conv calls go through the shift kernel, others stream rows; the
    statistics agree with the portable path either way."""
    model, x = _case(name, batch=5, seed=3)
    calls = []
    original = torch.ops.sap_fast.conv_gram_shift

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return original(*args)

    monkeypatch.setattr(torch.ops.sap_fast, "conv_gram_shift", Spy())
    native = sap_fast.collect_stats(model, x, batch_size=2, layers=["0"])
    monkeypatch.setenv("SAP_FAST_BACKEND", "portable")
    portable = sap_fast.collect_stats(model, x, batch_size=2, layers=["0"])
    conv = model[0]
    uses_shift = all(s == 1 for s in conv.stride) and conv.weight[0, 0].numel() > 1
    # the first batch may still be kept as rows (fewer rows than the width)
    assert bool(calls) == (uses_shift and native["0"].mode == "gram")
    assert native["0"].count == portable["0"].count
    assert rel_err(native["0"].gram, portable["0"].gram) <= 1e-13


def test_shift_kernel_input_is_split_by_samples_to_bound_its_buffer(monkeypatch):
    model, x = conv_case("2d-groups2", batch=6, seed=1)
    sizes = []
    original = torch.ops.sap_fast.conv_gram_shift
    monkeypatch.setattr(torch.ops.sap_fast, "conv_gram_shift",
                        lambda *a: sizes.append(a[0].shape[0]) or original(*a))
    whole = sap_fast.collect_stats(model, x, batch_size=6)
    small = sap_fast.collect_stats(model, x, batch_size=6, chunk_rows=1)
    assert sizes[0] == 6 and set(sizes[1:]) == {1}
    assert rel_err(small["0"].gram, whole["0"].gram) <= 1e-13


def test_missing_extension_falls_back_and_says_why_once(monkeypatch, caplog):
    model, x = conv_case("2d-groups2", batch=4, seed=2)
    expected = sap_fast.collect_stats(model, x)["0"].gram
    monkeypatch.setitem(sys.modules, "sap_fast._C", None)  # `from . import _C` now fails
    monkeypatch.delattr(sap_fast, "_C")
    backend.load.cache_clear()
    try:
        with caplog.at_level("DEBUG", logger="sap_fast"):
            got = sap_fast.collect_stats(model, x)["0"].gram
            sap_fast.collect_stats(model, x)
        info = backend_info()
    finally:
        backend.load.cache_clear()
    assert rel_err(got, expected) <= 1e-13
    reasons = [r.getMessage() for r in caplog.records if "sap_fast._C is unavailable" in r.getMessage()]
    assert len(reasons) == 1 and "pip install --no-build-isolation" in reasons[0]
    assert info["native"]["loaded"] is False and "unavailable" in info["native"]["reason"]
    assert info["stages"]["accumulate"]["cpu"].startswith("portable")


def test_backend_info_reports_the_build_and_each_stage(monkeypatch):
    info = backend_info()
    assert info["native"]["loaded"] is True and info["native"]["cuda"] == backend.native_cuda()
    assert info["native"]["torch"] == torch.__version__.split("+")[0]
    assert set(info["stages"]) == {"accumulate", "spectrum", "project"}
    assert all(set(v) == {"cpu", "cuda"} for v in info["stages"].values())
    assert info["stages"]["accumulate"]["cpu"].startswith("native: shift-correlation")
    monkeypatch.setenv("SAP_FAST_BACKEND", "portable")
    forced = sap_fast.backend_info()
    assert forced["forced_portable"] and backend.native() is None
    assert all(v.startswith("portable") for s in forced["stages"].values() for v in s.values())
    monkeypatch.setenv("SAP_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SAP_FAST_BACKEND"):
        backend.native()


def test_layer_stats_take_a_native_gram_only_where_it_fits():
    record = sap_fast.LayerStats(d=4, groups=1)
    rows = torch.randn(1, 3, 4, dtype=torch.float64)
    record.add(rows)  # 3 rows <= width 4: kept as rows
    with pytest.raises(ValueError, match="add rows instead"):
        record.add_gram(torch.zeros(1, 4, 4, dtype=torch.float64), 1)  # 4 rows: still rows mode
    with pytest.raises(ValueError, match="does not fit"):
        record.add_gram(torch.zeros(1, 4, 4, dtype=torch.float32), 5)
    more = torch.randn(1, 5, 4, dtype=torch.float64)
    record.add_gram((more[0].T @ more[0]).unsqueeze(0), 5)  # the kept rows fold in first
    assert record.mode == "gram" and record.count == 8
    both = torch.cat([rows, more], 1)[0]
    assert rel_err(record.gram[0], both.T @ both) <= 1e-14
