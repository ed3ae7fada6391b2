"""The CUDA kernels (csrc/cuda/) against float64 oracles: ``conv_gram`` against a Gram of patches
materialised with ``Tensor.unfold``, ``eigh`` against ``torch.linalg.eigh`` in float64 on the CPU.

The float64 Grams run on the FP64 tensor cores from sm_80 on; one test runs them beside the FMA
tiles and the tensor-core tiles' CPU twin (tests/backends/test_dmma_twin.py holds the twin to the
oracle on every machine).

The GPU tests skip, saying why, where there is no CUDA device or the extension was built without
its CUDA kernels; they are meant for the GPU machine. Only the oracle's own check runs everywhere.

Tolerances (errors relative to the largest entry / eigenvalue of the float64 reference):
- conv_gram, float64 accumulation: 1e-10. float32 inputs are exact in float64, so the only
  error is the reordered float64 summation (split-K atomics), ~1e-16·√rows.
- conv_gram, float32 accumulation: 1e-4 (float32 sums of up to ~10⁴ products per entry).
- eigh: float64 1e-10, float32 1e-4 for eigenvalues, reconstruction ‖V diag(e) Vᵀ − G‖ / ‖G‖
  and orthonormality max|VᵀV − I| (backward-stable solvers: error ~ n·eps·‖G‖).
Eigenvectors are never compared directly: their signs (and bases of repeated eigenvalues, as in
the rank-deficient cases) are arbitrary.
"""
from __future__ import annotations


import pytest
import torch

from support import Attention, CONV_CASES, Tokens, conv_case, max_weight_rel_err, unfold_gram

try:
    import sap_fast._C  # noqa: F401  (registers torch.ops.sap_fast.*)
    import sap_fast.backends._ops  # noqa: F401  (their fake kernels, for opcheck)
    _LOAD_ERROR = None
except Exception as err:  # not built, or built against another torch
    _LOAD_ERROR = f"{type(err).__name__}: {err}"


def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"sap_fast::{op}", "CUDA")
    except RuntimeError:  # op not registered at all
        return False


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device: the CUDA kernels are tested on the GPU machine"
    if _LOAD_ERROR is not None:
        return f"sap_fast._C did not load ({_LOAD_ERROR}); pip install --no-build-isolation -e ."
    missing = [op for op in ("conv_gram", "conv_gram_launch", "eigh") if not _has_cuda_kernel(op)]
    if missing:
        return (f"sap_fast._C has no CUDA kernel for {missing}: rebuild with a CUDA torch and nvcc "
                "(SAP_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .)")
    return None


_SKIP = _skip_reason()
requires_cuda_ops = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

F64_TOL, F32_TOL = 1e-10, 1e-4


def _max_rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got − expected| / max |expected|, in float64 on the CPU."""
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------
# conv_gram
# --------------------------------------------------------------------------------------------


# name: (batch, channels, spatial size, kernel, stride, padding, dilation, groups)
GRAM_CASES = {
    "1d-k3-s2-p1": (3, 4, (11,), (3,), (2,), (1,), (1,), 1),
    "1d-k5-dil2-pad4": (2, 3, (17,), (5,), (1,), (4,), (2,), 1),
    "2d-3x3-ragged-tiles": (2, 8, (9, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # d = 72
    "2d-nonsquare-stride-dil": (3, 4, (9, 8), (3, 2), (2, 1), (1, 0), (1, 2), 1),
    "2d-groups3": (2, 6, (7, 6), (3, 3), (1, 1), (1, 1), (1, 1), 3),
    "2d-depthwise-stride2": (3, 5, (7, 7), (3, 3), (2, 2), (1, 1), (1, 1), 5),
    "2d-1x1-batch1": (1, 70, (5, 3), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "2d-odd-three-tiles": (2, 17, (13, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # d = 153
    "2d-batch1-odd": (1, 3, (15, 13), (5, 3), (1, 2), (2, 1), (1, 1), 1),
    "2d-pad-wider-than-kernel": (2, 2, (5, 4), (3, 3), (1, 1), (3, 3), (1, 1), 1),
    "2d-kernel-covers-image": (2, 3, (4, 5), (4, 5), (1, 1), (0, 0), (1, 1), 1),
    "2d-many-rows-split-k": (16, 4, (32, 32), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-resnet-like-d576": (4, 64, (14, 14), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-grouped-wide": (2, 48, (8, 8), (3, 3), (2, 2), (1, 1), (1, 1), 2),  # d = 216 per group
    "3d-stride-groups": (2, 4, (4, 5, 4), (2, 3, 2), (1, 2, 1), (1, 1, 1), (1, 1, 1), 2),
    "3d-dil-pad": (2, 3, (5, 4, 7), (3, 1, 2), (1, 1, 1), (2, 0, 1), (2, 1, 3), 1),
}

# (x dtype, accumulation dtype, tolerance)
GRAM_DTYPES = {
    "f64-in-f64-acc": (torch.float64, torch.float64, F64_TOL),
    "f32-in-f64-acc": (torch.float32, torch.float64, F64_TOL),
    "f32-in-f32-acc": (torch.float32, torch.float32, F32_TOL),
    "f64-in-f32-acc": (torch.float64, torch.float32, F32_TOL),
}


def _gram_input(name, dtype, device="cuda", seed=0):
    batch, channels, size, kernel, stride, padding, dilation, groups = GRAM_CASES[name]
    g = torch.Generator().manual_seed(seed + len(name))
    x = torch.randn(batch, channels, *size, generator=g, dtype=torch.float64).to(dtype)
    args = (list(kernel), list(stride), list(padding), list(dilation), groups)
    return x.to(device), args


def _conv_gram(x, args, dtype):
    return torch.ops.sap_fast.conv_gram(x, *args, dtype)


def test_unfold_oracle_matches_package_reference():
    """The oracle itself (runs on CPU): same Gram as sap_fast.reference's patches, whose column
    order is weight.view(out, -1)'s."""
    from sap_fast import reference

    checked = 0
    for name, (dim, kwargs, _) in CONV_CASES.items():
        if kwargs.get("padding_mode", "zeros") != "zeros" or isinstance(kwargs.get("padding"), str):
            continue  # conv_gram pads zeros symmetrically; the caller handles other padding
        model, x = conv_case(name, batch=2, seed=5)
        conv = model[0]
        expected = torch.stack([r.T @ r for r in reference.representations(model, x, layers=["0"])["0"]])
        got = unfold_gram(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
        assert got.shape == expected.shape, name
        assert _max_rel(got, expected) <= 1e-12, name
        checked += 1
    assert checked >= 5


@requires_cuda_ops
@pytest.mark.parametrize("dtypes", sorted(GRAM_DTYPES))
@pytest.mark.parametrize("name", sorted(GRAM_CASES))
def test_conv_gram_matches_unfold_oracle(name, dtypes):
    x_dtype, acc_dtype, tol = GRAM_DTYPES[dtypes]
    x, args = _gram_input(name, x_dtype)
    got = _conv_gram(x, args, acc_dtype)
    expected = unfold_gram(x, *args)  # of the very values the kernel read
    assert got.device == x.device and got.dtype == acc_dtype and got.shape == expected.shape
    assert _max_rel(got, expected) <= tol
    assert torch.equal(got, got.mT), "the Gram must be exactly symmetric (mirrored upper triangle)"


@requires_cuda_ops
@pytest.mark.parametrize("name", ["2d-odd-three-tiles", "2d-many-rows-split-k", "2d-grouped-wide", "3d-dil-pad"])
def test_conv_gram_tensor_core_tiles_match_the_fma_tiles_and_their_cpu_twin(name, monkeypatch):
    """float64 Grams on sm_80+ take the FP64 tensor cores (conv_gram_dmma_kernel); the FMA tiles
    (SAP_FAST_GRAM_DMMA=0) and the CPU twin of the tensor-core tiles give the same Gram to the
    atomics' reordering. Below sm_80 both runs take the FMA tiles."""
    x, args = _gram_input(name, torch.float32, seed=11)
    monkeypatch.setenv("SAP_FAST_GRAM_DMMA", "auto")
    dmma = _conv_gram(x, args, torch.float64)
    monkeypatch.setenv("SAP_FAST_GRAM_DMMA", "0")
    fma = _conv_gram(x, args, torch.float64)
    from sap_fast.backends import conv_launch  # the launch plan the GPU ran, for the twin to run

    shape = conv_launch.conv_gram_shape(x, *args, torch.float64)
    rows_per_split = conv_launch.device_plan(shape, x.device, torch.float64).rows_per_split
    twin = torch.ops.sap_fast.conv_gram_dmma_twin(x.cpu(), *args, rows_per_split)
    expected = unfold_gram(x, *args)
    for got in (dmma, fma):
        assert _max_rel(got, expected) <= F64_TOL and torch.equal(got, got.mT)
    assert _max_rel(dmma, twin) <= 1e-14 and _max_rel(dmma, fma) <= 1e-14
    monkeypatch.setenv("SAP_FAST_GRAM_DMMA", "sometimes")
    with pytest.raises(RuntimeError, match="SAP_FAST_GRAM_DMMA='sometimes': use auto, 0 or 1"):
        _conv_gram(x, args, torch.float64)


@requires_cuda_ops
def test_conv_gram_float32_input_float64_accumulation_has_no_float32_rounding():
    """Large-magnitude fp32 inputs: fp32 accumulation would lose ~1e-7 relative, fp64 must not."""
    x, args = _gram_input("2d-odd-three-tiles", torch.float32)
    x = x * 1e3
    assert _max_rel(_conv_gram(x, args, torch.float64), unfold_gram(x, *args)) <= 1e-13


@requires_cuda_ops
def test_conv_gram_reads_non_contiguous_and_channels_last_input():
    x, args = _gram_input("2d-groups3", torch.float64)
    expected = _conv_gram(x, args, torch.float64)
    channels_last = x.to(memory_format=torch.channels_last)
    sliced = torch.cat([x, torch.zeros_like(x)], dim=1)[:, : x.shape[1]]
    for variant in (channels_last, sliced, x.transpose(2, 3).contiguous().transpose(2, 3)):
        # atomics add the row ranges in any order: equal to rounding, not bitwise
        assert _max_rel(_conv_gram(variant, args, torch.float64), expected) <= 1e-14


@requires_cuda_ops
def test_conv_gram_runs_on_the_current_stream_and_device_guard():
    x, args = _gram_input("2d-many-rows-split-k", torch.float32)
    expected = unfold_gram(x, *args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _conv_gram(x, args, torch.float64)
    side.synchronize()  # only the side stream: the op must have queued its work there
    assert _max_rel(got, expected) <= F64_TOL
    if torch.cuda.device_count() > 1:
        with torch.cuda.device(0):
            x1 = x.to("cuda:1")
            got1 = _conv_gram(x1, args, torch.float64)
        assert got1.device == x1.device and _max_rel(got1, expected) <= F64_TOL


@requires_cuda_ops
def test_conv_gram_of_an_empty_batch_is_zero():
    x, args = _gram_input("2d-groups3", torch.float32)
    got = _conv_gram(x[:0], args, torch.float64)
    assert got.shape == (3, 18, 18) and not got.any()


@requires_cuda_ops
def test_conv_gram_64bit_offsets():
    """x with more than 2³¹ elements: offsets past int32 must not wrap. A 1×1 conv over
    (1, 2, 32832, 32832) float32 (8.6 GB): channel 0 all ones, channel 1 zero but for its last
    1000 elements (3.0), which sit past element 2³¹. The float64 Gram is exact integers."""
    side = 32832
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs ~10 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.zeros(1, 2, side, side, device="cuda")
    assert x.numel() > 2**31
    x[0, 0] = 1.0
    x[0, 1].view(-1)[-1000:] = 3.0
    got = _conv_gram(x, [1, 1], [1, 1], [0, 0], [1, 1], 1, torch.float64).cpu()
    del x
    positions = side * side
    expected = torch.tensor([[[positions, 3000.0], [3000.0, 9000.0]]], dtype=torch.float64)
    assert torch.equal(got, expected)


def _call(x, kernel=(3,), stride=(1,), padding=(0,), dilation=(1,), groups=1, dtype=torch.float64):
    return torch.ops.sap_fast.conv_gram(x, list(kernel), list(stride), list(padding), list(dilation), groups,
                                        dtype)


@requires_cuda_ops
@pytest.mark.parametrize("call, message", [
    (lambda: _call(torch.randn(4, 5, device="cuda")), "1 to 3 spatial dims"),
    (lambda: _call(torch.randn(1, 2, 2, 2, 2, 2, device="cuda")), "1 to 3 spatial dims"),
    (lambda: _call(torch.ones(1, 2, 5, dtype=torch.int64, device="cuda")), "float32 or float64"),
    (lambda: _call(torch.randn(1, 2, 5, device="cuda", dtype=torch.float16)), "float32 or float64"),
    (lambda: _call(torch.randn(1, 2, 5, device="cuda"), dtype=torch.float16), "accumulation"),
    (lambda: _call(torch.randn(1, 3, 5, device="cuda"), groups=2), "divide"),
    (lambda: _call(torch.randn(1, 3, 5, device="cuda"), groups=0), "divide"),
    (lambda: _call(torch.randn(1, 2, 5, 5, device="cuda")), "one per spatial dim"),
    (lambda: _call(torch.randn(1, 2, 5, device="cuda"), stride=(1, 1)), "one per spatial dim"),
    (lambda: _call(torch.randn(1, 2, 5, device="cuda"), kernel=(0,)), "must be positive"),
    (lambda: _call(torch.randn(1, 2, 5, device="cuda"), stride=(0,)), "must be positive"),
    (lambda: _call(torch.randn(1, 2, 5, device="cuda"), dilation=(-1,)), "must be positive"),
    (lambda: _call(torch.randn(1, 2, 5, device="cuda"), padding=(-1,)), "non-negative"),
    (lambda: _call(torch.randn(1, 2, 2, device="cuda")), "no output"),
    (lambda: _call(torch.randn(1, 2, 4, device="cuda"), kernel=(3,), dilation=(2,), padding=(0,)), "no output"),
])
def test_conv_gram_rejects_bad_arguments_in_one_line(call, message):
    with pytest.raises(RuntimeError, match=message) as info:
        call()
    assert "\n" not in str(info.value).split("\nException raised from")[0].strip()


def _launch(x, gram, rows_per_split=16, dmma=False, mirror=(1, 256), args=([3], [1], [0], [1], 1)):
    torch.ops.sap_fast.conv_gram_launch(x, gram, *args, rows_per_split, dmma, *mirror)


@requires_cuda_ops
@pytest.mark.parametrize("call, message", [
    (lambda: _launch(torch.randn(1, 2, 5), torch.empty(1, 6, 6, device="cuda")), "x must be a CUDA tensor"),
    (lambda: _launch(torch.randn(1, 2, 5, device="cuda"), torch.empty(1, 6, 6)), "gram must be on x's device"),
    (lambda: _launch(torch.randn(1, 2, 5, device="cuda"), torch.empty(1, 6, 6, device="cuda", dtype=torch.half)),
     "gram .* must be float32 or float64"),
    (lambda: _launch(torch.randn(1, 2, 5, device="cuda"), torch.empty(1, 6, 5, device="cuda")),
     r"gram must be \(groups, d, d\) = \(1, 6, 6\)"),
    (lambda: _launch(torch.randn(1, 5, 2, device="cuda").mT, torch.empty(1, 6, 6, device="cuda")),
     "x must be contiguous"),
    (lambda: _launch(torch.randn(1, 2, 5, device="cuda"), torch.empty(1, 6, 12, device="cuda")[:, :, :6]),
     "gram must be contiguous"),
    (lambda: _launch(torch.randn(1, 3, 5, device="cuda"), torch.empty(1, 9, 9, device="cuda"),
                     args=([3], [1], [0], [1], 2)), "divide"),
    (lambda: _launch(torch.randn(1, 2, 5, device="cuda"), torch.empty(1, 6, 6, device="cuda"), rows_per_split=8),
     "rows_per_split must be a positive multiple of 16"),
    (lambda: _launch(torch.randn(1, 2, 5, device="cuda"), torch.empty(1, 6, 6, device="cuda"), dmma=True),
     "float64 Grams only"),
    (lambda: _launch(torch.randn(1, 2, 5, device="cuda"), torch.empty(1, 6, 6, device="cuda"), mirror=(0, 256)),
     "the mirror's grid"),
    (lambda: _launch(torch.randn(1, 2, 5, device="cuda"), torch.empty(1, 6, 6, device="cuda"), mirror=(1, 2048)),
     "the mirror's grid"),
])
def test_the_launch_op_rejects_bad_inputs_in_one_line(call, message):
    with pytest.raises(RuntimeError, match=message) as info:
        call()
    assert "\n" not in str(info.value).split("\nException raised from")[0].strip()


@requires_cuda_ops
@pytest.mark.parametrize("rows_per_split, mirror", [(16, (1, 32)), (48, (7, 256)), (4096, (65535, 1024))])
def test_the_launch_op_writes_the_gram_for_any_valid_plan(rows_per_split, mirror):
    """Any whole-chunk split and any mirror grid give the Gram, into a gram holding garbage."""
    x, args = _gram_input("2d-odd-three-tiles", torch.float32)
    gram = torch.full((1, 153, 153), float("nan"), dtype=torch.float64, device="cuda")
    for dmma in (False, True):
        torch.ops.sap_fast.conv_gram_launch(x, gram, *args, rows_per_split, dmma, *mirror)
        assert _max_rel(gram, unfold_gram(x, *args)) <= F64_TOL and torch.equal(gram, gram.mT)


@requires_cuda_ops
def test_conv_gram_passes_opcheck():
    x = torch.randn(2, 4, 6, 5, device="cuda")
    torch.library.opcheck(torch.ops.sap_fast.conv_gram.default, (x, [3, 2], [2, 1], [1, 0], [1, 2], 2, torch.float64))
    gram = torch.empty(2, 12, 12, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.sap_fast.conv_gram_launch.default,
                          (x, gram, [3, 2], [2, 1], [1, 0], [1, 2], 2, 16, True, 4, 256))


# --------------------------------------------------------------------------------------------
# eigh
# --------------------------------------------------------------------------------------------

EIGH_TOL = {torch.float64: F64_TOL, torch.float32: F32_TOL}


def _grams(batch, n, kind, dtype, seed=0):
    """float64 CPU Grams A Aᵀ, rounded to `dtype`: SPD (A has 2n columns) or rank-deficient
    (n/3 + 1 columns: a cluster of zero eigenvalues, as in Grams of layers with few rows)."""
    g = torch.Generator().manual_seed(seed + 1000 * n + batch)
    cols = 2 * n if kind == "spd" else n // 3 + 1
    a = torch.randn(batch, n, cols, generator=g, dtype=torch.float64)
    return (a @ a.mT).to(dtype)


def _check_eigh(values, vectors, gram, dtype):
    """values/vectors from the op for the symmetric matrices given by gram's lower triangle."""
    tol = EIGH_TOL[dtype]
    sym = gram.detach().double().cpu().tril()
    sym = sym + sym.tril(-1).mT
    ref_values = torch.linalg.eigh(sym).eigenvalues
    assert values.dtype == dtype and vectors.dtype == dtype
    assert values.shape == sym.shape[:-1] and vectors.shape == sym.shape
    e, v = values.double().cpu(), vectors.double().cpu()
    assert bool((e[..., 1:] >= e[..., :-1]).all()), "eigenvalues must ascend"
    scale = ref_values.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    assert float(((e - ref_values).abs() / scale).max()) <= tol
    recon = (v * e.unsqueeze(-2)) @ v.mT
    err = (recon - sym).flatten(-2).norm(dim=-1) / sym.flatten(-2).norm(dim=-1).clamp_min(1e-300)
    assert float(err.max()) <= tol
    eye = torch.eye(sym.shape[-1], dtype=torch.float64)
    assert float((v.mT @ v - eye).abs().max()) <= tol


@requires_cuda_ops
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["spd", "rank-deficient"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [5, 32, 33, 100, 577])  # ≤ 32: batched Jacobi; > 32: syevd lanes
def test_eigh_matches_torch_linalg_eigh(n, batch, kind, dtype):
    gram = _grams(batch, n, kind, dtype).cuda()
    before = gram.clone()
    values, vectors = torch.ops.sap_fast.eigh(gram)
    assert values.is_cuda and vectors.is_cuda
    assert torch.equal(gram, before), "the input must not be overwritten"
    _check_eigh(values, vectors, gram, dtype)


@requires_cuda_ops
@pytest.mark.parametrize("n", [5, 100])
def test_eigh_reads_only_the_lower_triangle(n):
    """The row-major/column-major handling: garbage above the diagonal must be ignored, like
    torch.linalg.eigh(UPLO='L'). A transposed layout would decompose the garbage instead."""
    gram = _grams(2, n, "spd", torch.float64)
    garbage = torch.randn(2, n, n, dtype=torch.float64).triu(1) * 10
    lower_only = (gram.tril() + garbage).cuda()
    values, vectors = torch.ops.sap_fast.eigh(lower_only)
    _check_eigh(values, vectors, lower_only, torch.float64)
    assert _max_rel(values, torch.linalg.eigh(gram).eigenvalues) <= F64_TOL


@requires_cuda_ops
@pytest.mark.parametrize("n", [4, 64])
def test_eigh_unbatched_and_strided_inputs(n):
    gram = _grams(1, n, "spd", torch.float64)[0]
    values, vectors = torch.ops.sap_fast.eigh(gram.cuda())
    assert values.shape == (n,) and vectors.shape == (n, n)
    _check_eigh(values, vectors, gram, torch.float64)
    # a column-major view of a non-symmetric buffer: still its own lower triangle that counts
    noisy = (gram.tril() + torch.randn(n, n, dtype=torch.float64).triu(1)).cuda()
    strided = noisy.mT.contiguous().mT  # same values, column-major strides
    before = strided.clone()
    values, vectors = torch.ops.sap_fast.eigh(strided)
    assert torch.equal(strided, before)
    _check_eigh(values, vectors, strided, torch.float64)


@requires_cuda_ops
def test_eigh_many_matrices_over_the_stream_lanes():
    """More matrices than lanes (round-robin over 4 streams), each a different matrix, results
    consumed on the caller's (non-default) stream without any device-wide sync."""
    gram = _grams(9, 70, "spd", torch.float64)
    gram = gram * torch.arange(1, 10, dtype=torch.float64).view(9, 1, 1)  # distinct scales
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        g = gram.to("cuda", non_blocking=False)
        values, vectors = torch.ops.sap_fast.eigh(g)
        recon = (vectors * values.unsqueeze(-2)) @ vectors.mT  # queued on `side` after the op
    side.synchronize()
    _check_eigh(values, vectors, gram, torch.float64)
    assert _max_rel(recon, gram) <= F64_TOL


@requires_cuda_ops
def test_eigh_edge_sizes():
    for shape in [(0, 5, 5), (3, 0, 0), (2, 1, 1)]:
        gram = torch.rand(shape, dtype=torch.float64, device="cuda") + 0.5
        values, vectors = torch.ops.sap_fast.eigh(gram)
        assert values.shape == shape[:-1] and vectors.shape == shape
        if gram.numel():
            _check_eigh(values, vectors, gram, torch.float64)


@requires_cuda_ops
@pytest.mark.parametrize("make, message", [
    (lambda: torch.randn(5, device="cuda"), r"\(n, n\) or \(B, n, n\)"),
    (lambda: torch.randn(2, 2, 3, 3, device="cuda"), r"\(n, n\) or \(B, n, n\)"),
    (lambda: torch.randn(2, 3, 4, device="cuda"), "square"),
    (lambda: torch.ones(3, 3, dtype=torch.int32, device="cuda"), "float32 or float64"),
    (lambda: torch.ones(3, 3, dtype=torch.float16, device="cuda"), "float32 or float64"),
])
def test_eigh_rejects_bad_arguments_in_one_line(make, message):
    with pytest.raises(RuntimeError, match=message) as info:
        torch.ops.sap_fast.eigh(make())
    assert "\n" not in str(info.value).split("\nException raised from")[0].strip()


@requires_cuda_ops
@pytest.mark.parametrize("n", [6, 40])
def test_eigh_passes_opcheck(n):
    gram = _grams(2, n, "spd", torch.float64).cuda()
    torch.library.opcheck(torch.ops.sap_fast.eigh.default, (gram,))


# --------------------------------------------------------------------------------------------
# the whole pipeline on the GPU: every stage's CUDA backend at once
# --------------------------------------------------------------------------------------------


def _pipeline_case(name):
    torch.manual_seed(5)
    if name == "tokens":
        return Tokens().double(), torch.randn(6, 5, 6, dtype=torch.float64)
    if name == "attention":
        return Attention(cross=True).double(), torch.randn(4, 7, 5, dtype=torch.float64)
    return conv_case(name, batch=6, seed=5)


@requires_cuda_ops
@pytest.mark.parametrize("name", ["2d-groups2", "2d-depthwise", "3d-stride-groups", "2d-reflect",
                                  "tokens", "attention"])
@pytest.mark.parametrize("alpha", [10.0, 1e4])
@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_correct_on_cuda_matches_the_reference(name, alpha, solver):
    """collect_stats (CUDA Gram kernel), then spectra (cuSOLVER) and update (Triton), or the
    Cholesky solve (torch's cuSOLVER potrf/potrs), against the float64 oracle on the CPU: all
    float64, so the same 1e-8 bound as the CPU pipeline tests."""
    import sap_fast
    from sap_fast import reference

    info = sap_fast.backend_info()["stages"]
    assert info["accumulate"]["cuda"].startswith("native") and info["spectrum"]["cuda"].startswith("native")
    model, x = _pipeline_case(name)
    fixed = sap_fast.correct(model.cuda(), x.cuda(), alpha=alpha, batch_size=4, solver=solver)
    expected = reference.correct(model.cpu(), x, alpha=alpha)
    assert max_weight_rel_err(fixed.cpu(), expected) <= 1e-8


@requires_cuda_ops
@pytest.mark.parametrize("name", ["2d-groups2", "tokens", "attention"])
def test_collect_stats_never_synchronises_per_batch(name, monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") over the whole pass: any host read in the hooks
    (.item(), bool(t), .cpu(), …) raises. Only the end-of-pass finiteness read is allowed, and it
    is taken out here (tests/core/test_no_sync.py counts it on the CPU)."""
    import sap_fast
    from sap_fast import accumulate

    model, x = _pipeline_case(name)
    model, x = model.cuda(), x.cuda()
    monkeypatch.setattr(accumulate, "first_non_finite", lambda records: None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = sap_fast.collect_stats(model, x, batch_size=2, show_progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(stats[n].device.type == "cuda" for n in stats)  # the Grams stay on the device
