"""The patches a conv really reads: its padding (``padding_mode`` and ``'same'`` included), the
padded input size, the number of rows of its patch matrix, and a view of every patch.

Shared by the statistics pass (which unfolds rows on the portable path) and the Gram backends
(which pad the input the same way before a kernel reads it), so both see one geometry.
"""
from __future__ import annotations

import math
from typing import List

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
