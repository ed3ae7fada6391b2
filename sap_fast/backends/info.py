"""What was built and what each stage will use: :func:`backend_info` (also
``python -m sap_fast.info`` and ``sap-fast info``)."""
from __future__ import annotations

from . import batched_linalg, gram, native, nvrtc, triton


def backend_info() -> dict:
    """What was built and what each stage will use, per device type.

    Returns a dict: ``native`` (built, cuda, torch it was built against, or why not loaded),
    ``triton`` / ``triton_gram`` (available or why not; ``compile_failure``: why the kernel stopped
    being used in this process, or None), ``cupy`` (the NVRTC Gram kernel and the
    batched cuSOLVER calls: available or why not, and what each stage uses them for),
    ``forced_portable`` and ``stages`` (stage → device → the kernel that stage uses there).
    """
    module, why = native.load()
    built = dict(module.build_info()) if module is not None else {}
    update_module, update_why = triton.load("update")
    gram_module, gram_why = triton.load("gram")
    # a kernel that failed to compile in this process is no longer used (sap_fast.backends.triton.run)
    update_broken, gram_broken = triton.broken("update"), triton.broken("gram")
    forced = native.forced_portable()
    use_native = module is not None and not forced
    use_cuda = use_native and bool(built.get("cuda"))
    cupy_info = _cupy_info(use_cuda)
    stages = {
        "accumulate": {
            "cpu": ("native: shift-correlation Gram for stride-1 convs; portable unfold + GEMM "
                    "otherwise" if use_native else "portable: unfold + GEMM"),
            "cuda": _cuda_gram_text(use_cuda, gram_module is not None and not forced and not gram_broken,
                                    cupy_info["gram"]["used"]),
        },
        "spectrum": {
            "cpu": "portable: torch.linalg.eigh / svd",
            "cuda": (("cupy: cuSOLVER syevjBatched for n ≤ 32 (SAP_FAST_BATCHED_EIGH=cupy); " if
                      cupy_info["eigh"]["used"] else "")
                     + ("native: cuSOLVER syevd / batched syevj" if use_cuda
                        else "portable: torch.linalg.eigh / svd")),
        },
        "project": {
            "cpu": "portable: torch matmuls",
            "cuda": "triton: fused λ-scaled update" if update_module is not None and not forced
                    and not update_broken else "portable: torch matmuls",
        },
    }
    return {
        "native": {"loaded": module is not None, "reason": why, **built},
        "triton": {"loaded": update_module is not None, "reason": update_why, "compile_failure": update_broken},
        "triton_gram": {"loaded": gram_module is not None, "reason": gram_why, "compile_failure": gram_broken},
        "cupy": cupy_info,
        "forced_portable": forced,
        "stages": stages,
    }


def _cupy_info(use_cuda: bool) -> dict:
    """The cupy backend: whether each part can run here (or why not), and whether each stage
    would use it as the switches stand (``used``, with the reason in ``uses``)."""
    cp, gram_why = nvrtc.load()
    lib, linalg_why = batched_linalg.load()
    choice = gram.kernel_choice()
    gram_used = cp is not None and choice != "triton" and (choice == "cupy" or not use_cuda)
    if cp is None:
        gram_uses = f"not used: {gram_why}"
    elif gram_used:
        gram_uses = ("accumulate: convs on a GPU (fp32 inputs), the CUDA Gram kernel compiled by NVRTC"
                     + (" (SAP_FAST_GRAM_KERNEL=cupy)" if use_cuda else " (no CMake-built CUDA kernel)"))
    else:
        gram_uses = (f"not used: SAP_FAST_GRAM_KERNEL={choice}" if choice == "triton" else
                     "not used: the CMake-built CUDA kernel serves convs (SAP_FAST_GRAM_KERNEL=cupy "
                     "selects this one)")

    def linalg(variable: str, choice: str, call: str, stage: str, what: str) -> dict:
        used = lib is not None and choice == "cupy"
        if used:
            uses = f"{stage}: {what}, cuSOLVER {call} through cupy ({variable}=cupy)"
        elif choice == "cupy":
            uses = f"not used: {linalg_why}"
        else:
            uses = (f"not used: {variable}=auto (torch until a GPU measurement shows {call} wins; "
                    f"{variable}=cupy selects it)")
        return {"stage": stage, "choice": choice, "used": used, "uses": uses}

    return {
        "gram": {"stage": "accumulate", "loaded": cp is not None, "reason": gram_why,
                 "nvrtc": nvrtc.nvrtc_version(), "used": gram_used, "uses": gram_uses},
        "cusolver": {"loaded": lib is not None, "reason": linalg_why},
        "eigh": linalg("SAP_FAST_BATCHED_EIGH", batched_linalg.eigh_choice(), "syevjBatched",
                       "spectrum", "CUDA Gram batches with n ≤ 32"),
        "cholesky": linalg("SAP_FAST_BATCHED_CHOLESKY", batched_linalg.cholesky_choice(), "potrfBatched",
                           "solve", "CUDA batches of the Cholesky route (solver='cholesky')"),
    }


def _cuda_gram_text(use_cuda: bool, use_triton: bool, use_cupy: bool = False) -> str:
    if not (use_cuda or use_triton or use_cupy):
        return "portable: unfold + GEMM"
    choice = gram.kernel_choice()
    if use_cupy:
        fp = "cupy: implicit-im2col Gram kernel for convs (CUDA source compiled by NVRTC)"
    elif use_cuda and choice != "triton":
        fp = "native: implicit-im2col Gram kernel for convs"
    elif use_triton:
        fp = "triton: implicit-im2col Gram kernel for convs"
    else:
        fp = "portable: unfold + GEMM for convs"
    low = ("; tf32/bf16: Triton tensor-core Gram kernels (convs and linear layers)" if use_triton
           else "; tf32/bf16: portable (rounded rows)")
    return fp + "; portable GEMM for linear layers" + low
