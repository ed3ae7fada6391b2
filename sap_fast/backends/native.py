"""The native extension ``sap_fast._C`` (CMake build of ``csrc/``): loaded once, optional.

When it is missing or fails to load (not built, built for another torch), every stage falls back
to its portable torch path and the reason is logged once at debug level
(``logging.getLogger("sap_fast")``). ``SAP_FAST_BACKEND=portable`` forces the portable path
everywhere (for comparisons, or to rule the native kernels out when chasing a problem).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

from .switches import SWITCHES, switch

__all__ = ["BACKENDS", "forced_portable", "load", "native", "native_cuda", "why_not"]

log = logging.getLogger("sap_fast")
BACKENDS = SWITCHES["SAP_FAST_BACKEND"][0]


def forced_portable() -> bool:
    """``SAP_FAST_BACKEND=portable``: every stage on its plain-torch path."""
    return switch("SAP_FAST_BACKEND") == "portable"


@functools.lru_cache(maxsize=None)
def load():
    """(module, None) or (None, why it is unavailable); tried once per process."""
    try:
        from .. import _C  # registers torch.ops.sap_fast.*
        from . import _ops  # noqa: F401  (their shape functions)
    except Exception as err:  # ImportError, or an undefined symbol from a torch mismatch
        why = (f"the native extension sap_fast._C is unavailable ({type(err).__name__}: {err}); "
               "using the portable torch path (rebuild: pip install --no-build-isolation -e .)")
        log.debug(why)
        return None, why
    return _C, None


def native() -> Optional[object]:
    """The loaded ``sap_fast._C`` module, or None (forced portable, missing, or failed)."""
    if forced_portable():
        return None
    return load()[0]


def why_not(cuda: bool = False) -> Optional[str]:
    """Why the extension's ops (with ``cuda``: its CUDA kernels) cannot serve here, or None:
    the reason the stages' choosers print."""
    if forced_portable():
        return "SAP_FAST_BACKEND=portable"
    why = load()[1]
    if why is None and cuda and not load()[0].build_info()["cuda"]:
        why = "the native extension sap_fast._C was built without its CUDA kernels"
    return why


def native_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    module = native()
    return module is not None and bool(module.build_info()["cuda"])
