"""Triton implicit-im2col Gram kernel for convolutions, and its plain-torch twin.

For a conv with ``groups`` groups reading ``x`` ``(N, C, *spatial)``, the patch matrix of group
``g`` is ``R_g`` ``(N·positions, d)``: one row per (sample, output position), row-major over the
output positions, and one column per (channel of the group, kernel offset), column index
``c·taps + flattened offset`` (the order of ``weight.view(out, -1)``), ``d = (C/groups)·taps``,
``taps = prod(kernel_size)``. Entry ``R_g[row, col]`` is the input value that the conv multiplies
by that weight at that position, zero where the receptive field hangs over the (symmetric, zero)
padding. The kernel computes ::

    G[g] = R_gᵀ R_g        (groups, d, d)

without ever storing ``R``: the same contract as ``torch.ops.sap_fast.conv_gram`` (CUDA:
``csrc/cuda/conv_gram_kernels.cuh``). 1-D and 2-D convs are 3-D ones with size-1 leading dims.

Work split. ``G`` is symmetric, so only the ``BLOCK_D × BLOCK_D`` tiles on or above its diagonal
are computed: program axis 0 enumerates (group, upper tile), axis 1 a contiguous range of rows
(split-K). A program walks its rows ``BLOCK_K`` at a time; for each step it gathers the two
``BLOCK_K × BLOCK_D`` slabs of ``R`` its tile needs (the rows × the tile's row columns, and the
rows × its column columns) straight from ``x`` through the strides of ``x`` (NCDHW,
channels-last or any other layout, no copy), with masks doing the zero padding and the ragged
edges, and accumulates ``tl.dot`` of the first one's transpose with the second (a diagonal
tile gathers the same slab twice; the second load should hit the cache). Row ranges meet
through ``tl.atomic_add`` in a zeroed ``G`` (one range: a plain store, and the result is
deterministic). Diagonal tiles add only entries with row ≤ column; ``_mirror_kernel`` then
copies the strict upper triangle to the lower, so ``G`` is exactly symmetric. Extra memory:
none beyond ``G``.

Precision modes (``precision``):

- ``"fp64"``: loads converted to fp64, fp64 ``tl.dot`` and accumulation, float64 output. The
  products of fp32 inputs are exact; only the summation rounds. The fp64 dot lowers to DMMA on
  sm_80/sm_90 (``tools/check_triton.py`` counts the instructions: triton 3.9 emits the
  m8n8k4 ``DMMA.884``, triton 3.6 the ``DMMA.16x8x16`` form).
- ``"fp32"``: fp32 operands, ``tl.dot(..., input_precision="ieee")`` (FMA units, no tensor
  cores), fp32 accumulation, float32 output (fp64 inputs are rounded to fp32 first).
- ``"tf32"``: operands rounded to TF32 (10 explicit mantissa bits) by round-to-nearest-even in
  the kernel (the bit trick of :func:`sap_fast.backends.precision.round_inputs`), then
  ``input_precision="tf32"``
  (tensor cores on the GPU), fp32 accumulation, float32 output. Rounding explicitly makes the
  result independent of how the hardware treats the low 13 bits of a TF32 operand.
- ``"bf16"``: operands rounded to bfloat16 by round-to-nearest-even (bit trick), then a bf16
  ``tl.dot`` with fp32 accumulation, float32 output.

In the tf32 and bf16 modes every product of two rounded operands is exact in fp32 (11 + 11 and
8 + 8 significant bits ≤ 24), so the mode's value is "round the inputs, then an fp32-accumulated
Gram" wherever the dot runs. :func:`conv_gram_reference` computes that value.

Under Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before this module is imported):
``tl.dot`` is ``numpy.matmul`` in the accumulator's dtype, so ``input_precision`` changes
nothing (the explicit rounding above still happens, so tf32 results are the GPU's up to the
summation order); and Triton's interpreter (as seen with triton 3.8) multiplies bf16 operands as their raw
``uint16`` bit patterns and truncates fp32 → bf16 casts, so there the bf16 mode multiplies the
(already bf16-exact) fp32 operands with an fp32 dot instead, which is the same products.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F
import triton
import triton.language as tl

from ..geometry import ConvGeometry
from ..precision import round_inputs
from . import Launch

__all__ = ["PRECISIONS", "interpreted", "default_config", "configs", "choose_splits", "conv_gram",
           "conv_gram_launches", "linear_gram", "conv_gram_reference", "linear_gram_reference"]

PRECISIONS = ("fp64", "fp32", "tf32", "bf16")
_MODE = {name: i for i, name in enumerate(PRECISIONS)}
# 16-bit inputs: no (triton cannot compile a bf16 load widened to an fp64 dot operand on sm_90:
# MMAv2 asserts 'Currently fp64 don't support largeK MMA'); convert them with .float()
_INPUT_DTYPES = (torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1
_MAX_SPLITS = 65535        # grid axis 1 limit on CUDA
_PROGRAMS_PER_SM = 4       # split-K aims at this many programs per SM ...
_MIN_CHUNKS_PER_SPLIT = 32  # ... but never fewer than this many BLOCK_K row steps per program


@triton.jit
def _upper_tile(t, tiles):
    """Upper-triangle tile number ``t`` → ``(tile_row, tile_col)``, ``tile_row ≤ tile_col``,
    enumerated row by row (row ``i`` holds ``tiles − i`` tiles). A loop of at most ``tiles``
    steps, once per program, rather than a square root that can round wrongly."""
    row = t * 0
    while t >= tiles - row:
        t -= tiles - row
        row += 1
    return row, row + t


@triton.jit
def _columns(tile, width, taps, k1, k2, group, group_channels,
             dil0, dil1, dil2, xs_c, xs_0, xs_1, xs_2, BLOCK_D: tl.constexpr):
    """Where the ``BLOCK_D`` columns of one tile read ``x``: validity, the int64 offset of the
    column (its channel plus its kernel tap's displacement) and the displacement per dim."""
    col = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = col < width
    c = col // taps
    t = col - c * taps
    a = t // (k1 * k2)
    b = (t // k2) % k1
    e = t % k2
    disp0 = a * dil0
    disp1 = b * dil1
    disp2 = e * dil2
    channel = (group * group_channels + c).to(tl.int64)
    base = (channel * xs_c + disp0.to(tl.int64) * xs_0 + disp1.to(tl.int64) * xs_1
            + disp2.to(tl.int64) * xs_2)
    return ok, base, disp0, disp1, disp2


@triton.jit
def _rows(start, row_end, positions, out1, out2, st0, st1, st2, pad0, pad1, pad2,
          xs_n, xs_0, xs_1, xs_2, BLOCK_K: tl.constexpr):
    """Where ``BLOCK_K`` rows from ``start`` (int64) read ``x``: validity, the int64 offset of
    each row's receptive-field corner, and the corner per dim (int32; may be negative: padding)."""
    row = start + tl.arange(0, BLOCK_K)
    ok = row < row_end
    sample = row // positions
    pos = row - sample * positions  # row-major over (Do, Ho, Wo)
    o2 = pos % out2
    pos = pos // out2
    o1 = pos % out1
    o0 = pos // out1
    c0 = o0 * st0 - pad0
    c1 = o1 * st1 - pad1
    c2 = o2 * st2 - pad2
    base = sample * xs_n + c0 * xs_0 + c1 * xs_1 + c2 * xs_2
    return ok, base, c0.to(tl.int32), c1.to(tl.int32), c2.to(tl.int32)


@triton.jit
def _gather(x_ptr, offset, mask, i0, i1, i2, in0, in1, in2,
            CHECK0: tl.constexpr, CHECK1: tl.constexpr, CHECK2: tl.constexpr):
    """A slab of ``R``: ``x[offset]`` where the position ``(i0, i1, i2)`` lies inside the input,
    else 0 (the conv's zero padding). A dim without padding cannot leave the input: no check."""
    if CHECK0:
        mask = mask & (i0 >= 0) & (i0 < in0)
    if CHECK1:
        mask = mask & (i1 >= 0) & (i1 < in1)
    if CHECK2:
        mask = mask & (i2 >= 0) & (i2 < in2)
    return tl.load(x_ptr + offset, mask=mask, other=0.0)


@triton.jit
def _operand(v, MODE: tl.constexpr, BF16_DOT: tl.constexpr):
    """Loaded values → the dot's operand type for the precision mode (see the module docstring)."""
    if MODE == 0:
        v = v.to(tl.float64)
    else:
        v = v.to(tl.float32)
        if MODE == 2:  # TF32: round-to-nearest-even on the 13 dropped mantissa bits
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -8192
            v = bits.to(tl.float32, bitcast=True)
        elif MODE == 3:  # BF16: round-to-nearest-even on the 16 dropped mantissa bits
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            v = bits.to(tl.float32, bitcast=True)
            if BF16_DOT:
                v = v.to(tl.bfloat16)  # exact: v is a bf16 value already
    return v


@triton.jit
def _conv_gram_kernel(
    x_ptr, out_ptr,
    rows, rows_per_split, positions, width, taps, group_channels, tiles, n_upper,
    in0, in1, in2, out1, out2, k1, k2,
    st0, st1, st2, pad0, pad1, pad2, dil0, dil1, dil2,
    xs_n, xs_c, xs_0, xs_1, xs_2,
    MODE: tl.constexpr, BF16_DOT: tl.constexpr, ATOMIC: tl.constexpr,
    CHECK0: tl.constexpr, CHECK1: tl.constexpr, CHECK2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[g, i, j] (+)= Σ_rows R_g[row, i] R_g[row, j]`` for one upper tile ``(i, j)`` blocks of
    one group over one row range; only entries with ``i ≤ j`` are written."""
    pid = tl.program_id(0)
    group = pid // n_upper
    tile_row, tile_col = _upper_tile(pid - group * n_upper, tiles)
    row_begin = tl.program_id(1).to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, rows)

    ok_a, base_a, da0, da1, da2 = _columns(tile_row, width, taps, k1, k2, group, group_channels,
                                           dil0, dil1, dil2, xs_c, xs_0, xs_1, xs_2, BLOCK_D)
    ok_b, base_b, db0, db1, db2 = _columns(tile_col, width, taps, k1, k2, group, group_channels,
                                           dil0, dil1, dil2, xs_c, xs_0, xs_1, xs_2, BLOCK_D)

    # tl.full, not tl.zeros: a builtin, so the kernel also interprets when triton itself was
    # imported before TRITON_INTERPRET=1 (tl.zeros is itself a @jit function, decorated at that import)
    if MODE == 0:
        acc = tl.full((BLOCK_D, BLOCK_D), 0.0, dtype=tl.float64)
    else:
        acc = tl.full((BLOCK_D, BLOCK_D), 0.0, dtype=tl.float32)

    for start in range(row_begin, row_end, BLOCK_K):
        ok_r, base_r, c0, c1, c2 = _rows(start, row_end, positions, out1, out2, st0, st1, st2,
                                         pad0, pad1, pad2, xs_n, xs_0, xs_1, xs_2, BLOCK_K)
        # a: R[rows, tile_row's columns], b: R[rows, tile_col's columns], both BLOCK_K × BLOCK_D;
        # gathering both in one orientation and transposing a (rather than gathering aᵀ) shares
        # the row-side index math and cuts registers by ~20% (ptxas, sm_90)
        a = _gather(x_ptr, base_r[:, None] + base_a[None, :], ok_r[:, None] & ok_a[None, :],
                    c0[:, None] + da0[None, :], c1[:, None] + da1[None, :], c2[:, None] + da2[None, :],
                    in0, in1, in2, CHECK0, CHECK1, CHECK2)
        b = _gather(x_ptr, base_r[:, None] + base_b[None, :], ok_r[:, None] & ok_b[None, :],
                    c0[:, None] + db0[None, :], c1[:, None] + db1[None, :], c2[:, None] + db2[None, :],
                    in0, in1, in2, CHECK0, CHECK1, CHECK2)
        a = tl.trans(_operand(a, MODE, BF16_DOT))
        b = _operand(b, MODE, BF16_DOT)
        if MODE == 2:
            acc = tl.dot(a, b, acc, input_precision="tf32", out_dtype=acc.dtype)
        elif MODE == 3 and BF16_DOT:
            acc = tl.dot(a, b, acc, out_dtype=acc.dtype)  # bf16 operands, fp32 accumulator
        else:  # fp64 (the argument changes nothing there), fp32, interpreted bf16
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)

    i = tile_row * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tile_col * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (i[:, None] < width) & (j[None, :] < width) & (i[:, None] <= j[None, :])
    # int64 before any product with width (no .to() on scalar arguments: Triton passes an int
    # argument equal to 1 as a constexpr)
    ptrs = out_ptr + group.to(tl.int64) * width * width + i.to(tl.int64)[:, None] * width + j[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _mirror_kernel(out_ptr, width, tiles, n_upper, BLOCK_D: tl.constexpr):
    """``out[g, j, i] = out[g, i, j]`` for ``i < j`` within one upper tile: reads only the strict
    upper triangle and writes only the strict lower one, so programs never race."""
    pid = tl.program_id(0)
    group = pid // n_upper
    tile_row, tile_col = _upper_tile(pid - group * n_upper, tiles)
    i = (tile_row * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    j = (tile_col * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask = (i[:, None] < width) & (j[None, :] < width) & (i[:, None] < j[None, :])
    base = out_ptr + group.to(tl.int64) * width * width
    v = tl.load(base + i[:, None] * width + j[None, :], mask=mask, other=0.0)
    tl.store(base + j[None, :] * width + i[:, None], v, mask=mask)


def interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_conv_gram_kernel, triton.runtime.JITFunction)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def _ints(name: str, value, spatial: int) -> List[int]:
    """An int or a sequence of ``spatial`` ints → a list of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * spatial
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
        if len(items) == spatial and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return items
    raise ValueError(f"conv_gram: {name} must be an int or {spatial} ints (one per spatial dim of x), "
                     f"got {value!r}")


class _Geometry:
    """The checked conv geometry, padded to 3 spatial dims (leading size-1 dims for 1-D/2-D):
    from the arguments (checked here), or from a :class:`~..geometry.ConvGeometry` (checked
    already; only the kernel's own int32 position limit is checked)."""

    @classmethod
    def of_record(cls, x: torch.Tensor, record: ConvGeometry) -> "_Geometry":
        self = cls.__new__(cls)
        for name in ("spatial", "groups", "batch", "channels", "group_channels", "taps", "width",
                     "positions", "rows"):
            setattr(self, name, getattr(record, name))
        for name in ("kernel", "stride", "padding", "dilation", "in_size", "out_size"):
            setattr(self, name, list(getattr(record, name)))
        lead = 3 - record.spatial
        for i in range(lead, 3):
            span = self.dilation[i] * (self.kernel[i] - 1) + 1
            if self.in_size[i] + 2 * self.padding[i] + span > _INT32_MAX:
                raise ValueError(f"conv_gram: spatial dim {i - lead} is too large ({self.in_size[i]} padded by "
                                 f"{self.padding[i]}, kernel span {span}); positions must fit in int32")
        self.x_strides = [0] * lead + list(x.stride()[2:])
        return self

    def __init__(self, x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int):
        spatial = x.dim() - 2
        self.spatial = spatial
        k = _ints("kernel_size", kernel_size, spatial)
        s = _ints("stride", stride, spatial)
        p = _ints("padding", padding, spatial)
        dil = _ints("dilation", dilation, spatial)
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or x.shape[1] % groups:
            raise ValueError(f"conv_gram: groups={groups!r} must be a positive int dividing the "
                             f"{x.shape[1]} input channels")
        if any(v < 1 for v in k + s + dil) or any(v < 0 for v in p):
            raise ValueError(f"conv_gram: kernel_size, stride and dilation must be positive and padding "
                             f"non-negative, got {k}, {s}, {p}, {dil}")
        size = list(x.shape[2:])
        out = []
        for i in range(spatial):
            span = dil[i] * (k[i] - 1) + 1
            padded = size[i] + 2 * p[i]
            if padded < span:
                raise ValueError(f"conv_gram: spatial dim {i} has size {size[i]} (padded {padded}), smaller "
                                 f"than the dilated kernel ({span}); the conv has no output")
            if padded + span > _INT32_MAX:  # the kernel's per-dim positions are int32
                raise ValueError(f"conv_gram: spatial dim {i} is too large ({size[i]} padded by {p[i]}, "
                                 f"kernel span {span}); positions must fit in int32")
            out.append((padded - span) // s[i] + 1)
        lead = 3 - spatial
        self.kernel = [1] * lead + k
        self.stride = [1] * lead + s
        self.padding = [0] * lead + p
        self.dilation = [1] * lead + dil
        self.in_size = [1] * lead + size
        self.out_size = [1] * lead + out
        self.x_strides = [0] * lead + list(x.stride()[2:])
        self.groups = groups
        self.batch = x.shape[0]
        self.channels = x.shape[1]
        self.group_channels = x.shape[1] // groups
        self.taps = math.prod(k)
        self.width = self.group_channels * self.taps
        self.positions = math.prod(out)
        self.rows = self.batch * self.positions


def _check(x, kernel_size, stride, padding, dilation, groups, precision,
           geometry: Optional[ConvGeometry] = None) -> _Geometry:
    """Validate the arguments of both implementations (one-line messages); with a ``geometry``
    only the precision and the kernel's own limits."""
    if geometry is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"conv_gram: precision must be one of {PRECISIONS}, got {precision!r}")
        return _Geometry.of_record(x, geometry)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"conv_gram: x must be a tensor, got {type(x).__name__}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"conv_gram: x must be (N, C, *spatial) with 1 to 3 spatial dims, got shape "
                         f"{tuple(x.shape)}; add a batch dim with x.unsqueeze(0) for unbatched input")
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"conv_gram: x must be float32 or float64, got {x.dtype}; "
                         "convert it with .float()")
    if precision not in PRECISIONS:
        raise ValueError(f"conv_gram: precision must be one of {PRECISIONS}, got {precision!r}")
    return _Geometry(x, kernel_size, stride, padding, dilation, groups)


def _out_dtype(precision: str) -> torch.dtype:
    return torch.float64 if precision == "fp64" else torch.float32


def _positive(name: str, value, default: int, power_of_two: bool = False) -> int:
    if value is None:
        return default
    if power_of_two:
        if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
            raise ValueError(f"conv_gram: {name} must be a power of 2 >= 16 (tl.dot needs >= 16), "
                             f"got {value!r}")
    elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"conv_gram: {name} must be a positive int, got {value!r}")
    return value


def default_config(width: int, precision: str) -> Dict[str, int]:
    """Launch settings without tuning: a tile no wider than the Gram needs (16 to 64); 16 rows
    per step in fp64 (its operands take twice the registers), 32 otherwise; 8 warps for tiles
    of 32 and 64, 4 for 16. Spill-free on sm_90 with triton 3.6 and 3.9 in every mode, with and
    without split-K atomics and padding checks (``tools/check_triton.py`` fails otherwise; 4
    warps on the wider tiles spill a few bytes there)."""
    block_d = max(16, min(64, triton.next_power_of_2(max(width, 1))))
    return dict(block_d=block_d, block_k=16 if precision == "fp64" else 32,
                num_warps=8 if block_d >= 32 else 4, num_stages=2)


def configs(precision: str = "fp64") -> List[Dict[str, int]]:
    """Candidate launch settings for a GPU autotune benchmark: keyword arguments of
    :func:`conv_gram` (``block_d``, ``block_k``, ``num_warps``, ``num_stages``). Not used with
    ``@triton.autotune`` here: under the interpreter that would run every config.

    Each one compiles for sm_90 with triton 3.6 and 3.9 without register spills on a
    ResNet-50 3×3 conv (``tools/check_triton.py``); the gathered slabs are register-hungry, so
    128-wide tiles, 64-row steps in the tensor-core modes and 3 stages of 32-row steps in fp32,
    which spill there, are left out. On sm_80 the fp32 ("ieee", FMA) mode spills with most of
    these; the list is for H100-class GPUs. Timings decide among them."""
    if precision not in PRECISIONS:
        raise ValueError(f"conv_gram: precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp64":
        shapes = [(64, 16, 8, 2), (64, 16, 4, 2), (64, 16, 4, 3), (64, 32, 8, 2), (64, 32, 8, 3),
                  (32, 16, 4, 2)]
    elif precision == "fp32":
        shapes = [(64, 32, 8, 2), (64, 16, 4, 2), (64, 16, 8, 3), (64, 64, 8, 2), (32, 32, 4, 2)]
    else:  # tensor-core modes
        shapes = [(64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 4, 2), (64, 16, 8, 2), (32, 32, 4, 2)]
    return [dict(block_d=d, block_k=k, num_warps=w, num_stages=s) for d, k, w, s in shapes]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(rows: int, tile_programs: int, block_k: int, sm_count: int,
                  splits: Optional[int] = None) -> Tuple[int, int]:
    """Split-K: ``(splits, rows_per_split)`` with ``rows_per_split`` a multiple of ``block_k`` and
    no empty range. Automatic (``splits=None``): about ``4·sm_count`` programs in all, but at
    least ``32·block_k`` rows per range (below that the atomics of a tile outweigh its
    multiply-adds) and at most 65535 ranges (the grid's axis 1). A given ``splits`` is an upper
    bound (rounding the ranges to whole row steps can only lower it)."""
    if rows <= 0:
        return 1, max(block_k, 1)
    if splits is None:
        wanted = _PROGRAMS_PER_SM * max(sm_count, 1)
        splits = triton.cdiv(wanted, max(tile_programs, 1))
        splits = min(splits, rows // (_MIN_CHUNKS_PER_SPLIT * block_k))
    splits = max(1, min(splits, _MAX_SPLITS, triton.cdiv(rows, block_k)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_k) * block_k
    return triton.cdiv(rows, rows_per_split), rows_per_split


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def conv_gram(x: torch.Tensor, kernel_size=None, stride=None, padding=None, dilation=None, groups: int = 1,
              precision: str = "fp64", *, geometry: Optional[ConvGeometry] = None, block_d: Optional[int] = None, block_k: Optional[int] = None,
              splits: Optional[int] = None, num_warps: Optional[int] = None,
              num_stages: Optional[int] = None) -> torch.Tensor:
    """The Gram ``(groups, d, d)`` of a conv's patch matrix with the Triton kernel (see the
    module docstring); the contract of ``torch.ops.sap_fast.conv_gram``.

    Args:
        x: ``(N, C, *spatial)``, 1 to 3 spatial dims, float32 or float64, any strides (NCHW,
            channels-last, slices; never copied).
        kernel_size, stride, padding, dilation: one int per spatial dim (or one int for all);
            ``padding`` is zeros on both sides of each dim.
        groups: the conv's groups; must divide C.
        geometry: the call's checked :class:`~..geometry.ConvGeometry`, in place of
            ``kernel_size`` to ``groups`` (which are then ignored).
        precision: ``"fp64"`` (float64 output) or ``"fp32"``, ``"tf32"``, ``"bf16"`` (float32).
        block_d, block_k: tile side and rows per step (powers of 2 ≥ 16).
        splits: row ranges per tile (split-K); None = chosen from the row count and the GPU.
        num_warps, num_stages: Triton launch options (ignored by the interpreter).
        None for any of these = :func:`default_config`; :func:`configs` lists tuning candidates.

    Returns:
        A new contiguous, exactly symmetric ``(groups, d, d)`` tensor, ``d = (C/groups)·prod(k)``.
        With more than one row range the summation order, hence the last bits, vary run to run.

    Raises:
        ValueError: a bad shape, dtype, geometry, precision or block size, or CPU tensors without
            the Triton interpreter.
    """
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and not interpreted():
        raise ValueError("conv_gram: CPU tensors need TRITON_INTERPRET=1 set before importing "
                         "sap_fast.backends.triton.gram; use conv_gram_reference on CPU")
    out, launches = conv_gram_launches(x, kernel_size, stride, padding, dilation, groups, precision,
                                       geometry=geometry, block_d=block_d, block_k=block_k, splits=splits,
                                       num_warps=num_warps, num_stages=num_stages)
    # Triton launches on the current CUDA device, which need not be x's
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        for launch in launches:
            launch()
    return out


def conv_gram_launches(x: torch.Tensor, kernel_size=None, stride=None, padding=None, dilation=None,
                       groups: int = 1, precision: str = "fp64", *,
                       geometry: Optional[ConvGeometry] = None, block_d: Optional[int] = None,
                       block_k: Optional[int] = None, splits: Optional[int] = None,
                       num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                       sm_count: Optional[int] = None) -> Tuple[torch.Tensor, List[Launch]]:
    """What :func:`conv_gram` runs, without running it: the output tensor (allocated, zeroed
    where row ranges meet by atomics) and the kernel launches that fill it, in order. Same
    arguments and checks as :func:`conv_gram`; ``sm_count`` (the GPU's multiprocessors, which
    size the split-K) defaults to ``x``'s GPU, and to 1 elsewhere. ``x`` may be a ``meta``
    tensor: ``tools/check_triton.py`` compiles these launches for a GPU that is not there."""
    geo = _check(x, kernel_size, stride, padding, dilation, groups, precision, geometry)
    default = default_config(geo.width, precision)
    block_d = _positive("block_d", block_d, default["block_d"], power_of_two=True)
    block_k = _positive("block_k", block_k, default["block_k"], power_of_two=True)
    num_warps = _positive("num_warps", num_warps, default["num_warps"])
    num_stages = _positive("num_stages", num_stages, default["num_stages"])
    if splits is not None:
        _positive("splits", splits, 1)
    width, groups = geo.width, geo.groups
    dtype = _out_dtype(precision)
    if geo.rows == 0 or width == 0:  # no rows (N = 0) or no columns (C = 0): G = 0
        return torch.zeros((groups, width, width), dtype=dtype, device=x.device), []

    tiles = triton.cdiv(width, block_d)
    n_upper = tiles * (tiles + 1) // 2
    if n_upper * groups > _INT32_MAX:
        raise ValueError(f"conv_gram: {groups} groups of width d={width} are too many tiles for the grid; "
                         "use a larger block_d")
    if sm_count is None:
        sm_count = 1 if interpreted() or x.device.type != "cuda" else _sm_count(x.device.index or 0)
    n_splits, rows_per_split = choose_splits(geo.rows, n_upper * groups, block_k, sm_count, splits)
    # partial tiles meet by atomic adds into zeros; with one range every upper entry is stored
    out = (torch.zeros if n_splits > 1 else torch.empty)((groups, width, width), dtype=dtype,
                                                         device=x.device)
    launches = [Launch(_conv_gram_kernel, (n_upper * groups, n_splits), (
        x, out,
        geo.rows, rows_per_split, geo.positions, width, geo.taps, geo.group_channels, tiles, n_upper,
        *geo.in_size, geo.out_size[1], geo.out_size[2], geo.kernel[1], geo.kernel[2],
        *geo.stride, *geo.padding, *geo.dilation,
        x.stride(0), x.stride(1), *geo.x_strides,
    ), dict(
        MODE=_MODE[precision], BF16_DOT=not interpreted(), ATOMIC=n_splits > 1,
        CHECK0=geo.padding[0] > 0, CHECK1=geo.padding[1] > 0, CHECK2=geo.padding[2] > 0,
        BLOCK_D=block_d, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    ))]
    if width > 1:
        launches.append(Launch(_mirror_kernel, (n_upper * groups,), (out, width, tiles, n_upper),
                               dict(BLOCK_D=block_d, num_warps=8 if block_d == 64 else 4)))
    return out, launches


def _check_rows(rows) -> None:
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"linear_gram: rows must be a tensor, got {type(rows).__name__}")
    if rows.dim() != 2:
        raise ValueError(f"linear_gram: rows must be 2-D (m, d), got shape {tuple(rows.shape)}")


def linear_gram(rows: torch.Tensor, precision: str = "fp64", **launch) -> torch.Tensor:
    """``rowsᵀ rows`` ``(1, d, d)`` of a linear layer's ``(m, d)`` row block (any strides), with the
    same kernel (a 1×1 conv over ``m`` samples of length 1) and precision modes. ``launch``: the
    keyword options of :func:`conv_gram`. Its worth over a torch ``addmm`` is reading fp32 rows
    straight into an fp64 (or rounded) Gram without a converted copy."""
    _check_rows(rows)
    return conv_gram(rows.unsqueeze(-1), [1], [1], [0], [1], 1, precision, **launch)


# ---------------------------------------------------------------------------------------------
# Plain-torch twin
# ---------------------------------------------------------------------------------------------

def conv_gram_reference(x: torch.Tensor, kernel_size=None, stride=None, padding=None, dilation=None,
                        groups: int = 1, precision: str = "fp64", *,
                        geometry: Optional[ConvGeometry] = None) -> torch.Tensor:
    """Plain-torch twin of :func:`conv_gram`: same arguments, checks, layout and output dtype.

    The value each mode stands for: the inputs rounded as the mode rounds them
    (:func:`round_inputs`), the patch matrix by ``Tensor.unfold`` per spatial dim (materialised:
    slow and memory hungry on purpose), ``RᵀR`` in float64 (exact products for rounded fp32
    inputs), made exactly symmetric from its upper triangle, rounded once to the output dtype.
    """
    geo = _check(x, kernel_size, stride, padding, dilation, groups, precision, geometry)
    dtype, groups = _out_dtype(precision), geo.groups
    spatial, width = geo.spatial, geo.width
    if geo.rows == 0 or width == 0:
        return torch.zeros((groups, width, width), dtype=dtype, device=x.device)
    lead = 3 - spatial
    k, s, p, dil = (v[lead:] for v in (geo.kernel, geo.stride, geo.padding, geo.dilation))
    v = round_inputs(x.detach(), precision).to(torch.float64)
    v = F.pad(v, [q for i in reversed(range(spatial)) for q in (p[i], p[i])])
    for i in range(spatial):
        v = v.unfold(2 + i, dil[i] * (k[i] - 1) + 1, s[i])[..., ::dil[i]]  # window appended last
    # (N, g, Cg, *out, *k) → (g, N, *out, Cg, *k): rows (sample, position), columns (channel, tap)
    order = [1, 0] + list(range(3, 3 + spatial)) + [2] + list(range(3 + spatial, 3 + 2 * spatial))
    r = v.unflatten(1, (groups, geo.group_channels)).permute(order).reshape(groups, -1, width)
    gram = (r.transpose(1, 2) @ r).triu()
    return (gram + gram.transpose(1, 2).tril(-1)).to(dtype)


def linear_gram_reference(rows: torch.Tensor, precision: str = "fp64") -> torch.Tensor:
    """Plain-torch twin of :func:`linear_gram`."""
    _check_rows(rows)
    return conv_gram_reference(rows.unsqueeze(-1), [1], [1], [0], [1], 1, precision)
