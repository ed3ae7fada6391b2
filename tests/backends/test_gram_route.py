"""The accumulate stage's one dispatch decision, :func:`sap_fast.backends.gram.route`, on every
combination a user can reach (the GPU routes run on a GPU; this pins which one each case takes)."""
import itertools

import pytest
import torch

from sap_fast.backends.gram import route as gram_route

F64, F32 = torch.float64, torch.float32

pytestmark = pytest.mark.usefixtures("one_thread")


def route(device="cuda", dtype=F64, precision="fp32", conv=True, **kw):
    base = dict(stride_one_spatial=True, native_cpu=True, native_cuda=True, triton_ok=True, choice="auto")
    base.update(kw)
    return gram_route(device, dtype, precision, conv=conv, **base)


def test_cpu_only_stride_one_convs_in_fp32_inputs_take_the_shift_kernel():
    assert route("cpu") == "shift"
    assert route("cpu", dtype=F32) == "shift"
    assert route("cpu", stride_one_spatial=False) is None
    assert route("cpu", conv=False) is None
    assert route("cpu", native_cpu=False) is None
    assert route("cpu", precision="tf32") is None  # the rounding emulation streams rows
    assert route("cpu", triton_ok=False, choice="triton") == "shift"  # asked for, not interpreted here
    assert route("cpu", triton_ok=True) == "shift"   # the interpreter runs only when asked for


def test_cpu_strided_convs_in_fp32_inputs_into_a_float64_gram_take_the_direct_kernel():
    """The measured rule (benchmarks/cpu_conv_gram.py): strided convs with a kernel larger than
    1, float32 inputs, a float64 Gram; everything else keeps its route."""
    strided = dict(stride_one_spatial=False, strided=True)
    assert route("cpu", **strided) == "direct"
    assert route("cpu", dtype=F32, **strided) is None      # a float32 Gram: the rows' GEMM is faster
    assert route("cpu", precision="tf32", **strided) is None
    assert route("cpu", conv=False, **strided) is None
    assert route("cpu", native_cpu=False, **strided) is None
    assert route("cpu", triton_ok=True, choice="triton", **strided) == "triton"  # the interpreter, asked for
    assert route("cpu", stride_one_spatial=False) is None   # a 1x1 conv streams rows
    for dtype in (F64, F32):                                # GPU routes do not change
        assert route(dtype=dtype, **strided) == route(dtype=dtype, stride_one_spatial=False)


def test_cpu_under_triton_interpreter_takes_triton_when_asked_for_every_gpu_mode():
    """triton_ok on the CPU: Triton's interpreter runs; SAP_FAST_GRAM_KERNEL=triton then sends
    the calls Triton serves on a GPU to the interpreted kernel (the dry run's CPU twin)."""
    for conv in (True, False):
        assert route("cpu", conv=conv, triton_ok=True, choice="triton") == "triton"
        assert route("cpu", conv=conv, dtype=F32, precision="tf32", triton_ok=True, choice="triton") == "triton"
        assert route("cpu", conv=conv, dtype=F32, precision="bf16", triton_ok=True, choice="triton") == "triton"
        # a float64 Gram of rounded inputs has no Triton kernel on a GPU either
        assert route("cpu", conv=conv, precision="tf32", triton_ok=True, choice="triton") is None


@pytest.mark.parametrize("dtype", [F64, F32])
def test_gpu_exact_and_fp32_modes_use_the_cuda_kernel_for_convs(dtype):
    assert route(dtype=dtype) == "cuda"
    assert route(dtype=dtype, stride_one_spatial=False) == "cuda"  # every conv geometry
    assert route(dtype=dtype, choice="triton") == "triton"
    assert route(dtype=dtype, native_cuda=False) == "triton"       # a Triton-only install
    assert route(dtype=dtype, native_cuda=False, triton_ok=False) is None
    assert route(dtype=dtype, choice="cuda", native_cuda=False) == "triton"
    assert route(dtype=dtype, choice="shift", shift_pays=True) == "torch-shift"  # where it pays
    assert route(dtype=dtype, choice="shift", shift_pays=False) == "cuda"
    assert route(dtype=dtype, choice="shift", stride_one_spatial=False) == "cuda"
    assert route(dtype=dtype, conv=False) is None                   # linear: cuBLAS on rows
    assert route(dtype=dtype, conv=False, choice="triton") == "triton"  # ... or Triton's triangle
    assert route(dtype=dtype, conv=False, choice="triton", triton_ok=False) is None


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_gpu_tensor_core_modes_are_triton_only_with_a_float32_gram(precision):
    for conv in (True, False):
        assert route(dtype=F32, precision=precision, conv=conv) == "triton"
        assert route(dtype=F32, precision=precision, conv=conv, triton_ok=False) is None
        assert route(dtype=F64, precision=precision, conv=conv) is None  # rounded rows, float64 sums


def test_other_devices_stream_rows():
    for device, conv in itertools.product(["mps", "xpu", "meta"], [True, False]):
        assert route(device, conv=conv) is None


def test_bad_kernel_choice_is_a_one_line_error(monkeypatch):
    from sap_fast.backends import gram as gram_backend
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", "cutlass")
    with pytest.raises(ValueError, match=r"SAP_FAST_GRAM_KERNEL='cutlass': use one of"):
        gram_backend.kernel_choice()


# -- the Triton route through collect_stats, on the CPU under Triton's interpreter -------------------
from support import Attention, Tokens, conv_case, rel_err  # noqa: E402

from .gram_support import force_gram, rows_only  # noqa: E402
from .triton_support import kernel_module  # noqa: E402

ROUTED_CASES = ["2d-groups2", "2d-nonsquare-stride-dil", "1d-same-even-dil", "2d-reflect"]


@pytest.fixture
def triton_route(monkeypatch):
    """collect_stats as on a GPU whose Grams go to the Triton kernels, run by the interpreter."""
    gram_triton, devices = kernel_module("gram")
    if "cpu" not in devices:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=1 must be set before import)")
    calls = []
    real = gram_triton.conv_gram

    def counted(*args, **kwargs):  # linear_gram calls it too
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(gram_triton, "conv_gram", counted)
    gram_triton.calls = calls
    force_gram(monkeypatch, lambda call: "triton" if call.input_precision == "fp32" or call.dtype == F32 else None)
    return gram_triton


@pytest.mark.parametrize("case", ROUTED_CASES + ["tokens", "attention"])
def test_triton_route_matches_the_portable_path(triton_route, case):
    """Padding modes, asymmetric 'same' padding, groups, stride and dilation reach the kernel
    exactly as the portable path sees them, and so do linear and attention inputs of any
    leading shape (SAP_FAST_GRAM_KERNEL=triton): float64 Grams agree to round-off."""
    torch.manual_seed(4)
    model, x = {"tokens": lambda: (Tokens(), torch.randn(9, 5, 6)),
                "attention": lambda: (Attention(), torch.randn(6, 4, 5))}.get(
        case, lambda: conv_case(case, batch=3, seed=4))()
    model, x = model.float(), x.float()
    got = __import__("sap_fast").collect_stats(model, x, batch_size=2)
    with pytest.MonkeyPatch.context() as mp:
        rows_only(mp)
        want = __import__("sap_fast").collect_stats(model, x, batch_size=2)
    assert triton_route.calls, "the Triton kernel never ran"
    for name in want:
        if want[name].mode == "gram":
            assert got[name].mode == "gram"
            assert rel_err(got[name].gram, want[name].gram) <= 1e-12, name


@pytest.mark.parametrize("precision, tol", [("tf32", 1e-5), ("bf16", 1e-5)])
def test_triton_route_tensor_core_modes_equal_rounded_rows(triton_route, precision, tol):
    """tf32/bf16 with a float32 Gram: the kernels' value is "round the inputs, fp32 sums", the
    same as the portable path's rounded rows (up to fp32 summation order), for convs and linear
    layers (tokens, attention)."""
    import sap_fast
    torch.manual_seed(6)
    cases = [conv_case("2d-groups2", batch=4, seed=6), (Tokens(), torch.randn(6, 5, 6)),
             (Attention(), torch.randn(5, 4, 5))]
    for model, x in cases:
        model, x = model.float(), x.float()
        del triton_route.calls[:]
        got = sap_fast.collect_stats(model, x, dtype=F32, input_precision=precision, batch_size=2)
        assert triton_route.calls, "the Triton kernel never ran"
        with pytest.MonkeyPatch.context() as mp:
            rows_only(mp)
            want = sap_fast.collect_stats(model, x, dtype=F32, input_precision=precision, batch_size=2)
        for name in want:
            assert got[name].count == want[name].count, name
            assert rel_err(got[name].gram.double(), want[name].gram.double()) <= tol, name


def _rule(device_type, dtype, input_precision, *, conv, stride_one_spatial, shift_pays, native_cpu,
          native_cuda, cupy_ok, triton_ok, choice):
    """The routing rule written out as one function: the chooser must agree with it everywhere."""
    if device_type == "cpu":
        if choice == "triton" and triton_ok:
            return "triton" if (input_precision == "fp32" or dtype == torch.float32) else None
        return "shift" if (conv and native_cpu and stride_one_spatial and input_precision == "fp32") else None
    if device_type != "cuda":
        return None
    if input_precision != "fp32":
        return "triton" if (triton_ok and dtype == torch.float32) else None
    if not conv:
        return "triton" if (choice == "triton" and triton_ok) else None
    if choice == "triton" and triton_ok:
        return "triton"
    if choice == "shift" and shift_pays:
        return "torch-shift"
    if choice == "cupy" and cupy_ok:
        return "cupy"
    if choice != "triton":
        if native_cuda:
            return "cuda"
        if cupy_ok:
            return "cupy"
    return "triton" if triton_ok else None


def test_the_chooser_agrees_with_the_rule_on_every_combination():
    flags = ["conv", "stride_one_spatial", "shift_pays", "native_cpu", "native_cuda", "cupy_ok", "triton_ok"]
    for device, dtype, precision, choice in itertools.product(
            ["cpu", "cuda", "mps"], [F64, F32], ["fp32", "tf32", "bf16"], ["auto", "cuda", "cupy", "triton", "shift"]):
        for values in itertools.product([False, True], repeat=len(flags)):
            kw = dict(zip(flags, values))
            assert gram_route(device, dtype, precision, choice=choice, **kw) == \
                _rule(device, dtype, precision, choice=choice, **kw), (device, dtype, precision, choice, kw)
