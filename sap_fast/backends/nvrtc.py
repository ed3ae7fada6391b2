"""The CUDA conv Gram kernel compiled at run time by NVRTC through cupy: no CUDA toolkit needed.

The CMake build (``sap_fast._C``) needs nvcc; GPU machines with torch from a wheel usually have
none. There, ``pip install "sap_fast[cupy]"`` is enough: :func:`conv_gram` compiles the very
kernels of ``csrc/cuda/conv_gram_kernels.cuh`` with NVRTC at first use and runs them with the
contract of ``torch.ops.sap_fast.conv_gram``: same arguments, same checks and one-line messages
(``RuntimeError``), same ``(groups, d, d)`` result, exactly symmetric.

- Sources: :data:`KERNEL_SOURCES` names each file and the template instantiations it is compiled
  with (``name_expressions``); ``tools/check_nvrtc.py`` (``make check-cuda``) compiles exactly this
  list, so the check and the backend cannot drift. The files are found as package data of an
  installed wheel first (``setup.py`` copies ``csrc/cuda/*.cuh`` to ``sap_fast/backends/csrc/cuda/``
  at build time), in the source checkout's ``csrc/cuda/`` second (editable installs): one copy of
  the source, which the CMake build uses too.
- Compilation: one ``cupy.RawModule`` per process, compiled for each device's own architecture
  the first time that device asks for a kernel (a few seconds), then kept by cupy's on-disk
  kernel cache (``~/.cupy/kernel_cache``, or ``CUPY_CACHE_DIR``) for every later process.
- Launch: on torch's current stream (ordered with the forward pass, no host sync), on torch's
  memory without copies (DLPack), into an output that torch allocates. The grid, the split-K
  choice and the mirror launch copy the host launchers at the end of the ``.cuh``, which NVRTC
  does not compile (:func:`rows_per_split`, :func:`tile_grid`, :func:`mirror_blocks`); the tests
  hold this copy, the tile constants and :data:`SHAPE_DTYPE` to the source.

:func:`load` says whether this can run here, and why not (cupy missing, NVRTC missing, no GPU,
forced portable, sources missing). :mod:`.gram` routes convs on a GPU here when the CMake-built
op is absent, or everywhere with ``SAP_FAST_GRAM_KERNEL=cupy``.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch

from . import cupy_runtime
from .geometry import SHAPE_DTYPE, SHAPE_FIELDS, ConvGeometry, conv_geometry  # noqa: F401
from .switches import switch

# -- the sources ---------------------------------------------------------------------------------

#: The installed package's copy of the kernel sources (package data of a wheel).
PACKAGE_SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cuda")
#: The source checkout's ``csrc/cuda`` (an editable install, or a tree on ``sys.path``).
CHECKOUT_SOURCE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc", "cuda")

_CTYPE = {torch.float32: "float", torch.float64: "double"}
_NAMESPACE = "sap_fast::cuda"


def tile_kernel_name(x_dtype: torch.dtype, acc_dtype: torch.dtype) -> str:
    """The name expression of the tile kernel for float32/float64 input and accumulation."""
    return (f"{_NAMESPACE}::conv_gram_tile_kernel<{_CTYPE[x_dtype]}, {_CTYPE[acc_dtype]}, "
            f"{_NAMESPACE}::DefaultGramTiling>")


def dmma_kernel_name(x_dtype: torch.dtype) -> str:
    """The name expression of the FP64 tensor-core tile kernel (float64 Gram, sm_80 and later)
    for float32/float64 input."""
    return f"{_NAMESPACE}::conv_gram_dmma_kernel<{_CTYPE[x_dtype]}, {_NAMESPACE}::DefaultGramTiling>"


def mirror_kernel_name(acc_dtype: torch.dtype) -> str:
    """The name expression of the kernel that copies the upper triangle to the lower."""
    return f"{_NAMESPACE}::mirror_upper_to_lower_kernel<{_CTYPE[acc_dtype]}>"


_DTYPES = (torch.float32, torch.float64)
#: Every kernel source NVRTC compiles, with the instantiations it needs: the four (input,
#: accumulation) pairs of csrc/cuda/conv_gram.cu, the tensor-core tiles for both inputs, and the
#: mirror for both accumulation types.
KERNEL_SOURCES: Dict[str, Tuple[str, ...]] = {
    "conv_gram_kernels.cuh": tuple(tile_kernel_name(x, acc) for x in _DTYPES for acc in _DTYPES)
                             + tuple(dmma_kernel_name(x) for x in _DTYPES)
                             + tuple(mirror_kernel_name(acc) for acc in _DTYPES),
}
#: The first compute capability with FP64 tensor cores (mma.sync m8n8k4 .f64).
DMMA_MIN_MAJOR = 8


def dmma_allowed() -> bool:
    """``SAP_FAST_GRAM_DMMA``, as csrc/cuda/conv_gram.cu reads it: ``auto`` (default; also ``1``,
    ``on``) puts float64 Grams on the FP64 tensor cores from sm_80 on; ``0``/``off`` keeps the FMA
    tiles there too (to time the two, or to test the older path on a newer GPU)."""
    return switch("SAP_FAST_GRAM_DMMA") == "auto"


def uses_dmma(acc_dtype: torch.dtype, capability_major: int) -> bool:
    """Whether a Gram in ``acc_dtype`` on a device of that compute capability takes the
    tensor-core tiles (the choice of csrc/cuda/conv_gram.cu)."""
    return acc_dtype == torch.float64 and capability_major >= DMMA_MIN_MAJOR and dmma_allowed()
#: NVRTC options beyond the architecture (cupy adds ``-arch`` for the device; the check passes
#: ``--gpu-architecture``). C++17: the sources use nested namespaces; cupy 14 defaults to it too.
NVRTC_OPTIONS: Tuple[str, ...] = ("--std=c++17",)


def source_dirs() -> Tuple[str, str]:
    """Where kernel sources are looked for, in order: the installed package, the checkout."""
    return PACKAGE_SOURCE_DIR, CHECKOUT_SOURCE_DIR


def source_path(name: str, dirs: Optional[Sequence[str]] = None) -> str:
    """The path of kernel source ``name``: the first of ``dirs`` (default :func:`source_dirs`)
    that holds it. Raises FileNotFoundError (one line) when none does."""
    dirs = tuple(dirs) if dirs is not None else source_dirs()
    for folder in dirs:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the CUDA kernel source {name} is in none of {list(dirs)}; reinstall "
                            "sap_fast from a source tree (its wheel ships csrc/cuda/*.cuh)")


def read_source(name: str, dirs: Optional[Sequence[str]] = None) -> str:
    with open(source_path(name, dirs), encoding="utf-8") as f:
        return f.read()


# -- availability ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _nvrtc_probe():
    """(NVRTC version as "major.minor", None) or (None, why not); tried once."""
    try:
        from cupy_backends.cuda.libs import nvrtc as lib
        major, minor = lib.getVersion()
    except Exception as err:
        return None, (f"cupy cannot load NVRTC ({cupy_runtime.typed_first_line(err)}); pip install "
                      "nvidia-cuda-nvrtc (CUDA 13; nvidia-cuda-nvrtc-cu12 for cupy-cuda12x)")
    return f"{major}.{minor}", None


def nvrtc_version() -> Optional[str]:
    """The NVRTC cupy loads ("13.5"), or None when it loads none (no GPU needed)."""
    return _nvrtc_probe()[0]


@functools.lru_cache(maxsize=None)
def _sources_probe() -> Optional[str]:
    """None when every kernel source is found, else why not; looked up once."""
    try:
        for name in KERNEL_SOURCES:
            source_path(name)
    except FileNotFoundError as err:
        return str(err)
    return None


def load():
    """(the cupy module, None) when the NVRTC kernels can run here, else (None, why not):
    forced portable, cupy missing, no GPU, NVRTC missing, or the kernel sources missing. Each
    probe runs once per process (the routing asks on every conv call)."""
    cp, why = cupy_runtime.load()
    if cp is None:
        return None, why
    version, why = _nvrtc_probe()
    if version is None:
        return None, why
    why = _sources_probe()
    return (None, why) if why else (cp, None)


def available() -> bool:
    """Whether :func:`conv_gram` can run here (see :func:`load` for why not)."""
    return load()[0] is not None


# -- compiling without a GPU (the compile check) ------------------------------------------------

class CompileError(RuntimeError):
    """NVRTC rejected a source; the message ends with NVRTC's log."""


def gpu_arch(name: str) -> str:
    """``"sm_90"`` from ``"sm_90"``, ``"90"``, ``"9.0"`` or ``"compute_90"``."""
    number = name.strip().lower().replace("compute_", "").replace("sm_", "").replace(".", "")
    if not number.isdigit():
        raise ValueError(f"GPU architecture {name!r}: use sm_XX, XX or X.Y (e.g. sm_90, 90, 9.0)")
    return f"sm_{number}"


def compile_source(name: str, arch: str, dirs: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Compile kernel source ``name`` with NVRTC to a cubin for ``arch``, with the backend's
    options and instantiations, and return name expression → mangled kernel name.

    Needs only cupy's NVRTC binding and the NVRTC library: no GPU, no driver (cupy's higher-level
    compiler functions ask the driver for the architecture, so they are not used here). Raises
    :class:`CompileError` with NVRTC's log.
    """
    from cupy_backends.cuda.libs import nvrtc as lib

    source = read_source(name, dirs)
    program = lib.createProgram(source, name, [], [])
    try:
        for expression in KERNEL_SOURCES[name]:
            lib.addNameExpression(program, expression)
        try:
            lib.compileProgram(program, [*NVRTC_OPTIONS, f"--gpu-architecture={gpu_arch(arch)}"])
        except lib.NVRTCError as err:
            raise CompileError(f"{name} ({gpu_arch(arch)}): {err}\n{lib.getProgramLog(program)}") from None
        if not lib.getCUBIN(program):
            raise CompileError(f"{name} ({gpu_arch(arch)}): NVRTC produced no cubin")
        return {expression: lib.getLoweredName(program, expression) for expression in KERNEL_SOURCES[name]}
    finally:
        lib.destroyProgram(program)


@functools.lru_cache(maxsize=None)
def _module(name: str):
    """The cupy module for kernel source ``name``; NVRTC runs at the first kernel a device asks
    for (cupy compiles per device architecture and caches the cubin on disk)."""
    cp = load()[0]
    return cp.RawModule(code=read_source(name), options=NVRTC_OPTIONS,
                        name_expressions=list(KERNEL_SOURCES[name]))


# -- the shape the kernels take: sap_fast.backends.geometry, plus the CUDA kernels' own limits ---

#: ``DefaultGramTiling`` = ``GramTiling<TILE, CHUNK, THREADS_PER_DIM>`` in the .cuh.
TILE, CHUNK, THREADS_PER_DIM = 64, 16, 16
MIRROR_THREADS = 256
_BLOCKS_PER_SM, _MIN_CHUNKS_PER_SPLIT, _MAX_SPLITS, _MAX_GRID_X = 4, 32, 65535, 2147483647


#: The record the kernels take by value (``ConvGramShape`` in the .cuh).
ConvGramShape = ConvGeometry


def cuda_limits(shape: ConvGeometry) -> Optional[str]:
    """Why the CUDA kernels cannot take this geometry (their grid and index limits), or None."""
    if shape.groups > 65535:
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
    then the CUDA kernels' own limits (:func:`cuda_limits`), with the op's one-line messages."""
    shape = conv_geometry(x, kernel_size, stride, padding, dilation, groups, dtype)
    why = cuda_limits(shape)
    if why is not None:
        raise RuntimeError(f"conv_gram: {why}")
    return shape


# -- the launch geometry: copies of the host launchers in conv_gram_kernels.cuh -----------------

def upper_tile_count(tiles: int) -> int:
    return tiles * (tiles + 1) // 2


def grid_fits(shape: ConvGramShape, tile: int = TILE) -> bool:
    """``conv_gram_grid_fits``: groups on gridDim.y (≤ 65535), upper tiles on gridDim.x."""
    tiles = -(-shape.width // tile)
    return shape.groups <= 65535 and upper_tile_count(tiles) <= _MAX_GRID_X


def rows_per_split(tile_blocks: int, rows: int, sm_count: int, chunk: int = CHUNK) -> int:
    """``choose_rows_per_split``: rows per split-K range, whole chunks. About 4 blocks per SM in
    all, but at least 32 chunks per range (below that a tile's atomics outweigh its multiply-adds)
    and at most 65535 ranges (gridDim.z)."""
    wanted = _BLOCKS_PER_SM * (sm_count if sm_count > 0 else 1)
    splits = -(-wanted // tile_blocks)
    splits = min(splits, rows // (_MIN_CHUNKS_PER_SPLIT * chunk), _MAX_SPLITS)
    splits = max(splits, 1)
    per_split = -(-rows // splits)
    return -(-per_split // chunk) * chunk


def tile_grid(shape: ConvGramShape, per_split: int, tile: int = TILE) -> Tuple[int, int, int]:
    """``conv_gram_tile_grid``: (upper tiles, groups, row ranges)."""
    tiles = -(-shape.width // tile)
    return upper_tile_count(tiles), shape.groups, -(-shape.rows // per_split)


def mirror_blocks(width: int, matrices: int) -> int:
    """``launch_mirror_upper_to_lower``'s block count (a grid-stride loop: at most 65535)."""
    wanted = -(-(matrices * width * width) // MIRROR_THREADS)
    return min(max(wanted, 1), 65535)


def launch(cp, module, x: torch.Tensor, gram: torch.Tensor, shape: ConvGramShape, sm_count: int,
           stream, dmma: bool = False) -> None:
    """Queue the tile kernel, then the mirror, on ``stream`` (a cupy stream): ``gram`` must be
    zeroed (the tiles add into it), ``x`` contiguous. ``dmma``: the tensor-core tiles, for a
    float64 ``gram`` (:func:`uses_dmma`); same grid and block. ``cp`` is the cupy module and
    ``module`` a :func:`_module` (or stand-ins, in the tests)."""
    if dmma and gram.dtype != torch.float64:
        raise ValueError(f"the tensor-core tiles compute float64 Grams only, got {gram.dtype}")
    tile = module.get_function(dmma_kernel_name(x.dtype) if dmma else tile_kernel_name(x.dtype, gram.dtype))
    mirror = module.get_function(mirror_kernel_name(gram.dtype))
    tiles = -(-shape.width // TILE)
    per_split = rows_per_split(upper_tile_count(tiles) * shape.groups, shape.rows, sm_count)
    packed = shape.pack()  # alive until the launch returns (the driver copies the arguments then)
    with stream:
        # zero-copy views; made on the stream they are used on, so DLPack adds no wait
        x_view, gram_view = cp.from_dlpack(x.detach()), cp.from_dlpack(gram)
        tile(tile_grid(shape, per_split), (THREADS_PER_DIM, THREADS_PER_DIM),
             (x_view, gram_view, packed, numpy.int64(per_split)))
        mirror((mirror_blocks(shape.width, shape.groups),), (MIRROR_THREADS,),
               (gram_view, numpy.int64(shape.width), numpy.int64(shape.groups)))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def conv_gram(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int], groups: int,
              dtype: torch.dtype) -> torch.Tensor:
    """``torch.ops.sap_fast.conv_gram`` on CUDA, with the kernel compiled by NVRTC.

    Args:
        x: ``(N, C, *spatial)`` on a CUDA device, 1 to 3 spatial dims, float32 or float64, any
            strides (a non-contiguous input is copied once, as the CMake-built op does).
        kernel_size, stride, padding, dilation: one int per spatial dim; ``padding`` is zeros on
            both sides of each dim.
        groups: the conv's groups; must divide C.
        dtype: the accumulation and output dtype, torch.float32 or torch.float64.

    Returns:
        A new ``(groups, d, d)`` tensor on x's device, ``d = (C/groups)·prod(kernel_size)``,
        exactly symmetric. A float64 Gram is computed on the FP64 tensor cores from sm_80 on
        (:func:`uses_dmma`), as the CMake-built op does. With more than one split-K range per tile the atomics add in any
        order, so the last bits vary run to run (as for the CMake-built kernel).

    Raises:
        RuntimeError: the op's one-line messages for bad arguments; or, on a machine where the
            kernel cannot run, why (:func:`load`).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"conv_gram: x must be a tensor, got {type(x).__name__}")
    if not x.is_cuda:
        raise RuntimeError(f"conv_gram (CUDA): x must be a CUDA tensor, got {x.device}")
    shape = conv_gram_shape(x, kernel_size, stride, padding, dilation, groups, dtype)
    cp, why = load()
    if cp is None:
        raise RuntimeError(f"conv_gram (cupy): {why}")
    device = x.device
    with torch.cuda.device(device):
        gram = torch.zeros((shape.groups, shape.width, shape.width), dtype=dtype, device=device)
        if shape.rows == 0 or shape.width == 0:  # no rows (N = 0) or no columns (C = 0): G = 0
            return gram
        x = x.contiguous()
        with cp.cuda.Device(device.index):
            stream = cupy_runtime.stream_of(cp, torch.cuda.current_stream(device))
            launch(cp, _module("conv_gram_kernels.cuh"), x, gram, shape, _sm_count(device.index), stream,
                   dmma=uses_dmma(dtype, _capability_major(device.index)))
    return gram


def struct_fields_in(source: str, struct: str = "ConvGramShape") -> List[Tuple[str, int]]:
    """The ``int64_t`` fields of a C struct in ``source``, in order, as (name, count): what
    :data:`SHAPE_FIELDS` must equal (the tests and the compile check hold it to the source)."""
    body = re.search(r"struct\s+" + struct + r"\s*\{(.*?)\};", source, re.S)
    if body is None:
        raise ValueError(f"no struct {struct} in the source")
    fields = []
    for line in body.group(1).splitlines():
        line = line.split("//")[0].strip()
        match = re.fullmatch(r"int64_t\s+(\w+)(?:\[(\d+)\])?;", line)
        if match:
            fields.append((match.group(1), int(match.group(2) or 1)))
        elif line:
            raise ValueError(f"struct {struct}: unexpected member {line!r} (only int64_t fields are mirrored)")
    return fields


def default_tiling_in(source: str) -> Tuple[int, int, int]:
    """``DefaultGramTiling``'s (tile, chunk, threads per dim) as the source declares it."""
    match = re.search(r"using\s+DefaultGramTiling\s*=\s*GramTiling<\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*>", source)
    if match is None:
        raise ValueError("no DefaultGramTiling = GramTiling<...> in the source")
    return tuple(int(v) for v in match.groups())
