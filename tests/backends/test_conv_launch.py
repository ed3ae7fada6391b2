"""The launch plan of the CUDA conv Gram kernels (sap_fast/backends/conv_launch.py), the one
description that the CMake-built op (through torch.ops.sap_fast.conv_gram_launch) and the NVRTC
route launch from, and that the CPU twin of the tensor-core tiles runs.

Without a GPU: the plan's values (split-K ranges, grids, mirror, kernel choice and its switch),
its constants against the .cuh, the kernels' indexing contract for the plan's grids (tile_block
emulated here, and the CPU twin on the plan's rows_per_split), the Python CUDA kernel of
torch.ops.sap_fast.conv_gram against a stand-in for the launch op, and that no C++ launch choice
is left in csrc/. On a GPU, tests/backends/test_cuda_ops.py runs the launch op itself.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re

import pytest
import torch

from sap_fast.backends import conv_launch, nvrtc
from support import unfold_gram

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
CUH = os.path.join(CSRC, "cuda", "conv_gram_kernels.cuh")
F64, F32 = torch.float64, torch.float32


def _shape(x_shape, kernel, stride, padding, dilation, groups, dtype=F64):
    return conv_launch.conv_gram_shape(torch.empty(x_shape), kernel, stride, padding, dilation, groups, dtype)


def _csrc_text():
    out = {}
    for folder, _, files in os.walk(CSRC):
        for name in files:
            if name.endswith((".cu", ".cuh", ".h", ".cpp")):
                path = os.path.join(folder, name)
                out[os.path.relpath(path, ROOT)] = open(path, encoding="utf-8").read()
    return out


# ---------------------------------------------------------------------------------------------
# the plan's values
# ---------------------------------------------------------------------------------------------

def test_rows_per_split_values():
    # small row counts: one range (fewer than 32 chunks per range would be possible)
    assert conv_launch.rows_per_split(tile_blocks=1, rows=100, sm_count=132) == 112
    assert conv_launch.rows_per_split(1, 32 * 16 * 2 - 1, 132) == 1024   # rows // 512 = 1
    # enough rows: about 4 blocks per SM, ranges in whole chunks
    assert conv_launch.rows_per_split(1, 10 ** 6, 132) == math.ceil(10 ** 6 / 528 / 16) * 16
    assert conv_launch.rows_per_split(6, 10 ** 6, 132) == math.ceil(10 ** 6 / 88 / 16) * 16
    # many tiles already fill the GPU: one range
    assert conv_launch.rows_per_split(10 ** 4, 10 ** 6, 132) == 10 ** 6
    # at most 65535 ranges; sm_count 0 counts as 1
    assert math.ceil(10 ** 12 / conv_launch.rows_per_split(1, 10 ** 12, 10 ** 6)) <= 65535
    assert conv_launch.rows_per_split(1, 10 ** 6, 0) == conv_launch.rows_per_split(1, 10 ** 6, 1)
    for rows, blocks, sms in itertools.product([1, 17, 5000, 123457], [1, 3, 50], [1, 8, 132]):
        per = conv_launch.rows_per_split(blocks, rows, sms)
        splits = math.ceil(rows / per)
        assert per % conv_launch.CHUNK == 0 and (splits - 1) * per < rows  # no empty range
    # no rows: still one whole chunk (a valid launch argument; nothing is launched)
    assert conv_launch.rows_per_split(1, 0, 132) == conv_launch.CHUNK


def test_the_grid_and_mirror_geometry():
    shape = _shape((2, 8, 9, 9), [3, 3], [1, 1], [1, 1], [1, 1], 2)
    assert shape.width == 36 and shape.rows == 162
    assert conv_launch.tile_grid(shape, per_split=64) == (1, 2, 3)
    wide = _shape((1, 17, 5, 5), [3, 3], [1, 1], [1, 1], [1, 1], 1)
    assert conv_launch.tile_grid(wide, per_split=32) == (6, 1, 1)  # d = 153: 3 tiles, 6 upper pairs
    assert conv_launch.mirror_blocks(width=153, matrices=1) == math.ceil(153 * 153 / 256)
    assert conv_launch.mirror_blocks(width=4096, matrices=4096) == 65535
    assert conv_launch.mirror_blocks(width=1, matrices=1) == 1


def test_the_plan_of_a_call():
    wide = _shape((3, 17, 45, 47), [3, 3], [1, 1], [1, 1], [1, 1], 1)  # d = 153, 6345 rows
    plan = conv_launch.plan(wide, sm_count=132, capability_major=9, acc_dtype=F64)
    per = conv_launch.rows_per_split(6, wide.rows, 132)
    assert plan == conv_launch.LaunchPlan(
        kernel="dmma", acc_dtype=F64, grid=(6, 1, math.ceil(wide.rows / per)), block=(16, 16), rows_per_split=per,
        mirror_grid=(math.ceil(153 * 153 / 256),), mirror_block=(256,))
    assert plan.dmma and plan.splits == 12 and not plan.empty
    assert conv_launch.plan(wide, 132, 9, F32).kernel == "fma"
    assert conv_launch.plan(wide, 132, 7, F64).kernel == "fma"
    assert conv_launch.plan(wide, 8, 9, F64).splits == 6  # fewer SMs, fewer ranges
    assert conv_launch.plan(wide, 1, 9, F64).splits == 1  # 4 blocks wanted, 6 tiles already
    empty = _shape((0, 4, 5, 5), [3, 3], [1, 1], [1, 1], [1, 1], 2)
    assert conv_launch.plan(empty, 132, 9, F64).empty
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rows_per_split = 16
    with pytest.raises(ValueError, match=r"^conv_gram launch plan: acc_dtype must be torch.float32 or "
                                         r"torch.float64, got torch.float16$"):
        conv_launch.plan(wide, 132, 9, torch.float16)
    too_wide = dataclasses.replace(wide, width=4096 * 1024)
    with pytest.raises(ValueError, match=r"^conv_gram launch plan: Gram width d = 4194304 .* does not fit"):
        conv_launch.plan(too_wide, 132, 9, F64)


def test_float64_grams_take_the_tensor_core_tiles_from_sm_80_unless_switched_off(monkeypatch):
    monkeypatch.delenv("SAP_FAST_GRAM_DMMA", raising=False)
    assert conv_launch.uses_dmma(F64, 8) and conv_launch.uses_dmma(F64, 9) and conv_launch.uses_dmma(F64, 10)
    assert not conv_launch.uses_dmma(F64, 7) and not conv_launch.uses_dmma(F32, 9)
    for value in ("0", "off", "OFF"):
        monkeypatch.setenv("SAP_FAST_GRAM_DMMA", value)
        assert not conv_launch.uses_dmma(F64, 9)
    for value in ("", "auto", "1", "on"):
        monkeypatch.setenv("SAP_FAST_GRAM_DMMA", value)
        assert conv_launch.uses_dmma(F64, 9)
    monkeypatch.setenv("SAP_FAST_GRAM_DMMA", "yes")
    with pytest.raises(ValueError, match=r"^SAP_FAST_GRAM_DMMA='yes': use auto, 0 or 1$"):
        conv_launch.uses_dmma(F64, 9)
    assert conv_launch.DMMA_MIN_MAJOR == 8
    # the plan reads the switch: both routes take its choice
    shape = _shape((2, 5, 6, 6), [3, 3], [1, 1], [1, 1], [1, 1], 1)
    monkeypatch.setenv("SAP_FAST_GRAM_DMMA", "0")
    assert conv_launch.plan(shape, 132, 9, F64).kernel == "fma"
    monkeypatch.setenv("SAP_FAST_GRAM_DMMA", "1")
    assert conv_launch.plan(shape, 132, 9, F64).kernel == "dmma"


def test_the_plan_constants_match_the_source():
    source = open(CUH).read()
    assert nvrtc.default_tiling_in(source) == (conv_launch.TILE, conv_launch.CHUNK, conv_launch.THREADS_PER_DIM)
    assert (conv_launch.BLOCKS_PER_SM, conv_launch.MIN_CHUNKS_PER_SPLIT, conv_launch.MIRROR_THREADS) == (4, 32, 256)
    # the grid limits the C++ checks use (conv_gram_grid_fits, conv_gram_splits)
    assert "s.groups <= 65535 && upper_tile_count(tiles) <= 2147483647LL" in source
    assert "constexpr int64_t kMaxSplits = 65535;" in open(os.path.join(CSRC, "cuda", "conv_gram_shape.h")).read()
    assert (conv_launch.MAX_GRID_X, conv_launch.MAX_GRID_YZ) == (2147483647, 65535)


# ---------------------------------------------------------------------------------------------
# one launch description: no launch choice left in C++
# ---------------------------------------------------------------------------------------------

def test_no_cpp_launcher_repeats_the_plan():
    texts = _csrc_text()
    everything = "\n".join(texts.values())
    for gone in ("choose_rows_per_split", "tile_rows_per_split", "launch_conv_gram_tiles",
                 "launch_conv_gram_dmma_tiles", "launch_mirror_upper_to_lower", "conv_gram_tile_grid",
                 "kBlocksPerSm", "kMinChunksPerSplit", "cudaDevAttrMultiProcessorCount",
                 "cudaDevAttrComputeCapabilityMajor", "getenv"):
        assert gone not in everything, gone
    # kernels are launched in one file, from the arguments of the launch op
    launching = sorted(path for path, text in texts.items() if "<<<" in text)
    assert launching == [os.path.join("csrc", "cuda", "conv_gram.cu")]
    binding = texts[os.path.join("csrc", "cuda", "conv_gram.cu")]
    assert 'm.impl("conv_gram_launch", &conv_gram_launch_cuda)' in binding
    assert 'm.impl("conv_gram",' not in binding  # conv_gram's CUDA kernel is the plan's, in Python
    assert "<<<mirror_blocks, mirror_threads, 0, stream>>>" in binding
    # the host side of the .cuh: only the grid that tile_block implies, and its limits
    source = texts[os.path.join("csrc", "cuda", "conv_gram_kernels.cuh")]
    host = source[source.rindex("#ifndef __CUDACC_RTC__"):source.rindex("#endif  // __CUDACC_RTC__")]
    assert re.findall(r"^inline \w+ (\w+)\(", host, re.M) == ["tile_grid_size", "conv_gram_grid_fits"]
    assert "#include <cuda_runtime.h>" in source.split("#ifndef __CUDACC_RTC__", 1)[1].split("#endif")[0]


def test_the_launch_op_checks_its_inputs_in_one_block_before_launching():
    binding = open(os.path.join(CSRC, "cuda", "conv_gram.cu")).read()
    body = binding[binding.index("void conv_gram_launch_cuda("):]
    checks_end = body.index("const c10::cuda::CUDAGuard")
    checks, launch = body[:checks_end], body[checks_end:]
    assert "TORCH_CHECK" not in launch and "conv_gram_shape" not in launch
    for what in ("x.is_cuda()", "gram.device() == x.device()", "gram.scalar_type() == at::kFloat",
                 "sap_fast::cuda::conv_gram_shape(", "x.is_contiguous()", "gram.size(0) == s.groups",
                 "gram.is_contiguous()", "conv_gram_splits(s, rows_per_split", "!dmma || gram.scalar_type() == at::kDouble",
                 "mirror_blocks >= 1"):
        assert what in checks, what
    schema = open(os.path.join(CSRC, "sap_fast.cpp")).read()
    assert ('"conv_gram_launch(Tensor x, Tensor(a!) gram, int[] kernel_size, int[] stride, int[] padding, "\n'
            '        "int[] dilation, int groups, int rows_per_split, bool dmma, int mirror_blocks, int mirror_threads) '
            '-> ()"') in schema


def test_the_launch_op_takes_the_whole_plan():
    plan = conv_launch.plan(_shape((2, 5, 6, 6), [3, 3], [1, 1], [1, 1], [1, 1], 1), 132, 9, F64)
    assert conv_launch.launch_op_args(plan) == (plan.rows_per_split, True, plan.mirror_grid[0], 256)


# ---------------------------------------------------------------------------------------------
# the kernels' indexing contract, for the plan's grids
# ---------------------------------------------------------------------------------------------

def _tile_block(shape, rows_per_split, bx, by, bz):
    """tile_block of the .cuh, in Python: (tile_row, tile_col, group, row_begin, row_end)."""
    tiles = -(-shape.width // conv_launch.TILE)
    row, index = 0, bx
    while index >= tiles - row:
        index -= tiles - row
        row += 1
    begin = bz * rows_per_split
    return row, row + index, by, begin, min(begin + rows_per_split, shape.rows)


@pytest.mark.parametrize("sm_count", [1, 8, 132, 10 ** 4])
@pytest.mark.parametrize("x_shape, kernel, groups", [
    ((3, 5, 45, 47), [3, 3], 1), ((2, 17, 13, 11), [3, 3], 1), ((4, 48, 8, 8), [3, 3], 2),
    ((20, 70, 5, 3), [1, 1], 1), ((1, 1, 23), [1], 1), ((64, 64, 14, 14), [3, 3], 1)])
def test_every_block_of_the_plans_grid_gets_one_upper_tile_and_a_non_empty_row_range(x_shape, kernel, groups,
                                                                                     sm_count):
    shape = _shape(x_shape, kernel, [1] * len(kernel), [k // 2 for k in kernel], [1] * len(kernel), groups)
    plan = conv_launch.plan(shape, sm_count, 9, F64)
    assert plan.block == (conv_launch.THREADS_PER_DIM,) * 2 and plan.rows_per_split % conv_launch.CHUNK == 0
    assert plan.grid[0] <= conv_launch.MAX_GRID_X and max(plan.grid[1:]) <= conv_launch.MAX_GRID_YZ
    tiles = -(-shape.width // conv_launch.TILE)
    pairs = [_tile_block(shape, plan.rows_per_split, bx, 0, 0)[:2] for bx in range(plan.grid[0])]
    assert pairs == [(a, b) for a in range(tiles) for b in range(a, tiles)]  # each upper tile once
    ranges = [_tile_block(shape, plan.rows_per_split, 0, 0, bz)[3:] for bz in range(plan.grid[2])]
    assert all(begin < end for begin, end in ranges)  # no empty range: no block returns early
    assert [r for begin, end in ranges for r in range(begin, end)] == list(range(shape.rows))  # each row once
    assert plan.mirror_grid[0] * plan.mirror_block[0] >= min(shape.groups * shape.width ** 2,
                                                             conv_launch.MAX_MIRROR_BLOCKS * 256)


# ---------------------------------------------------------------------------------------------
# torch.ops.sap_fast.conv_gram on CUDA: the plan in Python over the launch op (stood in here)
# ---------------------------------------------------------------------------------------------

class StandInLaunch:
    """torch.ops.sap_fast.conv_gram_launch on the CPU: checks what the C++ op checks that a
    caller could get wrong, then writes the Gram of the call (the unfold oracle)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, gram, kernel_size, stride, padding, dilation, groups, rows_per_split, dmma,
                 mirror_blocks, mirror_threads):
        shape = conv_launch.conv_gram_shape(x, kernel_size, stride, padding, dilation, groups, gram.dtype)
        assert x.is_contiguous() and gram.is_contiguous()
        assert tuple(gram.shape) == (shape.groups, shape.width, shape.width)
        assert rows_per_split > 0 and rows_per_split % conv_launch.CHUNK == 0
        assert math.ceil(shape.rows / rows_per_split) <= 65535
        assert not dmma or gram.dtype == F64
        assert 1 <= mirror_blocks <= 2 ** 31 - 1 and 1 <= mirror_threads <= 1024
        gram.copy_(unfold_gram(x, kernel_size, stride, padding, dilation, groups).to(gram.dtype))
        self.calls.append((rows_per_split, dmma, mirror_blocks, mirror_threads))


@pytest.fixture
def a_gpu(monkeypatch):
    """An sm_90 device with 132 SMs, as the plan sees it."""
    monkeypatch.setattr(conv_launch, "device_sm_count", lambda index: 132)
    monkeypatch.setattr(conv_launch, "device_capability_major", lambda index: 9)


@pytest.mark.parametrize("acc", [F64, F32])
def test_the_ops_cuda_kernel_launches_the_plan(acc, a_gpu):
    x = torch.randn(3, 6, 9, 8, dtype=F64)[:, :, :, ::2]  # not contiguous: copied once
    args = ([3, 3], [1, 1], [1, 1], [1, 1], 2)
    launch = StandInLaunch()
    got = conv_launch.conv_gram_cuda(x, *args, acc, launch=launch)
    shape = conv_launch.conv_gram_shape(x, *args, acc)
    plan = conv_launch.plan(shape, 132, 9, acc)
    assert launch.calls == [conv_launch.launch_op_args(plan)]
    assert launch.calls[0][1] == (acc == F64)
    assert got.dtype == acc and got.shape == (2, 27, 27)
    assert torch.equal(got, unfold_gram(x, *args).to(acc))


def test_the_ops_cuda_kernel_keeps_the_ops_contract(a_gpu, monkeypatch):
    launch = StandInLaunch()
    got = conv_launch.conv_gram_cuda(torch.randn(0, 4, 5, 5), [3, 3], [1, 1], [1, 1], [1, 1], 2, F64, launch=launch)
    assert got.shape == (2, 18, 18) and not got.any() and launch.calls == []  # no rows: nothing launched
    with pytest.raises(RuntimeError, match=r"^conv_gram: groups=2 must be positive and divide the 3 input channels$"):
        conv_launch.conv_gram_cuda(torch.randn(1, 3, 5), [3], [1], [0], [1], 2, F64, launch=launch)
    with pytest.raises(RuntimeError, match=r"^conv_gram: at most 65535 groups are supported on CUDA, got 70000$"):
        conv_launch.conv_gram_cuda(torch.empty(1, 70000, 1), [1], [1], [0], [1], 70000, F64, launch=launch)
    monkeypatch.setenv("SAP_FAST_GRAM_DMMA", "sometimes")
    with pytest.raises(RuntimeError, match=r"^SAP_FAST_GRAM_DMMA='sometimes': use auto, 0 or 1$"):
        conv_launch.conv_gram_cuda(torch.randn(1, 2, 5), [3], [1], [0], [1], 1, F64, launch=launch)
    assert launch.calls == []


def test_the_op_has_the_plans_cuda_kernel_exactly_where_the_launch_op_is_built():
    from sap_fast.backends.native import native
    if native() is None:
        pytest.skip("sap_fast._C is not built")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("sap_fast::conv_gram", "CUDA") == has("sap_fast::conv_gram_launch", "CUDA")
    assert not has("sap_fast::conv_gram_launch", "CPU")  # a launch of CUDA kernels only


def test_ops_registers_the_plans_cuda_kernel_where_the_launch_op_has_one():
    """What _ops.py does on a CUDA build, in a fresh process of this CPU build: with the launch
    op's CUDA kernel present (stood in by the dispatcher query), conv_gram gains its CUDA kernel,
    and its CPU kernel is untouched."""
    import subprocess
    import sys

    from sap_fast.backends.native import native
    if native() is None:
        pytest.skip("sap_fast._C is not built")
    code = "\n".join([
        "import torch",
        "real = torch._C._dispatch_has_kernel_for_dispatch_key",
        "torch._C._dispatch_has_kernel_for_dispatch_key = lambda op, key: "
        "(op, key) == ('sap_fast::conv_gram_launch', 'CUDA') or real(op, key)",
        "from sap_fast.backends import native",
        "assert native.load()[0] is not None",
        "torch._C._dispatch_has_kernel_for_dispatch_key = real",
        "x = torch.randn(2, 3, 5, 5, dtype=torch.float64)",
        "g = torch.ops.sap_fast.conv_gram(x, [3, 3], [1, 1], [1, 1], [1, 1], 1, torch.float64)",
        "print(real('sap_fast::conv_gram', 'CUDA'), tuple(g.shape))"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "True (1, 27, 27)"
