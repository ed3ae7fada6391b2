"""The launch plan of the CUDA conv Gram kernels (``csrc/cuda/conv_gram_kernels.cuh``): one
description, for both ways those kernels reach a GPU.

:func:`plan` turns a checked :class:`~.geometry.ConvGeometry`, the device's SM count and compute
capability and the accumulation dtype into a :class:`LaunchPlan`: which tile kernel (the FMA
tiles, or the FP64 tensor-core tiles for a float64 Gram from sm_80 on), its grid and block, the
rows per split-K range, and the mirror kernel's grid and block. It is a pure function of its
arguments and of one switch, ``SAP_FAST_GRAM_DMMA`` (read through :func:`.switches.switch`, the
one reader of the environment).

- The nvcc-built op. ``torch.ops.sap_fast.conv_gram`` keeps its schema, checks, one-line
  messages and result on CUDA; its CUDA kernel is :func:`conv_gram_cuda`, in Python (registered
  by :mod:`._ops` when ``sap_fast._C`` holds the CUDA launch op): it checks the call
  (:func:`conv_gram_shape`), computes the plan, allocates the Gram and hands both to
  ``torch.ops.sap_fast.conv_gram_launch`` (``csrc/cuda/conv_gram.cu``). That C++ op only
  launches: it checks every input in one block (devices, dtypes, contiguity, the Gram's shape,
  the geometry, ``rows_per_split``, the tensor-core tiles only for a float64 Gram, the mirror's
  grid), derives the tile grid from ``rows_per_split`` as the kernels' indexing requires
  (``tile_grid_size``), and launches the tiles and the mirror on the current stream. The C++
  side makes no launch choice of its own: the split-K ranges, the kernel and the mirror's grid
  are the plan's.
- The NVRTC route (:mod:`.nvrtc`, cupy, no toolkit) launches the same kernels from the same
  plan (:func:`.nvrtc.launch`).
- The CPU twin of the tensor-core tiles (``torch.ops.sap_fast.conv_gram_dmma_twin``) takes the
  plan's ``rows_per_split``, so it runs the very grid a GPU would.

The tiling constants are ``DefaultGramTiling``'s in the source; the tests hold them to it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .geometry import ConvGeometry, conv_geometry
from .switches import switch

__all__ = ["LaunchPlan", "plan", "rows_per_split", "tile_grid", "mirror_blocks", "grid_fits", "uses_dmma",
           "dmma_allowed", "cuda_limits", "conv_gram_shape", "conv_gram_cuda"]

#: ``DefaultGramTiling`` = ``GramTiling<TILE, CHUNK, THREADS_PER_DIM>`` in the .cuh: the tile kernels
#: are launched with a THREADS_PER_DIM × THREADS_PER_DIM block and walk their rows CHUNK at a time.
TILE, CHUNK, THREADS_PER_DIM = 64, 16, 16
#: Threads per block of the mirror kernel (a grid-stride loop: any grid covers the Gram).
MIRROR_THREADS = 256
#: Split-K: about this many blocks per SM in all ...
BLOCKS_PER_SM = 4
#: ... but no range shorter than this many chunks (below that a tile's atomics outweigh its
#: multiply-adds).
MIN_CHUNKS_PER_SPLIT = 32
#: CUDA's grid limits: gridDim.x, and gridDim.y / gridDim.z.
MAX_GRID_X, MAX_GRID_YZ = 2 ** 31 - 1, 65535
#: The first compute capability with FP64 tensor cores (mma.sync m8n8k4 .f64).
DMMA_MIN_MAJOR = 8
#: The mirror's grid: at most this many blocks (a grid-stride loop; more only add launch cost).
MAX_MIRROR_BLOCKS = 65535

KERNELS = ("fma", "dmma")


@dataclass(frozen=True)
class LaunchPlan:
    """How one conv Gram call runs on a GPU: what :func:`plan` decides, and all that the
    launchers (the C++ launch op, :func:`.nvrtc.launch`) and the CPU twin take from it.

    ``kernel`` is ``"fma"`` (``conv_gram_tile_kernel``) or ``"dmma"`` (``conv_gram_dmma_kernel``,
    float64 Grams only); ``grid`` is (upper-triangle tiles, groups, row ranges), ``block`` the
    tile kernels' threads; each row range holds ``rows_per_split`` rows (whole chunks; the last
    one fewer); ``mirror_grid``/``mirror_block`` launch ``mirror_upper_to_lower_kernel``. A call
    without rows or columns has a zero in ``grid``: nothing is launched (:attr:`empty`)."""
    kernel: str
    acc_dtype: torch.dtype
    grid: Tuple[int, int, int]
    block: Tuple[int, int]
    rows_per_split: int
    mirror_grid: Tuple[int]
    mirror_block: Tuple[int]

    @property
    def dmma(self) -> bool:
        """Whether the tiles run on the FP64 tensor cores."""
        return self.kernel == "dmma"

    @property
    def splits(self) -> int:
        """Row ranges (split-K) per tile."""
        return self.grid[2]

    @property
    def empty(self) -> bool:
        """No rows or no columns: the Gram is zero and no kernel runs."""
        return 0 in self.grid


def upper_tile_count(tiles: int) -> int:
    """Tiles on or above the diagonal of a ``tiles`` × ``tiles`` tiling (``upper_tile_count``)."""
    return tiles * (tiles + 1) // 2


def grid_fits(shape: ConvGeometry, tile: int = TILE) -> bool:
    """Whether the tile grid can hold this geometry: groups on gridDim.y (≤ 65535), upper tiles
    on gridDim.x (< 2³¹); ``conv_gram_grid_fits`` in the .cuh, which the C++ checks use."""
    tiles = -(-shape.width // tile)
    return shape.groups <= MAX_GRID_YZ and upper_tile_count(tiles) <= MAX_GRID_X


def rows_per_split(tile_blocks: int, rows: int, sm_count: int, chunk: int = CHUNK) -> int:
    """Rows per split-K range, whole chunks: about :data:`BLOCKS_PER_SM` blocks per SM in all,
    but at least :data:`MIN_CHUNKS_PER_SPLIT` chunks per range and at most 65535 ranges
    (gridDim.z). ``sm_count`` 0 counts as 1; never below one chunk (also for no rows or no
    tiles, where nothing is launched). Rounding
    up to whole chunks can only lower the range count, and leaves no range empty."""
    wanted = BLOCKS_PER_SM * (sm_count if sm_count > 0 else 1)
    splits = -(-wanted // max(tile_blocks, 1))
    splits = min(splits, rows // (MIN_CHUNKS_PER_SPLIT * chunk), MAX_GRID_YZ)
    splits = max(splits, 1)
    per_split = -(-rows // splits)
    return max(-(-per_split // chunk) * chunk, chunk)


def tile_grid(shape: ConvGeometry, per_split: int, tile: int = TILE) -> Tuple[int, int, int]:
    """(upper tiles, groups, row ranges): the grid whose blocks ``tile_block`` in the .cuh maps
    to one upper tile, one group and one range of ``per_split`` rows each."""
    tiles = -(-shape.width // tile)
    return upper_tile_count(tiles), shape.groups, -(-shape.rows // per_split)


def mirror_blocks(width: int, matrices: int) -> int:
    """Blocks of the mirror kernel: one thread per Gram entry, at most :data:`MAX_MIRROR_BLOCKS`
    blocks (it strides over the rest), at least one."""
    wanted = -(-(matrices * width * width) // MIRROR_THREADS)
    return min(max(wanted, 1), MAX_MIRROR_BLOCKS)


def dmma_allowed() -> bool:
    """``SAP_FAST_GRAM_DMMA``: ``auto`` (default; also ``1``, ``on``) puts float64 Grams on the
    FP64 tensor cores from sm_80 on; ``0``/``off`` keeps the FMA tiles there too (to time the two,
    or to test the FMA tiles on a newer GPU). Raises ValueError (one line) for another value."""
    return switch("SAP_FAST_GRAM_DMMA") == "auto"


def uses_dmma(acc_dtype: torch.dtype, capability_major: int) -> bool:
    """Whether a Gram in ``acc_dtype`` on a device of that compute capability takes the
    tensor-core tiles."""
    return acc_dtype == torch.float64 and capability_major >= DMMA_MIN_MAJOR and dmma_allowed()


def plan(shape: ConvGeometry, sm_count: int, capability_major: int, acc_dtype: torch.dtype) -> LaunchPlan:
    """The launch of the conv Gram kernels for ``shape`` on a device with ``sm_count`` SMs of
    compute capability ``capability_major``, accumulating in ``acc_dtype`` (float32 or float64).

    Raises ValueError (one line) for another dtype, a geometry the grid cannot hold (checked
    geometries always fit: :func:`conv_gram_shape`), or a bad ``SAP_FAST_GRAM_DMMA``."""
    if acc_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"conv_gram launch plan: acc_dtype must be torch.float32 or torch.float64, got {acc_dtype}")
    if not grid_fits(shape):
        raise ValueError(f"conv_gram launch plan: Gram width d = {shape.width} with {shape.groups} groups does not "
                         "fit the CUDA grid; check the call with conv_gram_shape first")
    kernel = "dmma" if uses_dmma(acc_dtype, capability_major) else "fma"
    tiles = -(-shape.width // TILE)
    per_split = rows_per_split(upper_tile_count(tiles) * shape.groups, shape.rows, sm_count)
    return LaunchPlan(kernel=kernel, acc_dtype=acc_dtype, grid=tile_grid(shape, per_split),
                      block=(THREADS_PER_DIM, THREADS_PER_DIM), rows_per_split=per_split,
                      mirror_grid=(mirror_blocks(shape.width, shape.groups),), mirror_block=(MIRROR_THREADS,))


# -- the checks of a call on CUDA ----------------------------------------------------------------

def cuda_limits(shape: ConvGeometry) -> Optional[str]:
    """Why the CUDA kernels cannot take this geometry (their grid and index limits), or None."""
    if shape.groups > MAX_GRID_YZ:
        return f"at most 65535 groups are supported on CUDA, got {shape.groups}"
    k, s, p, dil = shape.kernel, shape.stride, shape.padding, shape.dilation
    if not all(k[i] <= 1 << 20 and s[i] <= 1 << 30 and dil[i] <= 1 << 20 and p[i] <= 1 << 30 for i in range(3)):
        lead = 3 - shape.spatial
        listed = ", ".join("[" + ", ".join(str(v) for v in values[lead:]) + "]" for values in (k, s, p, dil))
        return f"kernel_size/stride/padding/dilation out of range: {listed}"
    if not grid_fits(shape):
        return f"Gram width d = {shape.width} is too large for the CUDA kernel's grid"
    return None


def conv_gram_shape(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int,
                    dtype: torch.dtype) -> ConvGeometry:
    """The checks of ``torch.ops.sap_fast.conv_gram`` on CUDA: :func:`~.geometry.conv_geometry`,
    then the CUDA kernels' own limits (:func:`cuda_limits`), with the op's one-line messages
    (RuntimeError)."""
    shape = conv_geometry(x, kernel_size, stride, padding, dilation, groups, dtype)
    why = cuda_limits(shape)
    if why is not None:
        raise RuntimeError(f"conv_gram: {why}")
    return shape


@functools.lru_cache(maxsize=None)
def device_sm_count(device_index: int) -> int:
    """The SM count of CUDA device ``device_index`` (asked once)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def device_capability_major(device_index: int) -> int:
    """The major compute capability of CUDA device ``device_index`` (asked once)."""
    return torch.cuda.get_device_capability(device_index)[0]


def device_plan(shape: ConvGeometry, device: torch.device, acc_dtype: torch.dtype) -> LaunchPlan:
    """:func:`plan` for a CUDA device; a bad ``SAP_FAST_GRAM_DMMA`` raises RuntimeError, as the
    op's other errors do."""
    try:
        return plan(shape, device_sm_count(device.index), device_capability_major(device.index), acc_dtype)
    except ValueError as err:
        raise RuntimeError(str(err)) from None


def launch_op_args(plan_: LaunchPlan) -> Tuple[int, bool, int, int]:
    """The plan as ``torch.ops.sap_fast.conv_gram_launch`` takes it, after the call's own
    arguments: (rows_per_split, dmma, mirror_blocks, mirror_threads). The tile grid follows from
    ``rows_per_split`` and the geometry; the block from the tiling the kernels are built with."""
    return plan_.rows_per_split, plan_.dmma, plan_.mirror_grid[0], plan_.mirror_block[0]


def conv_gram_cuda(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int, dtype: torch.dtype, launch=None) -> torch.Tensor:
    """``torch.ops.sap_fast.conv_gram`` on CUDA (its CUDA kernel, registered by :mod:`._ops`):
    the op's checks and messages, the plan for x's device, then one call of the C++ launch op
    (``launch``, default ``torch.ops.sap_fast.conv_gram_launch``), which writes the whole Gram on
    the current stream. A non-contiguous x is copied once. Returns ``(groups, d, d)``, exactly
    symmetric."""
    shape = conv_gram_shape(x, kernel_size, stride, padding, dilation, groups, dtype)
    size = (shape.groups, shape.width, shape.width)
    if shape.rows == 0 or shape.width == 0:  # no rows (N = 0) or no columns (C = 0): G = 0
        return torch.zeros(size, dtype=dtype, device=x.device)
    gram = torch.empty(size, dtype=dtype, device=x.device)  # the launch op writes every entry
    launch_plan = device_plan(shape, x.device, dtype)
    launch = launch if launch is not None else torch.ops.sap_fast.conv_gram_launch
    launch(x.contiguous(), gram, list(kernel_size), list(stride), list(padding), list(dilation), groups,
           *launch_op_args(launch_plan))
    return gram
