"""Triton kernels of sap_fast (GPU fast paths; on CPU they run only under ``TRITON_INTERPRET=1``).

- :mod:`.gram`: the implicit-im2col Gram of convs (and linear layers as 1×1 convs);
- :mod:`.update`: the λ-scaled weight update fused with its two products.

Each kernel module also holds a plain-torch twin (``*_reference``) with identical semantics: the
oracle for its tests and the fallback where Triton cannot run. Importing this package imports no
kernel module (nor Triton), so ``sap_fast`` never needs Triton; :func:`load` does, once.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch

from ..native import forced_portable

log = logging.getLogger("sap_fast")
_FALLBACK = {"update": "using torch matmuls", "gram": "no Triton Gram kernel"}


@functools.lru_cache(maxsize=None)
def load(name: str):
    """(the kernel module ``sap_fast.backends.triton.<name>``, None) or (None, why not)."""
    try:
        import triton  # noqa: F401
        return importlib.import_module(f"{__name__}.{name}"), None
    except Exception as err:
        why = f"Triton is unavailable ({type(err).__name__}: {err}); {_FALLBACK[name]}"
        log.debug(why)
        return None, why


def compiled(name: str):
    """The kernel module when it can run compiled (a GPU, not forced portable), else None."""
    if forced_portable() or not torch.cuda.is_available():
        return None
    return load(name)[0]
