"""The patches a conv really reads: its padding (``padding_mode`` and ``'same'`` included), the
padded input size, the number of rows of its patch matrix, and a view of every patch.

Shared by the statistics pass: the rows it unfolds on the portable path, and the input it hands
the Gram kernels (:func:`kernel_input`, padded the same way), so both see one geometry.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def conv_padding(conv: nn.Module) -> List[int]:
    """The ``F.pad`` amounts (last dim first) that the conv applies to its input."""
    pads = []
    for i in reversed(range(len(conv.kernel_size))):
        k, dil = conv.kernel_size[i], conv.dilation[i]
        if conv.padding == "same":
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        elif conv.padding == "valid":
            pads += [0, 0]
        else:
            pads += [conv.padding[i]] * 2
    return pads


def pad_mode(conv: nn.Module) -> str:
    """``F.pad``'s name for the conv's ``padding_mode``."""
    return "constant" if conv.padding_mode == "zeros" else conv.padding_mode


def conv_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A view ``(N, C, *out, *kernel)`` of every patch the conv reads (only the padding copies)."""
    spatial = len(conv.kernel_size)
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    pads = conv_padding(conv)
    if any(pads):
        x = F.pad(x, pads, mode=pad_mode(conv))
    for i in range(spatial):
        k, dil, step = conv.kernel_size[i], conv.dilation[i], conv.stride[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, step)  # appends the window as the last dim
        if dil > 1:
            x = x[..., ::dil]
    return x


def kernel_input(conv: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
    """The conv's input as the Gram kernels read it, batched, and their zero padding per spatial
    dim (first dim first): the kernels pad zeros symmetrically, so other padding modes and
    asymmetric ``'same'`` padding are applied here, and the padding left is zero."""
    if x.dim() == len(conv.kernel_size) + 1:  # unbatched input
        x = x.unsqueeze(0)
    pads = conv_padding(conv)
    low, high = pads[0::2][::-1], pads[1::2][::-1]  # per spatial dim, first dim first
    if conv.padding_mode == "zeros" and low == high:
        return x, low
    return F.pad(x, pads, mode=pad_mode(conv)), [0] * len(low)


def padded_size(conv: nn.Module, x: torch.Tensor) -> List[int]:
    """The spatial size of the conv's input after its own padding, first dim first."""
    spatial = len(conv.kernel_size)
    pads = conv_padding(conv)
    return [x.shape[-spatial + i] + pads[2 * (spatial - 1 - i)] + pads[2 * (spatial - 1 - i) + 1]
            for i in range(spatial)]


def conv_rows(conv: nn.Module, x: torch.Tensor) -> int:
    """Rows of the patch matrix of one conv call: samples × output positions."""
    spatial = len(conv.kernel_size)
    samples = x.shape[0] if x.dim() == spatial + 2 else 1
    out = [(size - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
           for i, size in enumerate(padded_size(conv, x))]
    return samples * math.prod(out)
