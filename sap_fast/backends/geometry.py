"""The geometry of one conv Gram call, built and checked once in Python: :func:`conv_geometry`.

Every Gram kernel (the CUDA kernels through NVRTC, Triton's, the torch shift form) takes a
:class:`ConvGeometry`: the input's shape, the conv's kernel, stride, zero padding, dilation and
groups, as 3-D, with the derived sizes (taps, width ``d``, output positions, rows of ``R``). The
checks and their one-line messages are those of the C++ op (``csrc/conv_geometry.h``), so a
call is refused the same way on either side of the language boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy
import torch

__all__ = ["ConvGeometry", "KERNEL_INPUT_DTYPES", "SHAPE_DTYPE", "SHAPE_FIELDS", "conv_geometry"]

#: the input (and accumulation) dtypes every Gram kernel reads
KERNEL_INPUT_DTYPES = (torch.float32, torch.float64)
_DTYPES = KERNEL_INPUT_DTYPES

#: ``sap_fast::cuda::ConvGramShape``, field for field (all int64, so no padding): the tile kernel
#: takes it by value.
SHAPE_FIELDS: Tuple[Tuple[str, int], ...] = (
    ("batch", 1), ("channels", 1), ("groups", 1), ("group_channels", 1),
    ("in_size", 3), ("out_size", 3), ("kernel", 3), ("stride", 3), ("padding", 3), ("dilation", 3),
    ("taps", 1), ("width", 1), ("positions", 1), ("rows", 1))
SHAPE_DTYPE = numpy.dtype([(name, "<i8") if n == 1 else (name, "<i8", (n,)) for name, n in SHAPE_FIELDS],
                          align=True)

_INT64_MAX = 2 ** 63 - 1
# c10's names, as TORCH_CHECK prints a ScalarType (the messages match the CMake-built op's)
_SCALAR_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
                 torch.float64: "Double", torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short",
                 torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
                 torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


@dataclass(frozen=True)
class ConvGeometry:
    """The checked geometry of one conv Gram call, as 3-D (1-D/2-D convs get leading size-1
    dims): what every Gram kernel reads, and field for field the ``ConvGramShape`` that the
    CUDA kernels take by value."""
    batch: int
    channels: int
    groups: int
    group_channels: int
    in_size: Tuple[int, int, int]
    out_size: Tuple[int, int, int]
    kernel: Tuple[int, int, int]
    stride: Tuple[int, int, int]
    padding: Tuple[int, int, int]
    dilation: Tuple[int, int, int]
    taps: int
    width: int
    positions: int
    rows: int
    spatial: int = 3  # spatial dims of the call (1 to 3); the first 3 - spatial entries are padding

    @property
    def dims(self) -> dict:
        """The call's own kernel, stride, padding and dilation (``spatial`` entries each), and
        its input size: the arguments of the op for this geometry."""
        lead = 3 - self.spatial
        return {name: list(getattr(self, name)[lead:])
                for name in ("kernel", "stride", "padding", "dilation", "in_size")}

    def pack(self) -> numpy.ndarray:
        """A one-element array of :data:`SHAPE_DTYPE`: cupy passes a size-one numpy array to a
        kernel by value, which is how the kernel takes its ``ConvGramShape``."""
        return numpy.array([tuple(getattr(self, name) for name, _ in SHAPE_FIELDS)], dtype=SHAPE_DTYPE)


def _fail(message: str):
    raise RuntimeError(f"conv_gram: {message}")


def _ints(name: str, value) -> List[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        _fail(f"{name} must be a list of ints (one per spatial dim of x), got {value!r}")
    return list(value)


def _list(values) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def conv_geometry(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int,
                  dtype: torch.dtype) -> ConvGeometry:
    """The checks of ``torch.ops.sap_fast.conv_gram`` (csrc/conv_geometry.h), in the same order
    with the same one-line messages (RuntimeError), and the geometry the kernels work on. Reads
    only shapes: runs on any tensor. ``padding`` is zeros, on both sides of each dim."""
    if x.dim() < 3 or x.dim() > 5:
        _fail(f"x must be (N, C, *spatial) with 1 to 3 spatial dims, got shape {_list(x.shape)}; "
              "add a batch dim with x.unsqueeze(0) for unbatched input")
    if x.dtype not in _DTYPES:
        _fail(f"x must be float32 or float64, got {_SCALAR_NAMES.get(x.dtype, x.dtype)}; "
              "convert it with .float()")
    if dtype not in _DTYPES:
        _fail(f"dtype (accumulation) must be float32 or float64, got {_SCALAR_NAMES.get(dtype, dtype)}")
    spatial = x.dim() - 2
    k, s, p, dil = (_ints("kernel_size", kernel_size), _ints("stride", stride), _ints("padding", padding),
                    _ints("dilation", dilation))
    if not len(k) == len(s) == len(p) == len(dil) == spatial:
        _fail(f"kernel_size, stride, padding and dilation need {spatial} entries each (one per spatial "
              "dim of x)")
    channels = x.shape[1]
    if not (groups >= 1 and channels % groups == 0):
        _fail(f"groups={groups} must be positive and divide the {channels} input channels")
    out = []
    for i in range(spatial):
        if not (k[i] > 0 and s[i] > 0 and dil[i] > 0 and p[i] >= 0):
            _fail(f"kernel_size, stride and dilation must be positive and padding non-negative (dim {i})")
        span = dil[i] * (k[i] - 1) + 1
        padded = x.shape[2 + i] + 2 * p[i]
        if padded < span:
            _fail(f"spatial dim {i} has size {x.shape[2 + i]} (padded {padded}), smaller than the "
                  f"dilated kernel ({span}); the conv has no output")
        out.append((padded - span) // s[i] + 1)
    lead = 3 - spatial
    taps, positions = math.prod(k), math.prod(out)
    batch = x.shape[0]
    if positions and batch > _INT64_MAX // positions:
        _fail("N * output positions overflows int64")
    shape = ConvGeometry(
        batch=batch, channels=channels, groups=groups, group_channels=channels // groups,
        in_size=tuple([1] * lead + list(x.shape[2:])), out_size=tuple([1] * lead + out),
        kernel=tuple([1] * lead + k), stride=tuple([1] * lead + s), padding=tuple([0] * lead + p),
        dilation=tuple([1] * lead + dil), taps=taps, width=channels // groups * taps,
        positions=positions, rows=batch * positions, spatial=spatial)
    return shape


