"""The shift-correlation Gram of a stride-1 conv in plain torch ops (a weight-gradient
convolution: cuDNN on a GPU), the GPU counterpart of the C++ ``conv_gram_shift``.

For a stride-1 conv the Gram block of kernel offsets ``(a, b)`` is
``Σ_{q ∈ box_a} x[:, q] x[:, q + (b − a)·dil]ᵀ``, where ``box_a`` is where offset ``a`` reads
the zero-padded input ``xp``. All boxes share a *core* (the positions every offset reads), where
the block depends only on ``δ = b − a``: one weight-gradient call with ``grad_output = xp[core]``
and a ``(2k − 1)``-wide kernel gives all of them at once, ``(2kh−1)(2kw−1)`` C×C correlations
(25 for 3×3) instead of ``(kh·kw)²`` (81). What lies in ``box_a`` outside the core is a frame of
at most four rectangles per offset ``a``; one more weight-gradient call per rectangle adds its
part to every block ``(a, ·)``. The result is exact (the same products, summed in another order).

It pays where the frame is thin next to the core (ResNet-50's 56² and 28² maps: the frame is
7-14% of the box); on 7² maps the frame is larger than the core and the direct kernels win, so
:func:`pays` decides per call. 2-D and 1-D convs, any dilation and groups, zero padding.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch.nn import functional as F
from torch.nn import grad as _weight_grad

from .geometry import ConvGeometry, conv_geometry

__all__ = ["pays", "shift_gram"]

conv2d_weight = _weight_grad.conv2d_weight  # the weight gradient of a 2-D conv (cuDNN on a GPU)


def _frame(a: List[int], e: List[int], out: List[int], dil: List[int]) -> List[tuple]:
    """Rectangles ``(r0, r1, s0, s1)`` (padded coordinates) of ``box_a`` outside the core."""
    (a1, a2), (eh, ew), (ho, wo), (dh, dw) = a, e, out, dil
    rows, cols = (a1 * dh, a1 * dh + ho), (a2 * dw, a2 * dw + wo)
    rects = [(rows[0], eh, cols[0], cols[1]), (ho, rows[1], cols[0], cols[1]),   # top, bottom
             (eh, ho, cols[0], ew), (eh, ho, wo, cols[1])]                          # left, right
    return [r for r in rects if r[1] > r[0] and r[3] > r[2]]


def _geometry(size, kernel, dilation) -> tuple:
    """``(e, out, core)`` per dim of a padded input ``size``: the frame width ``dil·(k − 1)``,
    the output (box) size and the core size (≤ 0: no core)."""
    e = [dilation[i] * (kernel[i] - 1) for i in range(len(size))]
    out = [size[i] - e[i] for i in range(len(size))]
    return e, out, [out[i] - e[i] for i in range(len(size))]


def pays(in_size, kernel_size, dilation) -> bool:
    """Whether the shift form does fewer multiply-adds than the upper triangle of the direct
    Gram for this geometry (``in_size``: padded spatial size; 1-D or 2-D)."""
    k = [1] * (2 - len(kernel_size)) + list(kernel_size)  # 1-D: a height-1 kernel, as shift_gram
    dil = [1] * (2 - len(dilation)) + list(dilation)
    e, out, core = _geometry([1] * (2 - len(in_size)) + list(in_size), k, dil)
    if min(core) <= 0 or math.prod(k) == 1:
        return False
    taps = math.prod(k)
    frame = sum((r1 - r0) * (s1 - s0) for a1 in range(k[0]) for a2 in range(k[1])
                for r0, r1, s0, s1 in _frame([a1, a2], e, out, dil))
    shift = math.prod(2 * x - 1 for x in k) * math.prod(core) + taps * frame
    return shift < taps * (taps + 1) / 2 * math.prod(out)


def shift_gram(x: torch.Tensor, kernel_size=None, padding=None, dilation=None, groups: int = 1,
               dtype: torch.dtype = torch.float64, *,
               geometry: Optional[ConvGeometry] = None) -> Optional[torch.Tensor]:
    """The Gram ``(groups, d, d)`` of a stride-1 conv's patch matrix, ``d = C/groups·kh·kw``,
    columns in ``weight.view(out, -1)`` order; None when the geometry has no core (then the
    caller uses another kernel). ``x``: ``(N, C, W)`` or ``(N, C, H, W)``; ``padding``: zeros,
    symmetric, one per spatial dim.

    Either the conv's ``kernel_size``, ``padding``, ``dilation`` and ``groups`` (checked here,
    one-line ValueErrors), or its checked ``geometry`` (:func:`~.geometry.conv_geometry`, a
    stride-1 1-D or 2-D conv) in their place."""
    if geometry is None:
        _check(x, kernel_size, padding, dilation, groups, dtype)
        spatial = x.dim() - 2
        geometry = conv_geometry(x, list(kernel_size), [1] * spatial, list(padding), list(dilation),
                                 groups, dtype)
    elif geometry.spatial > 2 or any(s != 1 for s in geometry.stride):
        raise ValueError(f"shift_gram: the shift form takes stride-1 1-D and 2-D convs, got {geometry.spatial}-D "
                         f"stride {list(geometry.dims['stride'])}; use the direct Gram kernels")
    dims = geometry.dims
    cudnn_backend = torch.backends.cudnn
    # cuDNN would run float32 weight gradients on TF32 tensor cores (its default): not this mode
    with cudnn_backend.flags(enabled=cudnn_backend.enabled, benchmark=cudnn_backend.benchmark,
                             deterministic=cudnn_backend.deterministic, allow_tf32=False):
        return _shift_gram(x, dims["kernel"], dims["padding"], dims["dilation"], geometry.groups, dtype)


def _check(x, kernel_size, padding, dilation, groups, dtype) -> None:
    """The arguments of a call without a geometry (one-line ValueErrors)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or not x.is_floating_point():
        raise ValueError(f"shift_gram: x must be a floating (N, C, W) or (N, C, H, W) tensor, got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else (tuple(x.shape), x.dtype)}")
    spatial = x.dim() - 2
    for name, value in (("kernel_size", kernel_size), ("padding", padding), ("dilation", dilation)):
        if value is None or len(value) != spatial or any(int(v) < (1 if name != "padding" else 0) for v in value):
            raise ValueError(f"shift_gram: {name} must be {spatial} int(s) "
                             f"{'>= 0' if name == 'padding' else '>= 1'}, got {value if value is None else list(value)}")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"shift_gram: groups must be a positive int dividing C={x.shape[1]}, got {groups!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"shift_gram: dtype must be torch.float32 or torch.float64, got {dtype}")


def _shift_gram(x, kernel_size, padding, dilation, groups, dtype):
    if x.dim() == 3:  # 1-D: a 2-D conv with a height-1 kernel
        x = x.unsqueeze(2)
        kernel_size, padding, dilation = [1, *kernel_size], [0, *padding], [1, *dilation]
    n, c = x.shape[:2]
    kh, kw = kernel_size
    dh, dw = dilation
    xp = F.pad(x.to(dtype), [padding[1], padding[1], padding[0], padding[0]])
    e, out, core = _geometry(list(xp.shape[-2:]), kernel_size, dilation)
    if min(core) <= 0:
        return None
    cg = c // groups
    # core: D[g·cg + i, j, u, v] = Σ_{q∈core} xp[g·cg + i, q] xp[g·cg + j, q + ((u, v) − (k − 1))·dil]
    core = xp[:, :, e[0]:out[0], e[1]:out[1]]
    d = conv2d_weight(xp, (c, cg, 2 * kh - 1, 2 * kw - 1), core, dilation=(dh, dw), groups=groups)
    blocks = xp.new_empty((groups, cg, kh, kw, cg, kh, kw))  # [g, i, a, j, b]
    d = d.view(groups, cg, cg, 2 * kh - 1, 2 * kw - 1)
    for a1 in range(kh):
        for a2 in range(kw):
            # block (a, b) is D at index b − a + (k − 1): a (kh, kw) window of D starting at k − 1 − a
            window = d[:, :, :, kh - 1 - a1:2 * kh - 1 - a1, kw - 1 - a2:2 * kw - 1 - a2]
            for r0, r1, s0, s1 in _frame([a1, a2], e, out, [dh, dw]):
                strip = conv2d_weight(
                    xp[:, :, r0 - a1 * dh:r1 - a1 * dh + e[0], s0 - a2 * dw:s1 - a2 * dw + e[1]],
                    (c, cg, kh, kw), xp[:, :, r0:r1, s0:s1], dilation=(dh, dw), groups=groups)
                window = window + strip.view(groups, cg, cg, kh, kw)
            blocks[:, :, a1, a2] = window
    return blocks.reshape(groups, cg * kh * kw, cg * kh * kw)
