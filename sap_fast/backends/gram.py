"""The Gram of one layer call without its rows: which kernel serves it, and the call.

:func:`gram` is the accumulate stage's one dispatch point. It looks at the call (conv or linear,
stride, device, dtype, input precision), asks :func:`route` which kernel serves it, and runs
that kernel; it returns None when none does, and the caller streams rows on the portable path.
:func:`route` is the decision alone, a pure function of plain flags (tested by itself).

Kernels:

- ``"shift"``: the C++ shift-correlation Gram (``torch.ops.sap_fast.conv_gram_shift``), for
  stride-1 convs with a kernel larger than 1 on the CPU;
- ``"cuda"``: the implicit-im2col CUDA kernel (``torch.ops.sap_fast.conv_gram``), convs on a GPU;
  a float64 Gram runs its product on the FP64 tensor cores from sm_80 on (DMMA tiles,
  ``SAP_FAST_GRAM_DMMA=0`` keeps the FMA tiles), the FMA tiles elsewhere;
- ``"cupy"``: the same CUDA kernel compiled at run time by NVRTC through cupy (:mod:`.nvrtc`),
  convs on a GPU whose install has no CMake-built CUDA kernels (torch from a wheel, no toolkit);
- ``"triton"``: the Triton implicit-im2col kernel (:mod:`.triton.gram`), convs, and linear
  layers as 1×1 convs;
- ``"torch-shift"``: the shift-correlation form in torch weight-gradient convs (:mod:`.shift`,
  cuDNN on a GPU).

``SAP_FAST_GRAM_KERNEL`` (GPU, fp32/fp64 Grams): ``auto`` (default: the CUDA kernel for convs,
CMake-built if present, else through NVRTC if cupy runs, else Triton; cuBLAS on the streamed
rows for linear layers), ``cuda``, ``cupy`` (the NVRTC build of the CUDA kernel even where the
CMake-built one is present), ``triton`` (Triton for both: it computes only the upper triangle,
half of cuBLAS's full product for ViT's linear layers), or ``shift`` (stride-1 1-D/2-D convs by
:mod:`.shift` where it does fewer multiply-adds). A choice that cannot run here falls back to
what ``auto`` picks (``triton`` to the portable path). The tf32/bf16 modes exist only as Triton
kernels.

Which kernel ``auto`` gives a float64 conv Gram on an H100 is a measured choice, and no GPU has
measured it yet: the CUDA kernel on FP64 tensor cores (about twice the FP64 FMA rate, and the
same tiles on FMAs before sm_80), Triton's fp64 kernel (its ``tl.dot`` on DMMA too), or cuBLAS
on unfolded chunks of rows (the portable path; DMMA GEMMs, but R is materialised). Until
``benchmarks/gpu_gram.py`` times them (fp64 against fp64-triton, and fp64 again with
``SAP_FAST_GRAM_DMMA=0`` for the FMA tiles), ``auto`` stays as above: the CUDA kernel, now on
tensor cores from sm_80 on; its result is the same Gram either way (the tests hold both tile
paths to the float64 oracle).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._runtime.geometry import conv_padding, pad_mode, padded_size
from . import nvrtc, shift, triton
from .native import native, native_cuda
from .precision import kernel_mode
from .switches import SWITCHES, switch

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the conv layers SAP covers (sap_fast.targets)
KERNEL_CHOICES = SWITCHES["SAP_FAST_GRAM_KERNEL"][0]


def kernel_choice() -> str:
    """``SAP_FAST_GRAM_KERNEL`` (see the module docstring)."""
    return switch("SAP_FAST_GRAM_KERNEL")


def route(device_type: str, dtype: torch.dtype, input_precision: str, *, conv: bool,
          stride_one_spatial: bool = False, shift_pays: bool = False, native_cpu: bool = False,
          native_cuda: bool = False, cupy_ok: bool = False, triton_ok: bool = False,
          choice: str = "auto") -> Optional[str]:
    """Which kernel computes one call's Gram, or None (stream rows on the portable path).

    GPU modes: fp64 (float64 Gram of fp32 inputs) and fp32 go to the CUDA kernel for convs and
    to cuBLAS for linear layers. The CUDA kernel is the CMake-built one (``native_cuda``), else
    its NVRTC build (``cupy_ok``), else Triton; ``choice="cupy"`` prefers the NVRTC build,
    ``choice="triton"`` sends convs and linear layers to Triton, ``choice="shift"`` sends a conv
    to ``"torch-shift"`` where ``shift_pays``. tf32 and bf16 (float32 Gram) go only to Triton,
    which runs them on tensor cores. tf32/bf16 inputs with a float64 Gram, and everything on the
    CPU but the shift kernel, stream rows (rounded as asked). On the CPU, ``choice="triton"``
    with Triton's interpreter running (``triton_ok``) sends every call that Triton serves on a
    GPU to the interpreted kernel: the CPU twin of every GPU mode, for tests and dry runs.
    """
    if device_type == "cpu":
        if choice == "triton" and triton_ok:  # Triton's interpreter, asked for by name
            return "triton" if (input_precision == "fp32" or dtype == torch.float32) else None
        return "shift" if (conv and native_cpu and stride_one_spatial and input_precision == "fp32") else None
    if device_type != "cuda":
        return None
    if input_precision != "fp32":
        return "triton" if (triton_ok and dtype == torch.float32) else None
    if not conv:  # cuBLAS (a full baddbmm) on the streamed rows, or Triton's upper triangle
        return "triton" if (choice == "triton" and triton_ok) else None
    if choice == "triton" and triton_ok:
        return "triton"
    if choice == "shift" and shift_pays:
        return "torch-shift"  # elsewhere, what "auto" picks
    if choice == "cupy" and cupy_ok:
        return "cupy"
    if choice != "triton":  # a "triton" that cannot run streams rows, as before
        if native_cuda:
            return "cuda"
        if cupy_ok:  # the same kernel without the CMake build
            return "cupy"
    return "triton" if triton_ok else None


def _choice_for(x: torch.Tensor) -> str:
    """``SAP_FAST_GRAM_KERNEL``, read for GPU tensors, and on the CPU under Triton's interpreter
    (where ``triton`` runs the interpreted kernels); other CPU calls have one route each."""
    if x.device.type == "cuda" or triton.for_device("gram", x.device.type) is not None:
        return kernel_choice()
    return "auto"


def _route_call(module: nn.Module, x: torch.Tensor, dtype: torch.dtype,
                input_precision: str) -> Optional[str]:
    """:func:`route` for one layer call, its flags read off the call and the installed backends."""
    conv = isinstance(module, CONV_TYPES)
    on_cuda = x.device.type == "cuda"
    choice = _choice_for(x)
    stride_one = conv and all(s == 1 for s in module.stride) and math.prod(module.kernel_size) > 1
    has_native_cuda = on_cuda and native_cuda()
    # cupy is imported (once) only where route could pick it: a GPU conv in fp32 inputs, with no
    # CMake-built CUDA kernel or with SAP_FAST_GRAM_KERNEL=cupy
    cupy_ok = (on_cuda and conv and input_precision == "fp32" and choice != "triton"
               and (choice == "cupy" or not has_native_cuda) and nvrtc.available())
    return route(
        x.device.type, dtype, input_precision, conv=conv, stride_one_spatial=stride_one,
        shift_pays=(choice == "shift" and stride_one and len(module.kernel_size) <= 2
                    and shift.pays(padded_size(module, x), module.kernel_size, module.dilation)),
        native_cpu=native() is not None, native_cuda=has_native_cuda, cupy_ok=cupy_ok,
        triton_ok=triton.for_device("gram", x.device.type) is not None, choice=choice)


def _symmetric_padding(conv: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
    """The input and per-dim zero padding for the kernels (which pad zeros symmetrically):
    other padding modes and asymmetric ``'same'`` padding are applied here instead."""
    pads = conv_padding(conv)
    low, high = pads[0::2][::-1], pads[1::2][::-1]  # per spatial dim, first dim first
    if conv.padding_mode == "zeros" and low == high:
        return x, low
    return F.pad(x, pads, mode=pad_mode(conv)), [0] * len(low)


def gram(module: nn.Module, x: torch.Tensor, dtype: torch.dtype, max_elements: int,
         input_precision: str = "fp32") -> Optional[torch.Tensor]:
    """The Gram ``(groups, d, d)`` in ``dtype`` of one conv or linear call (every patch row of a
    conv input, every row of a linear input) from a kernel that never materialises the rows,
    or None when none serves this call. ``max_elements`` bounds the scratch of the CPU shift
    kernel (it copies whole samples into a zero-margined buffer)."""
    if x.dtype not in (torch.float32, torch.float64):
        return None
    which = _route_call(module, x, dtype, input_precision)
    if which is None:
        return None
    mode = kernel_mode(dtype, input_precision)
    if not isinstance(module, CONV_TYPES):  # Triton: every row of the input, any leading dims
        kernels = triton.for_device("gram", x.device.type)
        return triton.run("gram", lambda: kernels.linear_gram(x.reshape(-1, x.shape[-1]), mode),
                          lambda: None)
    spatial = len(module.kernel_size)
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    x, padding = _symmetric_padding(module, x)
    k, dil, stride = list(module.kernel_size), list(module.dilation), list(module.stride)
    if which == "cuda":
        return torch.ops.sap_fast.conv_gram(x, k, stride, padding, dil, module.groups, dtype)
    if which == "cupy":
        return nvrtc.conv_gram(x, k, stride, padding, dil, module.groups, dtype)
    if which == "triton":  # a kernel that fails to compile here: None, the caller streams rows
        kernels = triton.for_device("gram", x.device.type)
        return triton.run("gram", lambda: kernels.conv_gram(x, k, stride, padding, dil, module.groups, mode),
                          lambda: None)
    if which == "torch-shift":
        return shift.shift_gram(x, k, padding, dil, module.groups, dtype)
    # "shift" (CPU): bound the kernel's zero-margined copy by whole samples
    margined = math.prod(x.shape[2 + i] + 2 * dil[i] * (k[i] - 1) for i in range(spatial))
    step = max(1, max_elements // (margined * x.shape[1]))
    total = None
    for part in x.split(step):
        g = torch.ops.sap_fast.conv_gram_shift(part, k, padding, dil, module.groups, dtype)
        total = g if total is None else total.add_(g)
    return total
