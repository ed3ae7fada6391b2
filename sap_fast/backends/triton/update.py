"""Triton kernel for SAP's per-α weight update, and its plain-torch twin.

For one layer with weight ``W`` ``(groups, out, d)``, an eigenbasis ``U`` ``(groups, d, r)`` of its
input Gram with eigenvalues ``e`` ``(groups, r)`` (≥ 0, descending) and ``wu = W U``
``(groups, out, r)`` (computed once per layer by the caller and reused for every α)::

    s = e / Σe                     per group (s = 0 when Σe = 0)
    λ = α s / ((α − 1) s + 1)
    Ŵ = W U diag(λ) Uᵀ

A full basis (``r == d``) uses the careful form ``Ŵ = W − wu diag(1 − λ) Uᵀ`` with
``1 − λ = (1 − s) / ((α − 1) s + 1)``: at large α most λ are ≈ 1, so ``1 − λ`` computed as a
difference keeps only λ's absolute accuracy, while the quotient is accurate relative to its own
(small) size, and so is the correction ``wu diag(1 − λ) Uᵀ`` before it is subtracted. A thin
basis (``r < d``; directions outside it get λ = 0) uses ``Ŵ = wu diag(λ) Uᵀ``.

``_scaled_update_kernel`` writes one ``BLOCK_M × BLOCK_N`` tile of ``Ŵ`` for one group: it walks r
in ``BLOCK_K`` steps, forms the coefficients (λ or 1 − λ) in registers from ``e`` and ``Σe`` (no λ
tensor is materialised), scales the ``wu`` tile's columns and accumulates ``tl.dot`` with the
``Uᵀ`` tile. On CPU it runs only under ``TRITON_INTERPRET=1`` (set before this module is imported);
``scaled_update_reference`` is the torch oracle.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._runtime.checks import alpha as check_alpha
from ..switches import switch
from . import Launch

__all__ = ["CONFIGS", "DEFAULT_CONFIG", "interpreted", "autotuning", "scaled_update",
           "scaled_update_launches", "scaled_update_reference"]

_DTYPES = (torch.float32, torch.float64)


@triton.jit
def _scaled_update_kernel(
    out_ptr, w_ptr, wu_ptr, u_ptr, e_ptr, total_ptr, alpha_ptr,
    M, N, R,
    out_g_stride, out_m_stride, out_n_stride,
    w_g_stride, w_m_stride, w_n_stride,
    wu_g_stride, wu_m_stride, wu_k_stride,
    u_g_stride, u_n_stride, u_k_stride,
    e_g_stride, e_k_stride,
    FULL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[g, m, n] = Σ_k wu[g, m, k] c_k U[g, n, k]`` (+ ``W − …`` when FULL), with
    ``c = 1 − λ`` when FULL else ``c = λ``; M = out, N = d, R = r."""
    # int64 ids so group/row offsets cannot overflow int32 on large weights
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # α comes as a tensor: a Python float argument would be an fp32 scalar, too coarse for fp64
    alpha = tl.load(alpha_ptr)
    total = tl.load(total_ptr + g)
    # no energy in this group -> s = 0 (the where also keeps 0/0 out of the computation)
    has_energy = total > 0
    total = tl.where(has_energy, total, 1.0)

    wu_ptrs = wu_ptr + g * wu_g_stride + offs_m[:, None] * wu_m_stride
    # Uᵀ tile: element (k, n) is U[g, n, k]
    u_ptrs = u_ptr + g * u_g_stride + offs_n[None, :] * u_n_stride
    e_ptrs = e_ptr + g * e_g_stride

    # tl.full, not tl.zeros: a builtin, so this kernel also interprets when triton itself was
    # imported before TRITON_INTERPRET=1 (tl.zeros is itself a @jit function, decorated at that import)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=wu_ptr.dtype.element_ty)
    for k0 in range(0, R, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < R
        a = tl.load(wu_ptrs + k[None, :] * wu_k_stride, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(u_ptrs + k[:, None] * u_k_stride, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        e = tl.load(e_ptrs + k * e_k_stride, mask=mask_k, other=0.0)
        s = tl.where(has_energy, e / total, 0.0)
        denom = (alpha - 1.0) * s + 1.0
        if FULL:
            coef = (1.0 - s) / denom  # = 1 − λ without the cancellation of 1 − λ
        else:
            coef = alpha * s / denom  # = λ
        # ieee: TF32 (NVIDIA's fp32 default) keeps 10 mantissa bits, ~1e-3 relative error in the
        # update instead of fp32's ~1e-7; for fp64 operands the argument changes nothing
        acc = tl.dot(a * coef[None, :], b, acc, input_precision="ieee", out_dtype=acc.dtype)

    out_mask = mask_m[:, None] & mask_n[None, :]
    if FULL:
        w = tl.load(w_ptr + g * w_g_stride + offs_m[:, None] * w_m_stride + offs_n[None, :] * w_n_stride,
                    mask=out_mask, other=0.0)
        acc = w - acc
    tl.store(out_ptr + g * out_g_stride + offs_m[:, None] * out_m_stride + offs_n[None, :] * out_n_stride,
             acc, mask=out_mask)


def interpreted() -> bool:
    """Whether the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_scaled_update_kernel, triton.runtime.JITFunction)


def _check(weight, wu, basis, eigvals, alpha, full) -> Tuple[float, bool]:
    """Validate the arguments of both implementations; returns ``(alpha, full)``."""
    names = ("weight", "wu", "basis", "eigvals")
    tensors = (weight, wu, basis, eigvals)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_update: {name} must be a tensor, got {type(t).__name__}")
    for name, t, ndim in zip(names, tensors, (3, 3, 3, 2)):
        if t.dim() != ndim:
            raise ValueError(f"scaled_update: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    groups, out, d = weight.shape
    r = basis.shape[-1]
    if basis.shape[:2] != (groups, d):
        raise ValueError(f"scaled_update: basis must be (groups, d, r) = ({groups}, {d}, r) for weight "
                         f"{tuple(weight.shape)}, got {tuple(basis.shape)}")
    if r > d:
        raise ValueError(f"scaled_update: basis has r={r} columns but d={d} rows; r must be <= d")
    if wu.shape != (groups, out, r):
        raise ValueError(f"scaled_update: wu must be weight @ basis, shape {(groups, out, r)}, "
                         f"got {tuple(wu.shape)}")
    if eigvals.shape != (groups, r):
        raise ValueError(f"scaled_update: eigvals must be (groups, r) = {(groups, r)}, "
                         f"got {tuple(eigvals.shape)}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"scaled_update: dtype must be float32 or float64, got {weight.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != weight.dtype:
            raise ValueError(f"scaled_update: {name} is {t.dtype} but weight is {weight.dtype}")
        if t.device != weight.device:
            raise ValueError(f"scaled_update: {name} is on {t.device} but weight is on {weight.device}")
    alpha = check_alpha(alpha)
    if full is None:
        full = r == d
    elif full and r != d:
        raise ValueError(f"scaled_update: full=True needs a square basis (r == d), got r={r}, d={d}")
    return alpha, bool(full)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the autotune space on a GPU. Tiles of ≥ 16
# (tl.dot's minimum). Each one compiles for sm_90 without register spills in fp32 and fp64, full
# and thin basis, with triton 3.6 and 3.9 (tools/check_triton.py, which fails if one spills);
# 128 × 128 tiles, and 64 × 64 with 32-deep steps in fp64, spill there and are left out.
CONFIGS = ((64, 64, 16, 4, 3), (64, 64, 16, 4, 2), (32, 64, 32, 4, 2), (32, 32, 32, 4, 2),
           (128, 64, 16, 8, 2), (64, 128, 16, 8, 2))


def autotuning() -> bool:
    """Whether launches pick their tiles with ``triton.autotune`` (compiled kernels only; off with
    ``SAP_FAST_TRITON_AUTOTUNE=0``). Tuning runs once per (out, d, r, full) shape."""
    return not interpreted() and switch("SAP_FAST_TRITON_AUTOTUNE") == "1"


_scaled_update_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for m, n, k, w, s in CONFIGS],
    key=["M", "N", "R", "FULL"],
)(_scaled_update_kernel)


DEFAULT_CONFIG = CONFIGS[0]  # a compiled launch with autotuning off


def _interpreter_blocks(out: int, d: int, r: int) -> Tuple[int, int, int]:
    """Small tiles for the interpreter (which would run every autotune config, and pays per
    element): ≥ 16 each, as ``tl.dot`` on the GPU needs M, N, K ≥ 16."""
    def fit(n, cap):
        return max(16, min(cap, triton.next_power_of_2(n)))
    return fit(out, 64), fit(d, 64), fit(r, 32)


def scaled_update(weight: torch.Tensor, wu: torch.Tensor, basis: torch.Tensor, eigvals: torch.Tensor,
                  alpha: float, *, full: Optional[bool] = None,
                  config: Optional[Tuple[int, int, int, int, int]] = None) -> torch.Tensor:
    """``Ŵ = W U diag(λ) Uᵀ`` with the Triton kernel (see the module docstring).

    Args:
        weight: ``W`` ``(groups, out, d)``, float32 or float64.
        wu: ``W U`` ``(groups, out, r)``, same dtype and device.
        basis: ``U`` ``(groups, d, r)`` with orthonormal columns, ``r ≤ d``.
        eigvals: ``e`` ``(groups, r)``, ≥ 0 (not checked: that would synchronise the GPU).
        alpha: the scale α > 0.
        full: the careful full-basis form; None means ``r == d``. ``full=False`` with a square
            basis uses the thin form (same value, less accurate at large α).
        config: ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` to force one tile
            configuration (benchmarks, tests); None = autotuned over :data:`CONFIGS` on a GPU
            (:data:`DEFAULT_CONFIG` with ``SAP_FAST_TRITON_AUTOTUNE=0``), small fixed tiles in
            the interpreter.

    Returns:
        A new contiguous ``(groups, out, d)`` tensor. Inputs may have any strides.

    Raises:
        ValueError: shapes, dtypes or devices disagree, α is not finite and > 0, ``full=True``
            with ``r < d``, or CPU tensors without the Triton interpreter.
    """
    if isinstance(weight, torch.Tensor) and weight.device.type == "cpu" and not interpreted():
        raise ValueError("scaled_update: CPU tensors need TRITON_INTERPRET=1 set before importing "
                         "sap_fast.backends.triton.update; use scaled_update_reference on CPU")
    result, launches = scaled_update_launches(weight, wu, basis, eigvals, alpha, full=full, config=config)
    with torch.cuda.device(weight.device) if weight.is_cuda else contextlib.nullcontext():  # the inputs' GPU
        for launch in launches:
            launch()
    return result


def scaled_update_launches(weight: torch.Tensor, wu: torch.Tensor, basis: torch.Tensor,
                           eigvals: torch.Tensor, alpha: float, *, full: Optional[bool] = None,
                           config: Optional[Tuple[int, int, int, int, int]] = None,
                           autotune: Optional[bool] = None) -> Tuple[torch.Tensor, List[Launch]]:
    """What :func:`scaled_update` runs, without running it: the result tensor (allocated, or
    zeroed when there is nothing to launch) and its launches. Same arguments and checks;
    ``autotune`` overrides :func:`autotuning` (``tools/check_triton.py`` compiles both routes
    for a GPU that is not there, on ``meta`` tensors)."""
    alpha, full = _check(weight, wu, basis, eigvals, alpha, full)
    groups, out, d = weight.shape
    r = basis.shape[-1]
    result = torch.empty((groups, out, d), dtype=weight.dtype, device=weight.device)
    if result.numel() == 0:
        return result, []
    if r == 0:  # thin basis spanning nothing: every direction gets λ = 0
        return result.zero_(), []
    total = eigvals.sum(-1)  # (groups,), contiguous: the same Σe as the twin
    alpha_t = torch.full((1,), alpha, dtype=weight.dtype, device=weight.device)
    args = (result, weight, wu, basis, eigvals, total, alpha_t, out, d, r,
            *result.stride(), *weight.stride(), *wu.stride(), *basis.stride(), *eigvals.stride())
    if config is None and (autotuning() if autotune is None else autotune):
        def grid(meta):
            return triton.cdiv(out, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_N"]), groups
        return result, [Launch(_scaled_update_tuned, grid, args, dict(FULL=full))]
    if config is None:
        config = DEFAULT_CONFIG if not interpreted() else (*_interpreter_blocks(out, d, r), 4, None)
    block_m, block_n, block_k, warps, stages = config
    grid = (triton.cdiv(out, block_m), triton.cdiv(d, block_n), groups)
    extra = {} if stages is None else {"num_stages": stages}
    return result, [Launch(_scaled_update_kernel, grid, args, dict(
        FULL=full, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **extra))]


def scaled_update_reference(weight: torch.Tensor, wu: torch.Tensor, basis: torch.Tensor,
                            eigvals: torch.Tensor, alpha: float, *, full: Optional[bool] = None
                            ) -> torch.Tensor:
    """Plain-torch twin of :func:`scaled_update`: same arguments, checks and formula.

    Mirrors the portable update (``sap_fast.project.projected_weight``) except that the full form computes
    ``1 − λ = (1 − s) / ((α − 1) s + 1)`` rather than ``1.0 − λ``, and ``s`` divides by ``Σe``
    itself rather than ``max(Σe, tiny)`` (they differ only for a subnormal ``Σe``).
    """
    alpha, full = _check(weight, wu, basis, eigvals, alpha, full)
    total = eigvals.sum(-1, keepdim=True)
    has_energy = total > 0
    s = torch.where(has_energy, eigvals / torch.where(has_energy, total, torch.ones_like(total)),
                    torch.zeros_like(eigvals))
    if full:
        coef = (1.0 - s) / ((alpha - 1.0) * s + 1.0)
    else:
        coef = alpha * s / ((alpha - 1.0) * s + 1.0)  # λ
    update = (wu * coef.unsqueeze(-2)) @ basis.transpose(-1, -2)
    return weight - update if full else update
