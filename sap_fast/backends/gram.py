"""The Gram of one layer call without its rows: the gram stage's implementations, its chooser,
and the call.

:func:`gram` is the accumulate stage's one dispatch point. It takes the call's input (a conv's
input padded as the kernels expect it, with its :class:`~.geometry.ConvGeometry`; or a linear
layer's input and no geometry), reads the switches and the installed backends into a
:class:`GramCall`, lets :data:`GRAM` choose (:func:`.dispatch.choose`) and runs the choice. The
last implementation, ``"rows"``, returns None: the caller streams rows on the portable path.
:func:`route` is the same choice on plain flags (tested by itself).

Implementations, in priority order:

- ``"cuda"``: the implicit-im2col CUDA kernel (``torch.ops.sap_fast.conv_gram``), convs on a GPU;
  a float64 Gram runs its product on the FP64 tensor cores from sm_80 on (DMMA tiles,
  ``SAP_FAST_GRAM_DMMA=0`` keeps the FMA tiles), the FMA tiles elsewhere;
- ``"cupy"``: the same CUDA kernel compiled at run time by NVRTC through cupy (:mod:`.nvrtc`),
  convs on a GPU whose install has no CMake-built CUDA kernels (torch from a wheel, no toolkit);
- ``"triton"``: the Triton implicit-im2col kernel (:mod:`.triton.gram`), convs, and linear
  layers as 1×1 convs; the only kernels of the tf32/bf16 modes;
- ``"torch-shift"``: the shift-correlation form in torch weight-gradient convs (:mod:`.shift`,
  cuDNN on a GPU);
- ``"shift"``: the C++ shift-correlation Gram (``torch.ops.sap_fast.conv_gram_shift``), for
  stride-1 convs with a kernel larger than 1 on the CPU;
- ``"direct"``: the C++ implicit-im2col Gram (``torch.ops.sap_fast.conv_gram`` on the CPU), for
  strided convs with a kernel larger than 1, float32 inputs and a float64 Gram: there it beats
  the streamed rows in time (1.03-1.31x on ResNet-50's strided convs) and in peak memory
  (1.1-3.7x less); 1×1 convs and float32 Grams stream rows, where the rows' GEMM is faster
  (``benchmarks/cpu_conv_gram.py``);
- ``"triton-interpreter"``: the Triton kernels run by Triton's interpreter on the CPU
  (``TRITON_INTERPRET=1`` and ``SAP_FAST_GRAM_KERNEL=triton``): the CPU twin of every GPU mode,
  for tests and dry runs;
- ``"rows"``: None; the caller streams rows (unfold + GEMM on the portable path).

``SAP_FAST_GRAM_KERNEL`` (GPU, fp32/fp64 Grams): ``auto`` (default: the CUDA kernel for convs,
CMake-built if present, else through NVRTC if cupy runs, else Triton; cuBLAS on the streamed
rows for linear layers), ``cuda``, ``cupy`` (the NVRTC build of the CUDA kernel even where the
CMake-built one is present), ``triton`` (Triton for both: it computes only the upper triangle,
half of cuBLAS's full product for ViT's linear layers), or ``shift`` (stride-1 1-D/2-D convs by
:mod:`.shift` where it does fewer multiply-adds). A choice that cannot run here falls back to
what ``auto`` picks (``triton`` to the portable path). A float64 conv Gram on a GPU goes to the
CUDA kernel (on the FP64 tensor cores from sm_80 on) by default; ``SAP_FAST_GRAM_KERNEL=triton``
selects Triton's fp64 kernel and ``SAP_FAST_BACKEND=portable`` cuBLAS on unfolded chunks of
rows; ``benchmarks/gpu_gram.py`` times the three. The tests hold every one of them to the
float64 oracle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from . import conv_launch, dispatch, nvrtc, shift, triton
from .dispatch import Implementation, Stage
from .geometry import ConvGeometry
from .native import why_not as native_why_not
from .precision import kernel_mode
from .switches import SWITCHES, switch

__all__ = ["GRAM", "GramCall", "KERNEL_CHOICES", "gram", "gram_call", "kernel_choice", "route"]

KERNEL_CHOICES = SWITCHES["SAP_FAST_GRAM_KERNEL"][0]
_KERNEL_DTYPES = (torch.float32, torch.float64)


def kernel_choice() -> str:
    """``SAP_FAST_GRAM_KERNEL`` (see the module docstring)."""
    return switch("SAP_FAST_GRAM_KERNEL")


# -- what the chooser reads -----------------------------------------------------------------------

class _Installed:
    """The backends installed here, each probed when first asked (cupy only where a choice
    reaches it): why each cannot run, or None."""

    def native_cpu(self) -> Optional[str]:
        return native_why_not()

    def native_cuda(self) -> Optional[str]:
        return native_why_not(cuda=True)

    def cupy(self) -> Optional[str]:
        return nvrtc.load()[1]

    def triton(self, device_type: str) -> Optional[str]:
        return triton.why_not("gram", device_type)


class _Flags(_Installed):
    """The backends as plain flags (:func:`route`)."""

    def __init__(self, native_cpu: bool, native_cuda: bool, cupy_ok: bool, triton_ok: bool):
        self.flags = dict(native_cpu=native_cpu, native_cuda=native_cuda, cupy=cupy_ok, triton=triton_ok)

    def _why(self, name: str, what: str) -> Optional[str]:
        return None if self.flags[name] else f"{what} cannot run here"

    def native_cpu(self):
        return self._why("native_cpu", "the native extension")

    def native_cuda(self):
        return self._why("native_cuda", "the CMake-built CUDA kernel")

    def cupy(self):
        return self._why("cupy", "cupy (NVRTC)")

    def triton(self, device_type):
        return self._why("triton", "Triton")


@dataclass(frozen=True)
class GramCall:
    """One call of the gram stage, as its chooser reads it.

    ``device_type``, ``dtype`` (the Gram's), ``input_precision``; ``conv`` (False: a linear
    layer); ``stride_one`` (a stride-1 conv with a kernel larger than 1); ``strided`` (a conv
    with a stride above 1 and a kernel larger than 1); ``shift_pays``
    (``SAP_FAST_GRAM_KERNEL=shift`` and :func:`.shift.pays` for a 1-D/2-D stride-1 conv);
    ``choice`` (``SAP_FAST_GRAM_KERNEL``, read where a kernel it selects can run); ``installed``
    (the backends: why each cannot run); and for a real call the tensors: ``x``, ``geometry``,
    ``max_elements`` (the CPU shift kernel's scratch bound)."""
    device_type: str
    dtype: torch.dtype
    input_precision: str
    conv: bool
    stride_one: bool = False
    strided: bool = False
    shift_pays: bool = False
    choice: str = "auto"
    installed: _Installed = _Installed()
    x: Optional[torch.Tensor] = None
    geometry: Optional[ConvGeometry] = None
    max_elements: int = 1 << 62
    x_dtype: torch.dtype = torch.float32

    @property
    def mode(self) -> str:
        return kernel_mode(self.dtype, self.input_precision)

    def describe(self) -> str:
        """One line: the call's device, layer kind and modes."""
        if self.geometry is not None:
            g = self.geometry
            k = "×".join(str(v) for v in g.dims["kernel"])
            s = "×".join(str(v) for v in g.dims["stride"])
            layer = f"{k} conv, stride {s}" + (f", {g.groups} groups" if g.groups > 1 else "")
        else:
            layer = "conv" if self.conv else "linear layer"
        return (f"{self.device_type} {layer}, {str(self.x_dtype).replace('torch.', '')} inputs, "
                f"{self.input_precision} precision, {str(self.dtype).replace('torch.', '')} Gram")


def _choice_for(device_type: str) -> str:
    """``SAP_FAST_GRAM_KERNEL``, read for GPU tensors, and on the CPU under Triton's interpreter
    (where ``triton`` runs the interpreted kernels); other CPU calls have one route each."""
    if device_type == "cuda" or triton.why_not("gram", device_type) is None:
        return kernel_choice()
    return "auto"


def gram_call(x: torch.Tensor, geometry: Optional[ConvGeometry], dtype: torch.dtype,
              input_precision: str = "fp32", max_elements: int = 1 << 62,
              device_type: Optional[str] = None) -> GramCall:
    """The :class:`GramCall` of one layer call: ``x`` and ``geometry`` as :func:`gram` takes them
    (``x`` may be a ``meta`` tensor with ``device_type`` given: :func:`sap_fast.backend_info`
    asks the chooser that way)."""
    device_type = device_type or x.device.type
    choice = _choice_for(device_type)
    conv = geometry is not None
    stride_one = conv and all(s == 1 for s in geometry.stride) and geometry.taps > 1
    strided = conv and not stride_one and geometry.taps > 1
    pays = (choice == "shift" and stride_one and geometry.spatial <= 2
            and shift.pays([geometry.in_size[i] + 2 * geometry.padding[i] for i in range(3)][3 - geometry.spatial:],
                           geometry.dims["kernel"], geometry.dims["dilation"]))
    return GramCall(device_type, dtype, input_precision, conv=conv, stride_one=stride_one,
                    strided=strided, shift_pays=pays,
                    choice=choice, x=x, geometry=geometry, max_elements=max_elements, x_dtype=x.dtype)


# -- the implementations' reasons ------------------------------------------------------------------

def _gpu_exact(call: GramCall, what: str) -> List[str]:
    """Reasons shared by the fp32/fp64 GPU conv kernels (cuda, cupy, torch-shift)."""
    if call.device_type != "cuda":
        return [f"{what} runs on CUDA tensors, not {call.device_type}"]
    out = []
    if call.input_precision != "fp32":
        out.append(f"input_precision={call.input_precision} runs only as Triton kernels")
    if not call.conv:
        out.append("linear layers: cuBLAS on the streamed rows (SAP_FAST_GRAM_KERNEL=triton selects "
                   "Triton's upper triangle)")
    if call.x_dtype not in _KERNEL_DTYPES:
        out.append(f"{call.x_dtype} inputs: the kernels read float32/float64")
    return out


def _others_selected(call: GramCall, me: str) -> List[str]:
    """The switch choices that send a GPU conv to a kernel after ``me`` in priority."""
    out = []
    if call.choice == "triton" and me != "triton":
        out.append("SAP_FAST_GRAM_KERNEL=triton selects Triton")
    if call.choice == "shift" and call.shift_pays and me != "torch-shift":
        out.append("SAP_FAST_GRAM_KERNEL=shift selects the torch shift form, which pays for this geometry")
    return out


def _cuda_kernel_reasons(call: GramCall, me: str, what: str) -> List[str]:
    """Reasons of the CUDA conv Gram kernel, CMake-built (``me="cuda"``) or NVRTC-built (``"cupy"``)."""
    out = _gpu_exact(call, what)
    if call.device_type == "cuda":
        out += _others_selected(call, me)
    if out:
        return out
    why = call.installed.native_cuda() if me == "cuda" else call.installed.cupy()
    if why:
        return [why]
    if me == "cuda" and call.choice == "cupy" and call.installed.cupy() is None:
        return ["SAP_FAST_GRAM_KERNEL=cupy selects the NVRTC build"]
    limits = conv_launch.cuda_limits(call.geometry) if call.geometry is not None else None
    return [limits] if limits else []


def _cuda_reasons(call: GramCall) -> List[str]:
    return _cuda_kernel_reasons(call, "cuda", "the CMake-built CUDA kernel")


def _cupy_reasons(call: GramCall) -> List[str]:
    return _cuda_kernel_reasons(call, "cupy", "the NVRTC build of the CUDA kernel")


def _triton_modes(call: GramCall) -> List[str]:
    if call.input_precision != "fp32" and call.dtype != torch.float32:
        return [f"a float64 Gram of {call.input_precision}-rounded inputs has no Triton kernel (the "
                "rounded rows are summed in float64)"]
    if call.x_dtype not in _KERNEL_DTYPES:
        return [f"{call.x_dtype} inputs: the kernels read float32/float64"]
    return []


def _triton_reasons(call: GramCall) -> List[str]:
    if call.device_type != "cuda":
        return [f"the compiled Triton kernels run on CUDA tensors, not {call.device_type}"]
    out = _triton_modes(call)
    if call.input_precision == "fp32":
        if not call.conv and call.choice != "triton":
            out.append("linear layers: cuBLAS on the streamed rows (SAP_FAST_GRAM_KERNEL=triton selects "
                       "Triton's upper triangle)")
        out += _others_selected(call, "triton")
    if out:
        return out
    why = call.installed.triton("cuda")
    return [why] if why else []


def _torch_shift_reasons(call: GramCall) -> List[str]:
    out = _gpu_exact(call, "the torch shift form")
    if out and call.device_type != "cuda":
        return out
    if call.choice != "shift":
        out.append("SAP_FAST_GRAM_KERNEL=shift selects it")
    elif not call.shift_pays:
        out.append("not a 1-D/2-D stride-1 conv where the shift form does fewer multiply-adds")
    return out


def _interpreter_asked(call: GramCall) -> bool:
    return call.device_type == "cpu" and call.choice == "triton" and call.installed.triton("cpu") is None


def _cpu_native_reasons(call: GramCall, what: str, layer: Optional[str], dtypes: Optional[str]) -> List[str]:
    """Reasons shared by the C++ CPU kernels (shift, direct): ``layer`` and ``dtypes`` are why
    this call's layer or dtypes are not theirs (None: they are)."""
    if call.device_type != "cpu":
        return [f"the C++ {what} kernel runs on CPU tensors, not {call.device_type}"]
    out = ["linear layers: a GEMM on the streamed rows"] if not call.conv else [layer] if layer else []
    if call.input_precision != "fp32":
        out.append(f"input_precision={call.input_precision}: the rounded rows stream")
    if dtypes:
        out.append(dtypes)
    if out:
        return out
    why = call.installed.native_cpu()
    if why:
        return [why]
    if _interpreter_asked(call):
        return ["SAP_FAST_GRAM_KERNEL=triton selects Triton's interpreter (TRITON_INTERPRET=1)"]
    return []


def _shift_reasons(call: GramCall) -> List[str]:
    return _cpu_native_reasons(
        call, "shift", None if call.stride_one else "not a stride-1 conv with a kernel larger than 1",
        None if call.x_dtype in _KERNEL_DTYPES else f"{call.x_dtype} inputs: the kernels read float32/float64")


def _direct_reasons(call: GramCall) -> List[str]:
    return _cpu_native_reasons(
        call, "direct",
        None if call.strided else ("not a strided conv with a kernel larger than 1 (there the rows' GEMM "
                                   "or the shift kernel is faster)"),
        None if (call.x_dtype, call.dtype) == (torch.float32, torch.float64) else
        "it serves float32 inputs into a float64 Gram (elsewhere the rows' GEMM is faster)")


def _interpreter_reasons(call: GramCall) -> List[str]:
    if call.device_type != "cpu":
        return [f"Triton's interpreter serves CPU tensors, not {call.device_type}"]
    out = []
    if call.choice != "triton":
        out.append("SAP_FAST_GRAM_KERNEL=triton selects it (with TRITON_INTERPRET=1)")
    out += _triton_modes(call)
    if out:
        return out
    why = call.installed.triton("cpu")
    return [why] if why else []


# -- the implementations' calls --------------------------------------------------------------------

def _dims(call: GramCall):
    dims = call.geometry.dims
    return dims["kernel"], dims["stride"], dims["padding"], dims["dilation"], call.geometry.groups


def _run_op(call: GramCall) -> torch.Tensor:
    """``torch.ops.sap_fast.conv_gram``: its CUDA or C++ CPU kernel, by the device of ``x``."""
    k, s, p, dil, groups = _dims(call)
    return torch.ops.sap_fast.conv_gram(call.x, k, s, p, dil, groups, call.dtype)


def _run_cupy(call: GramCall) -> torch.Tensor:
    k, s, p, dil, groups = _dims(call)
    return nvrtc.conv_gram(call.x, k, s, p, dil, groups, call.dtype)


def _run_triton(call: GramCall) -> torch.Tensor:
    kernels = triton.load("gram")[0]
    if call.geometry is None:  # every row of the input, any leading dims
        return kernels.linear_gram(call.x.reshape(-1, call.x.shape[-1]), call.mode)
    return kernels.conv_gram(call.x, geometry=call.geometry, precision=call.mode)


def _run_torch_shift(call: GramCall) -> Optional[torch.Tensor]:
    return shift.shift_gram(call.x, geometry=call.geometry, dtype=call.dtype)


def _run_shift(call: GramCall) -> torch.Tensor:
    """The C++ shift kernel, in whole samples bounded by its zero-margined copy."""
    k, _, p, dil, groups = _dims(call)
    x, spatial = call.x, call.geometry.spatial
    margined = math.prod(x.shape[2 + i] + 2 * dil[i] * (k[i] - 1) for i in range(spatial))
    step = max(1, call.max_elements // (margined * x.shape[1]))
    total = None
    for part in x.split(step):
        g = torch.ops.sap_fast.conv_gram_shift(part, k, p, dil, groups, call.dtype)
        total = g if total is None else total.add_(g)
    return total


GRAM = Stage("gram", (
    Implementation("cuda", "native: implicit-im2col CUDA Gram kernel", _cuda_reasons, _run_op),
    Implementation("cupy", "cupy: implicit-im2col Gram kernel (CUDA source compiled by NVRTC)",
                   _cupy_reasons, _run_cupy),
    Implementation("triton", "triton: implicit-im2col Gram kernel", _triton_reasons, _run_triton,
                   triton_kernel="gram"),
    Implementation("torch-shift", "torch: shift-correlation Gram in weight-gradient convs",
                   _torch_shift_reasons, _run_torch_shift),
    Implementation("shift", "native: shift-correlation Gram (C++)", _shift_reasons, _run_shift),
    Implementation("direct", "native: implicit-im2col Gram (C++)", _direct_reasons, _run_op),
    Implementation("triton-interpreter", "triton: implicit-im2col Gram kernel in Triton's interpreter",
                   _interpreter_reasons, _run_triton, triton_kernel="gram"),
    Implementation("rows", "portable: streamed rows (unfold + GEMM)", lambda call: [], lambda call: None),
))

_ROUTE_NAMES = {"rows": None, "triton-interpreter": "triton"}


def route(device_type: str, dtype: torch.dtype, input_precision: str, *, conv: bool,
          stride_one_spatial: bool = False, strided: bool = False, shift_pays: bool = False,
          native_cpu: bool = False,
          native_cuda: bool = False, cupy_ok: bool = False, triton_ok: bool = False,
          choice: str = "auto") -> Optional[str]:
    """The chooser of :data:`GRAM` on plain flags: which kernel computes one call's Gram
    (``"triton"`` for the interpreted kernels too), or None (stream rows on the portable path).

    GPU modes: fp64 (float64 Gram of fp32 inputs) and fp32 go to the CUDA kernel for convs and
    to cuBLAS for linear layers. The CUDA kernel is the CMake-built one (``native_cuda``), else
    its NVRTC build (``cupy_ok``), else Triton; ``choice="cupy"`` prefers the NVRTC build,
    ``choice="triton"`` sends convs and linear layers to Triton, ``choice="shift"`` sends a conv
    to ``"torch-shift"`` where ``shift_pays``. tf32 and bf16 (float32 Gram) go only to Triton,
    which runs them on tensor cores. tf32/bf16 inputs with a float64 Gram, and everything on the
    CPU but the shift kernel and the direct kernel (``strided`` convs, float32 inputs into a
    float64 Gram), stream rows (rounded as asked). On the CPU, ``choice="triton"``
    with Triton's interpreter running (``triton_ok``) sends every call that Triton serves on a
    GPU to the interpreted kernel: the CPU twin of every GPU mode, for tests and dry runs.
    """
    call = GramCall(device_type, dtype, input_precision, conv=conv, stride_one=stride_one_spatial,
                    strided=strided, shift_pays=shift_pays, choice=choice,
                    installed=_Flags(native_cpu, native_cuda, cupy_ok, triton_ok))
    name = dispatch.choose(GRAM, call)[0].name
    return _ROUTE_NAMES.get(name, name)


def gram(x: torch.Tensor, geometry: Optional[ConvGeometry], dtype: torch.dtype, max_elements: int,
         input_precision: str = "fp32") -> Optional[torch.Tensor]:
    """The Gram ``(groups, d, d)`` in ``dtype`` of one conv or linear call (every patch row of a
    conv input, every row of a linear input) from a kernel that never materialises the rows,
    or None when none serves this call (the caller streams rows).

    ``x``: a conv's input ``(N, C, *spatial)`` padded as the kernels read it (zeros, symmetric:
    ``geometry.padding``), with its checked ``geometry`` (:func:`~.geometry.conv_geometry`); or a
    linear layer's input (any leading dims) and ``geometry=None``. ``max_elements`` bounds the
    scratch of the CPU shift kernel (it copies whole samples into a zero-margined buffer)."""
    return dispatch.call(GRAM, gram_call(x, geometry, dtype, input_precision, max_elements))
