"""What was built and what each stage will use: :func:`backend_info` (also
``python -m sap_fast.info`` and ``sap-fast info``)."""
from __future__ import annotations

from . import gram, native, triton


def backend_info() -> dict:
    """What was built and what each stage will use, per device type.

    Returns a dict: ``native`` (built, cuda, torch it was built against, or why not loaded),
    ``triton`` / ``triton_gram`` (available or why not), ``forced_portable`` and ``stages``
    (stage → device → the kernel that stage uses there).
    """
    module, why = native.load()
    built = dict(module.build_info()) if module is not None else {}
    update_module, update_why = triton.load("update")
    gram_module, gram_why = triton.load("gram")
    forced = native.forced_portable()
    use_native = module is not None and not forced
    use_cuda = use_native and bool(built.get("cuda"))
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
            "cuda": "triton: fused λ-scaled update" if update_module is not None and not forced
                    else "portable: torch matmuls",
        },
    }
    return {
        "native": {"loaded": module is not None, "reason": why, **built},
        "triton": {"loaded": update_module is not None, "reason": update_why},
        "triton_gram": {"loaded": gram_module is not None, "reason": gram_why},
        "forced_portable": forced,
        "stages": stages,
    }


def _cuda_gram_text(use_cuda: bool, use_triton: bool) -> str:
    if not (use_cuda or use_triton):
        return "portable: unfold + GEMM"
    fp = ("native: implicit-im2col Gram kernel for convs" if use_cuda and gram.kernel_choice() != "triton"
          else "triton: implicit-im2col Gram kernel for convs")
    low = ("; tf32/bf16: Triton tensor-core Gram kernels (convs and linear layers)" if use_triton
           else "; tf32/bf16: portable (rounded rows)")
    return fp + "; portable GEMM for linear layers" + low
