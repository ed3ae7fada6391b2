"""Shape functions ("fakes") for the native ops, so ``torch.compile``/``opcheck`` can trace them
without running them. Imported by :mod:`sap_fast.backends.native` once ``sap_fast._C`` has loaded; the
ops themselves are ``torch.ops.sap_fast.conv_gram`` / ``conv_gram_shift`` / ``eigh``,
``conv_gram_launch`` (the CUDA kernels launched from a launch plan), and ``conv_gram_dmma_twin``,
the CPU twin of the CUDA tensor-core tiles that the tests run (schemas in ``csrc/sap_fast.cpp``).

Where the extension holds the CUDA launch op, ``conv_gram``'s CUDA kernel is registered here too:
:func:`.conv_launch.conv_gram_cuda`, the launch plan in Python over ``conv_gram_launch``."""
from __future__ import annotations

import math

import torch

from . import conv_launch

__all__: list = []  # registers the shape functions; nothing to import by name

if torch._C._dispatch_has_kernel_for_dispatch_key("sap_fast::conv_gram_launch", "CUDA"):
    torch.library.register_kernel("sap_fast::conv_gram", "cuda", conv_launch.conv_gram_cuda)


def _gram_shape(x, kernel_size, groups):
    torch._check(x.dim() - 2 == len(kernel_size), lambda: "one kernel size per spatial dim")
    torch._check(x.shape[1] % groups == 0, lambda: "groups must divide the channels")
    return groups, x.shape[1] // groups * math.prod(kernel_size)


@torch.library.register_fake("sap_fast::conv_gram")
def _conv_gram_fake(x, kernel_size, stride, padding, dilation, groups, dtype):
    g, d = _gram_shape(x, kernel_size, groups)
    return x.new_empty((g, d, d), dtype=dtype)


@torch.library.register_fake("sap_fast::conv_gram_shift")
def _conv_gram_shift_fake(x, kernel_size, padding, dilation, groups, dtype):
    g, d = _gram_shape(x, kernel_size, groups)
    return x.new_empty((g, d, d), dtype=dtype)


@torch.library.register_fake("sap_fast::conv_gram_launch")
def _conv_gram_launch_fake(x, gram, kernel_size, stride, padding, dilation, groups, rows_per_split, dmma,
                           mirror_blocks, mirror_threads):
    g, d = _gram_shape(x, kernel_size, groups)
    torch._check(tuple(gram.shape) == (g, d, d), lambda: "gram must be (groups, d, d)")
    return None


@torch.library.register_fake("sap_fast::conv_gram_dmma_twin")
def _conv_gram_dmma_twin_fake(x, kernel_size, stride, padding, dilation, groups, rows_per_split):
    g, d = _gram_shape(x, kernel_size, groups)
    return x.new_empty((g, d, d), dtype=torch.float64)


@torch.library.register_fake("sap_fast::eigh")
def _eigh_fake(gram):
    return gram.new_empty(gram.shape[:-1]), gram.new_empty(gram.shape)
