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
  memory without copies (DLPack), into an output that torch allocates, from the launch plan that
  the CMake-built op launches from too (:func:`.conv_launch.plan`: kernel, grid, split-K ranges,
  mirror); the tests hold :data:`SHAPE_DTYPE` to the source's struct.

:func:`load` says whether this can run here, and why not (cupy missing, NVRTC missing, no GPU,
forced portable, sources missing). :mod:`.gram` routes convs on a GPU here when the CMake-built
op is absent, or everywhere with ``SAP_FAST_GRAM_KERNEL=cupy``.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import torch

from . import conv_launch, cupy_runtime
from .conv_launch import LaunchPlan, conv_gram_shape, cuda_limits  # noqa: F401  (the checks on CUDA)
from .geometry import SHAPE_DTYPE, SHAPE_FIELDS, ConvGeometry  # noqa: F401

__all__ = ["PACKAGE_SOURCE_DIR", "CHECKOUT_SOURCE_DIR", "tile_kernel_name", "dmma_kernel_name",
           "mirror_kernel_name", "source_dirs", "source_path", "read_source", "nvrtc_version", "load",
           "available", "CompileError", "gpu_arch", "compile_source", "conv_gram_shape",
           "cuda_limits", "kernel_name", "launch", "conv_gram", "struct_fields_in", "default_tiling_in"]

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


# -- the launch, from the plan -------------------------------------------------------------------

def kernel_name(plan: LaunchPlan, x_dtype: torch.dtype) -> str:
    """The name expression of the plan's tile kernel for input ``x_dtype``."""
    return dmma_kernel_name(x_dtype) if plan.dmma else tile_kernel_name(x_dtype, plan.acc_dtype)


def launch(cp, module, x: torch.Tensor, gram: torch.Tensor, shape: ConvGeometry, plan: LaunchPlan,
           stream) -> None:
    """Queue the plan's tile kernel, then the mirror, on ``stream`` (a cupy stream): ``gram``
    must be zeroed (the tiles add into it) and of the plan's accumulation dtype, ``x``
    contiguous; ``plan`` is :func:`.conv_launch.plan` of ``shape``. ``cp`` is the cupy module and
    ``module`` a :func:`_module` (or stand-ins, in the tests)."""
    if plan.dmma and gram.dtype != torch.float64:
        raise ValueError(f"the tensor-core tiles compute float64 Grams only, got {gram.dtype}")
    if gram.dtype != plan.acc_dtype:
        raise ValueError(f"gram is {gram.dtype}, the launch plan accumulates in {plan.acc_dtype}")
    tile = module.get_function(kernel_name(plan, x.dtype))
    mirror = module.get_function(mirror_kernel_name(gram.dtype))
    packed = shape.pack()  # alive until the launch returns (the driver copies the arguments then)
    with stream:
        # zero-copy views; made on the stream they are used on, so DLPack adds no wait
        x_view, gram_view = cp.from_dlpack(x.detach()), cp.from_dlpack(gram)
        tile(plan.grid, plan.block, (x_view, gram_view, packed, numpy.int64(plan.rows_per_split)))
        mirror(plan.mirror_grid, plan.mirror_block, (gram_view, numpy.int64(shape.width), numpy.int64(shape.groups)))


def conv_gram(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int], groups: int,
              dtype: torch.dtype, *, plan: Optional[LaunchPlan] = None) -> torch.Tensor:
    """``torch.ops.sap_fast.conv_gram`` on CUDA, with the kernel compiled by NVRTC.

    Args:
        x: ``(N, C, *spatial)`` on a CUDA device, 1 to 3 spatial dims, float32 or float64, any
            strides (a non-contiguous input is copied once, as the CMake-built op does).
        kernel_size, stride, padding, dilation: one int per spatial dim; ``padding`` is zeros on
            both sides of each dim.
        groups: the conv's groups; must divide C.
        dtype: the accumulation and output dtype, torch.float32 or torch.float64.
        plan: the launch (:func:`.conv_launch.plan` of this call); default: the plan for x's
            device, the one the CMake-built op launches there.

    Returns:
        A new ``(groups, d, d)`` tensor on x's device, ``d = (C/groups)·prod(kernel_size)``,
        exactly symmetric. By default a float64 Gram runs on the FP64 tensor cores from sm_80 on
        (``SAP_FAST_GRAM_DMMA``), as the CMake-built op's does. With more than one split-K range
        per tile the atomics add in any order, so the last bits vary run to run (as for the
        CMake-built kernel).

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
        if plan is None:
            plan = conv_launch.plan(shape, conv_launch.device_sm_count(device.index),
                                    conv_launch.device_capability_major(device.index), dtype)
        x = x.contiguous()
        with cp.cuda.Device(device.index):
            stream = cupy_runtime.stream_of(cp, torch.cuda.current_stream(device))
            launch(cp, _module("conv_gram_kernels.cuh"), x, gram, shape, plan, stream)
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
