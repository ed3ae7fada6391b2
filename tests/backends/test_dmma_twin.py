"""The FP64 tensor-core tiles of the CUDA conv Gram (conv_gram_dmma_kernel) through their CPU
twin, ``torch.ops.sap_fast.conv_gram_dmma_twin`` (csrc/cpu/conv_gram_dmma_twin.cpp): the kernel's
own index code compiled by g++ (slab loads, m8n8k4 fragments, output cells, split-K, mirror), its
8 warps run lane by lane with the mma product emulated from the PTX fragment layout.

Held to the float64 oracle (sap_fast.reference's patch rows) on fresh random inputs: every conv
case of the native CPU tests, odd shapes that leave ragged tiles and ragged chunks, several
tiles, groups, and split-K ranges: the twin takes the launch plan's rows_per_split
(sap_fast.backends.conv_launch.plan for a GPU of that many SMs), so it runs the very grid a GPU
would. Tolerance 1e-12 of max |G| (the twin reorders exact float64 products). On a GPU,
tests/backends/test_cuda_ops.py holds the kernel itself to the oracle and to this twin.
"""
import os

import pytest
import torch
from torch import nn

from sap_fast import reference
from sap_fast.backends import native as backend
from sap_fast._runtime.geometry import kernel_input as _symmetric_padding
from sap_fast.backends import conv_launch
from sap_fast.backends.info import backend_info
from support import CONV_CASES

if backend.native() is None:  # CI builds the extension; there a missing one is a failure
    if os.environ.get("SAP_FAST_REQUIRE_NATIVE") == "1":
        raise RuntimeError(backend_info()["native"]["reason"])
    pytest.skip("sap_fast._C is not built (pip install --no-build-isolation -e .)", allow_module_level=True)

# name: (dim, conv kwargs, channels, spatial size); d = channels/groups · prod(kernel)
ODD_CASES = {
    "2d-d153-three-ragged-tiles": (2, dict(kernel_size=3, padding=1), 17, (7, 5)),
    "2d-d65-one-column-past-a-tile": (2, dict(kernel_size=(1, 5), padding=(0, 2)), 13, (3, 6)),
    "2d-d216-per-group-stride2": (2, dict(kernel_size=3, stride=2, padding=1, groups=2), 48, (8, 7)),
    "2d-1x1-d70": (2, dict(kernel_size=1), 70, (5, 3)),
    "1d-d1-single-column": (1, dict(kernel_size=1), 1, (23,)),
    "1d-dil3-pad4": (1, dict(kernel_size=5, padding=4, dilation=3), 7, (19,)),
    "3d-stride-dil-groups": (3, dict(kernel_size=(3, 1, 2), stride=(1, 2, 1), padding=(2, 0, 1),
                                     dilation=(2, 1, 3), groups=3), 9, (5, 4, 7)),
    "2d-depthwise-d9": (2, dict(kernel_size=3, padding=1, groups=6), 6, (9, 8)),
}
ZERO_PADDED = sorted(name for name, (_, kwargs, _) in CONV_CASES.items()
                     if kwargs.get("padding_mode", "zeros") == "zeros")


def _fresh(seed):
    return torch.Generator().manual_seed(0xD33A + seed)


def _case(name, batch, seed):
    """(conv in float64, x): a CONV_CASES conv (4 → 4 channels) or an odd one, fresh weights."""
    if name in ODD_CASES:
        dim, kwargs, channels, size = ODD_CASES[name]
    else:
        dim, kwargs, size = CONV_CASES[name]
        channels = 4
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](channels, 3 * kwargs.get("groups", 1), **kwargs)
    x = torch.randn(batch, channels, *size, generator=_fresh(seed), dtype=torch.float64)
    return conv.double(), x


def _oracle(conv, x):
    rows = reference.representations(nn.Sequential(conv), x, layers=["0"])["0"]
    return torch.stack([r.T @ r for r in rows])


def _plan(x, args, sm_count):
    """The launch plan of a float64 Gram of this call on an sm_90 GPU with sm_count SMs."""
    shape = conv_launch.conv_gram_shape(x, *args, torch.float64)
    return conv_launch.plan(shape, sm_count, 9, torch.float64)


def _twin_of(x, args, sm_count):
    """The twin on the plan's row ranges for a GPU of sm_count SMs."""
    return torch.ops.sap_fast.conv_gram_dmma_twin(x, *args, _plan(x, args, sm_count).rows_per_split)


def _call(conv, x):
    x, padding = _symmetric_padding(conv, x)
    return x, (list(conv.kernel_size), list(conv.stride), padding, list(conv.dilation), conv.groups)


def _twin(conv, x, sm_count):
    return _twin_of(*_call(conv, x), sm_count)


def _splits(conv, x, sm_count):
    """Row ranges per tile the kernel's grid has for this call: the launch plan's."""
    return _plan(*_call(conv, x), sm_count).splits


def _max_rel(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ZERO_PADDED + sorted(ODD_CASES))
def test_the_twin_matches_the_oracle(name, batch):
    conv, x = _case(name, batch, seed=batch * 13 + len(name))
    expected = _oracle(conv, x)
    got = _twin(conv, x, sm_count=132)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    assert _max_rel(got, expected) <= 1e-12
    assert torch.equal(got, got.mT), "the mirror makes G exactly symmetric"
    # float32 input, float64 Gram: exact products of the float32 values
    x32 = x.float()
    assert _max_rel(_twin(conv, x32, sm_count=132), _oracle(conv, x32.double())) <= 1e-12


@pytest.mark.parametrize("sm_count, splits", [(1, 4), (2, 8), (132, 12)])
def test_the_twin_over_split_k_ranges_and_ragged_chunks(sm_count, splits):
    """Many rows (3·45·47 = 6345, not a multiple of the 16-row chunk) over one diagonal tile:
    the SM count sets 4, 8 or 12 row ranges (at most one per 32 chunks), the last of them ending
    in a partly filled chunk."""
    torch.manual_seed(sm_count)
    conv = nn.Conv2d(5, 2, 3, padding=1).double()
    x = torch.randn(3, 5, 45, 47, generator=_fresh(sm_count), dtype=torch.float64)
    assert _splits(conv, x, sm_count) == splits
    assert _max_rel(_twin(conv, x, sm_count), _oracle(conv, x)) <= 1e-12


@pytest.mark.parametrize("rows_per_split", [16, 48, 512, 6352])
def test_the_twin_holds_the_kernels_contract_for_any_whole_chunk_split(rows_per_split):
    """Any rows_per_split the launch op accepts (whole chunks) covers every row once: one
    chunk per range, ranges that end mid-chunk, one range for all 6345 rows."""
    conv = nn.Conv2d(5, 2, 3, padding=1).double()
    x = torch.randn(3, 5, 45, 47, generator=_fresh(rows_per_split), dtype=torch.float64)
    got = torch.ops.sap_fast.conv_gram_dmma_twin(*_call(conv, x)[:1], *_call(conv, x)[1], rows_per_split)
    assert _max_rel(got, _oracle(conv, x)) <= 1e-12 and torch.equal(got, got.mT)


def test_the_twin_equals_the_cpu_kernel_of_the_same_op():
    """The twin and torch.ops.sap_fast.conv_gram (CPU, gathered rows and one GEMM per batch of
    them) compute the same Gram, by different roads."""
    conv, x = _case("2d-d153-three-ragged-tiles", 3, seed=5)
    x, padding = _symmetric_padding(conv, x)
    args = (list(conv.kernel_size), list(conv.stride), padding, list(conv.dilation), conv.groups)
    cpu = torch.ops.sap_fast.conv_gram(x, *args, torch.float64)
    assert _max_rel(_twin_of(x, args, 4), cpu) <= 1e-13


def test_float32_input_is_accumulated_without_float32_rounding():
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 9, 8, generator=_fresh(1)).float() * 1e3
    assert _max_rel(_twin(conv, x, 4), _oracle(conv, x.double())) <= 1e-13


def test_an_empty_batch_or_no_channels_is_zero():
    got = _twin_of(torch.randn(0, 4, 5, 5), ([3, 3], [1, 1], [1, 1], [1, 1], 2), 4)
    assert got.shape == (2, 18, 18) and not got.any()
    assert _twin_of(torch.randn(2, 0, 5), ([3], [1], [1], [1], 1), 4).shape == (1, 0, 0)


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.sap_fast.conv_gram_dmma_twin(torch.randn(4, 5), [3], [1], [0], [1], 1, 16),
     "1 to 3 spatial dims"),
    (lambda: torch.ops.sap_fast.conv_gram_dmma_twin(torch.randn(1, 3, 5), [3], [1], [0], [1], 2, 16), "divide"),
    (lambda: torch.ops.sap_fast.conv_gram_dmma_twin(torch.randn(1, 2, 2), [3], [1], [0], [1], 1, 16), "no output"),
    (lambda: torch.ops.sap_fast.conv_gram_dmma_twin(torch.randn(1, 2, 5), [3], [1], [0], [1], 1, -1),
     "rows_per_split must be a positive multiple of 16"),
    (lambda: torch.ops.sap_fast.conv_gram_dmma_twin(torch.randn(1, 2, 5), [3], [1], [0], [1], 1, 24),
     "rows_per_split must be a positive multiple of 16"),
    (lambda: torch.ops.sap_fast.conv_gram_dmma_twin(torch.randn(1, 1, 16 * 65535 + 1), [1], [1], [0], [1], 1, 16),
     r"rows_per_split=16 cuts the 1048561 rows into 65536 ranges, more than gridDim.z allows \(65535\)"),
])
def test_the_twin_rejects_bad_arguments_in_one_line(call, message):
    with pytest.raises(RuntimeError, match=message) as info:
        call()
    assert "\n" not in str(info.value).split("\nException raised from")[0].strip()


@pytest.mark.slow  # a few seconds: left out of the fast target
def test_the_twin_passes_opcheck():
    x = torch.randn(2, 4, 6, 5)
    torch.library.opcheck(torch.ops.sap_fast.conv_gram_dmma_twin.default, (x, [3, 2], [2, 1], [1, 0], [1, 2], 2, 16))


# ---------------------------------------------------------------------------------------------
# tools/check_cuda_sass.py (make check-cuda): how it reads ptxas and the SASS, on canned text
# ---------------------------------------------------------------------------------------------

def _sass_check():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "check_cuda_sass.py")
    spec = importlib.util.spec_from_file_location("check_cuda_sass", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DMMA = "sap_fast::cuda::conv_gram_dmma_kernel<float, sap_fast::cuda::DefaultGramTiling>"
TILE = "sap_fast::cuda::conv_gram_tile_kernel<float, double, sap_fast::cuda::DefaultGramTiling>"
PTXAS = """ptxas info    : Compiling entry function '_ZN8sap_fast4cuda21conv_gram_dmma_kernelIfNS0_10GramTilingILi64ELi16ELi16EEEEEvPKT_PdNS0_13ConvGramShapeEl' for 'sm_90'
ptxas info    : Function properties for _ZN8sap_fast4cuda21conv_gram_dmma_kernelIfNS0_10GramTilingILi64ELi16ELi16EEEEEvPKT_PdNS0_13ConvGramShapeEl
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 24576 bytes smem
ptxas info    : Compiling entry function '_ZN8sap_fast4cuda21conv_gram_tile_kernelIfdNS0_10GramTilingILi64ELi16ELi16EEEEEvPKT_PT0_NS0_13ConvGramShapeEl' for 'sm_90'
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 20736 bytes smem
"""
SASS = """
        code for sm_90
                Function : _ZN8sap_fast4cuda21conv_gram_dmma_kernelIfNS0_10GramTilingILi64ELi16ELi16EEEEEvPKT_PdNS0_13ConvGramShapeEl
        /*5f70*/                   DMMA.8x8x4 R20, R56.reuse, R38, R20 ;                       /* 0x000000263814723f */
        /*5fc0*/              @P0  DMMA.8x8x4 R16, R56, R36, R16 ;                             /* 0x000000243810723f */
                Function : _ZN8sap_fast4cuda21conv_gram_tile_kernelIfdNS0_10GramTilingILi64ELi16ELi16EEEEEvPKT_PT0_NS0_13ConvGramShapeEl
        /*0100*/                   DFMA R2, R4, R6, R2 ;                                       /* 0x0000000604027228 */
"""


def test_the_sass_check_reads_registers_spills_and_matrix_instructions():
    check = _sass_check()
    usage, counts = check.ptxas_usage(PTXAS), check.sass_counts(SASS)
    dmma = next(m for m in usage if check._mangled_part(DMMA) in m)
    tile = next(m for m in usage if check._mangled_part(TILE) in m)
    assert usage[dmma] == [80, 0, 0] and usage[tile] == [255, 8, 4]
    assert counts[dmma] == {"DMMA": 2, "DFMA": 0} and counts[tile] == {"DMMA": 0, "DFMA": 1}
    assert check.verdict(DMMA, 80, 0, 0, counts[dmma]) == ""
    assert check.verdict(DMMA, 80, 0, 0, {"DMMA": 0, "DFMA": 256}) == "no DMMA instruction"
    assert check.verdict(DMMA, 80, 0, 0, {"DMMA": 32, "DFMA": 4}) == "DFMA beside DMMA"
    assert check.verdict(TILE, 255, 8, 4, counts[tile]) == "spills"
    assert check.verdict(TILE, 72, 0, 0, {"DMMA": 1, "DFMA": 0}) == "DMMA in an FMA kernel"
    assert check.short_name(DMMA) == "conv_gram_dmma_kernel<float>"
    assert "reinterpret_cast<void*>(&" + DMMA + ")," in check.instantiations([DMMA])
