"""cupy as a backend: loaded once, optional, and always driven from torch's side.

cupy serves two things here, both for GPU machines that have torch from a wheel and no CUDA
toolkit: the CUDA kernels of ``csrc/cuda/`` compiled at run time by NVRTC (:mod:`.nvrtc`), and
batched cuSOLVER calls (:mod:`.batched_linalg`). In both, torch stays in charge: tensors are
allocated by torch's caching allocator, handed to cupy without a copy, and the work is queued on
torch's current stream (:func:`stream_of`), so it is ordered with the forward pass and adds no
host synchronisation.

``pip install "sap_fast[cupy]"`` installs cupy-cuda13x; a machine whose driver is CUDA 12 installs
cupy-cuda12x instead (never both: they are one Python package).
"""
from __future__ import annotations

import functools
import logging

from .._runtime.checks import first_line
from .native import forced_portable

__all__ = ["INSTALL_HINT", "typed_first_line", "load", "stream_of"]

log = logging.getLogger("sap_fast")
INSTALL_HINT = ("pip install 'sap_fast[cupy]' (cupy-cuda13x; cupy-cuda12x instead on a machine "
                "whose driver is CUDA 12)")


def typed_first_line(err: BaseException) -> str:
    """``Type: message`` on one line (cupy's loader errors run to a dozen lines)."""
    return f"{type(err).__name__}: {first_line(err)}"


@functools.lru_cache(maxsize=None)
def _probe():
    """(cupy, None), or (None, why not): cupy imports and sees a CUDA device. Tried once."""
    try:
        import cupy
    except Exception as err:  # not installed, or a broken install
        why = f"cupy is not installed ({typed_first_line(err)}); {INSTALL_HINT}"
        log.debug(why)
        return None, why
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # no driver, or a driver older than cupy's CUDA
        why = f"cupy sees no GPU ({typed_first_line(err)})"
        log.debug(why)
        return None, why
    if count < 1:
        return None, "cupy sees no GPU (0 CUDA devices)"
    return cupy, None


def load():
    """(the cupy module, None) when cupy can run kernels here, else (None, why not).

    Why not: ``SAP_FAST_BACKEND=portable``, cupy missing, or no GPU (no device, no driver, or a
    driver too old for the installed cupy's CUDA). The probe runs once per process; the
    portable switch is read on every call.
    """
    if forced_portable():
        return None, "SAP_FAST_BACKEND=portable"
    return _probe()


def stream_of(cp, torch_stream):
    """A cupy view of a torch CUDA stream: work queued under ``with stream_of(...)`` runs on it.

    cupy 14 reads the stream through the CUDA stream protocol (``Stream.from_external``, which
    supersedes the deprecated ``ExternalStream``); cupy 13 gets the raw handle.
    """
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None and hasattr(torch_stream, "__cuda_stream__"):
        return from_external(torch_stream)
    return cp.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device_index)
