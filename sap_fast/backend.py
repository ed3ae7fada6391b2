"""Which backend each stage uses: the native extension ``sap_fast._C``, Triton, or plain torch.

The extension is optional. When it is missing or fails to load (not built, built for another
torch), every stage falls back to its portable torch path and the reason is logged once at debug
level (``logging.getLogger("sap_fast")``). ``SAP_FAST_BACKEND=portable`` forces the portable path
everywhere (for comparisons, or to rule the native kernels out when chasing a problem).
:func:`backend_info` reports what was built and what each stage will use.
"""
from __future__ import annotations

import functools
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
def _load_triton():
    try:
        import triton  # noqa: F401
        from .kernels import project_triton
    except Exception as err:
        why = f"Triton is unavailable ({type(err).__name__}: {err}); using torch matmuls"
        log.debug(why)
        return None, why
    return project_triton, None


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
    forced = _forced_portable()
    use_native = module is not None and not forced
    use_cuda = use_native and bool(built.get("cuda"))
    use_triton = triton_module is not None and not forced
    stages = {
        "accumulate": {
            "cpu": ("native: shift-correlation Gram for stride-1 convs; portable unfold + GEMM "
                    "otherwise" if use_native else "portable: unfold + GEMM"),
            "cuda": ("native: implicit-im2col Gram kernel for convs; portable GEMM for linear "
                     "layers" if use_cuda else "portable: unfold + GEMM"),
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
        "forced_portable": forced,
        "stages": stages,
    }

