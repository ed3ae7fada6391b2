"""Which backend each stage uses: the native extension ``sap_fast._C``, Triton, or plain torch.

The extension is optional. When it is missing or fails to load (not built, built for another
torch), every stage falls back to its portable torch path and the reason is logged once at debug
level (``logging.getLogger("sap_fast")``). ``SAP_FAST_BACKEND=portable`` forces the portable path
everywhere (for comparisons, or to rule the native kernels out when chasing a problem).
:func:`backend_info` reports what was built and what each stage will use.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Optional

import torch

log = logging.getLogger("sap_fast")
BACKENDS = ("auto", "portable")


def _forced_portable() -> bool:
    choice = os.environ.get("SAP_FAST_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"SAP_FAST_BACKEND={choice!r}: use one of {BACKENDS}")
    return choice == "portable"


@functools.lru_cache(maxsize=None)
def _load_native():
    """(module, None) or (None, why it is unavailable); tried once per process."""
    try:
        from . import _C  # registers torch.ops.sap_fast.*
        from . import ops  # noqa: F401  (their shape functions)
    except Exception as err:  # ImportError, or an undefined symbol from a torch mismatch
        why = (f"the native extension sap_fast._C is unavailable ({type(err).__name__}: {err}); "
               "using the portable torch path (rebuild: pip install --no-build-isolation -e .)")
        log.debug(why)
        return None, why
    return _C, None


@functools.lru_cache(maxsize=None)
def _load_kernels(name: str, fallback: str):
    """(the Triton kernel module ``sap_fast.kernels.<name>``, None) or (None, why not)."""
    try:
        import triton  # noqa: F401
        return importlib.import_module(f"{__package__}.kernels.{name}"), None
    except Exception as err:
        why = f"Triton is unavailable ({type(err).__name__}: {err}); {fallback}"
        log.debug(why)
        return None, why


def _load_triton():
    return _load_kernels("project_triton", "using torch matmuls")


def _load_triton_gram():
    return _load_kernels("gram_triton", "no Triton Gram kernel")


GRAM_KERNELS = ("auto", "cuda", "triton", "shift")


def gram_kernel_choice() -> str:
    """``SAP_FAST_GRAM_KERNEL``: ``auto`` (default: CUDA kernel for convs, cuBLAS for linear
    layers), ``cuda``, ``triton`` (Triton for both), or ``shift`` (stride-1 1-D/2-D convs by the
    shift-correlation form in cuDNN weight-gradient calls, :mod:`sap_fast.shift`, where it does
    fewer multiply-adds) for fp32/fp64 Grams on a GPU; the benchmarks compare them. tf32/bf16
    exist only as Triton kernels."""
    choice = os.environ.get("SAP_FAST_GRAM_KERNEL", "auto").strip().lower() or "auto"
    if choice not in GRAM_KERNELS:
        raise ValueError(f"SAP_FAST_GRAM_KERNEL={choice!r}: use one of {GRAM_KERNELS}")
    return choice


def gram_route(device_type: str, dtype: torch.dtype, input_precision: str, *, conv: bool,
               stride_one_spatial: bool = False, shift_pays: bool = False, native_cpu: bool = False,
               native_cuda: bool = False, triton_ok: bool = False, choice: str = "auto") -> Optional[str]:
    """Which kernel computes one call's Gram without materialising its rows (pure: tested alone).

    Returns ``"shift"`` (C++ shift-correlation, CPU stride-1 convs with a kernel > 1),
    ``"torch-shift"`` (the same form in torch weight-gradient convs, GPU, ``choice="shift"``,
    where ``shift_pays``: :func:`sap_fast.shift.pays` for a stride-1 1-D/2-D conv),
    ``"cuda"`` (implicit-im2col CUDA kernel, convs), ``"triton"`` (Triton kernel, convs; and
    linear layers in the tf32/bf16 modes) or None (stream rows on the portable path).

    GPU modes: fp64 (float64 Gram of fp32 inputs) and fp32 go to the CUDA kernel for convs and
    to cuBLAS for linear layers; ``choice="triton"`` sends both to Triton (which computes only
    the upper triangle: half of cuBLAS's full product for ViT's linear layers), as does a conv
    on an extension without CUDA kernels. tf32 and bf16 (float32 Gram) go only to Triton, which
    runs them on tensor cores. tf32/bf16 inputs with a
    float64 Gram, and everything on CPU but the shift kernel, stream rows (rounded as asked).
    """
    if device_type == "cpu":
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
    if native_cuda and choice != "triton":
        return "cuda"
    return "triton" if triton_ok else None


def triton_gram():
    """The Triton Gram module when it can run compiled (a GPU), else None."""
    if _forced_portable() or not torch.cuda.is_available():
        return None
    return _load_triton_gram()[0]


def native() -> Optional[object]:
    """The loaded ``sap_fast._C`` module, or None (forced portable, missing, or failed)."""
    if _forced_portable():
        return None
    return _load_native()[0]


def native_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    module = native()
    return module is not None and bool(module.build_info()["cuda"])


def triton_update():
    """The Triton update module when it can run compiled (CUDA tensors), else None."""
    if _forced_portable() or not torch.cuda.is_available():
        return None
    return _load_triton()[0]


def backend_info() -> dict:
    """What was built and what each stage will use, per device type.

    Returns a dict: ``native`` (built, cuda, torch it was built against, or why not loaded),
    ``triton`` (available or why not), ``forced_portable`` and ``stages`` (stage → device →
    the kernel that stage uses there).
    """
    module, why = _load_native()
    built = dict(module.build_info()) if module is not None else {}
    triton_module, triton_why = _load_triton()
    gram_module, gram_why = _load_triton_gram()
    forced = _forced_portable()
    use_native = module is not None and not forced
    use_cuda = use_native and bool(built.get("cuda"))
    use_triton = triton_module is not None and not forced
    stages = {
        "accumulate": {
            "cpu": ("native: shift-correlation Gram for stride-1 convs; portable unfold + GEMM "
                    "otherwise" if use_native else "portable: unfold + GEMM"),
            "cuda": _cuda_gram_text(use_cuda, gram_module is not None and not forced),
        },
        "spectrum": {
            "cpu": "portable: torch.linalg.eigh / svd",
            "cuda": "native: cuSOLVER syevd / batched syevj" if use_cuda
                    else "portable: torch.linalg.eigh / svd",
        },
        "project": {
            "cpu": "portable: torch matmuls",
            "cuda": "triton: fused λ-scaled update" if use_triton else "portable: torch matmuls",
        },
    }
    return {
        "native": {"loaded": module is not None, "reason": why, **built},
        "triton": {"loaded": triton_module is not None, "reason": triton_why},
        "triton_gram": {"loaded": gram_module is not None, "reason": gram_why},
        "forced_portable": forced,
        "stages": stages,
    }


def _cuda_gram_text(use_cuda: bool, use_triton: bool) -> str:
    if not (use_cuda or use_triton):
        return "portable: unfold + GEMM"
    fp = ("native: implicit-im2col Gram kernel for convs" if use_cuda and gram_kernel_choice() != "triton"
          else "triton: implicit-im2col Gram kernel for convs")
    low = ("; tf32/bf16: Triton tensor-core Gram kernels (convs and linear layers)" if use_triton
           else "; tf32/bf16: portable (rounded rows)")
    return fp + "; portable GEMM for linear layers" + low
