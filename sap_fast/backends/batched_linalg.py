"""Batched cuSOLVER through cupy for many small matrices of one size: opt-in, off by default.

Grouped and depthwise convs give many small Grams of one size per layer (MobileNetV3: dozens of
9×9 and 25×25 groups; ConvNeXt-T's depthwise 7×7: 96 to 768 groups of 49×49). cuSOLVER has
batched routines for exactly that, which torch does not call for every size:

- :func:`eigh`: ``syevjBatched`` (Jacobi, the whole batch in one call; cuSOLVER offers it up to
  n = 32), the contract of ``torch.linalg.eigh(gram)`` (``UPLO="L"``);
- :func:`cholesky_ex`: ``potrfBatched`` (one call over an array of matrix pointers), the contract
  of ``torch.linalg.cholesky_ex(m)``, for the solve route (:mod:`sap_fast.solve`).

Neither serves a batch by default: the spectrum stage's default is the CMake-built cuSOLVER op
where built, else ``torch.linalg.eigh``, and the solve's is ``torch.linalg.cholesky_ex``
(:mod:`.linalg` holds both choosers). The switches select these instead:

- ``SAP_FAST_BATCHED_EIGH``: ``auto`` (default) or ``cupy`` (``syevjBatched`` for CUDA batches
  with n ≤ 32; larger ones stay on the default);
- ``SAP_FAST_BATCHED_CHOLESKY``: ``auto`` (default) or ``cupy`` (``potrfBatched`` for CUDA
  batches).

``benchmarks/gpu_cupy.py`` times each against the default on a GPU.

Where cupy cannot run (see :func:`load`), ``cupy`` falls back to the default quietly;
``backend_info()["cupy"]`` says why. Memory comes from torch's caching allocator, the calls are
queued on torch's current stream (:func:`on_stream`); the argument handling (checks, layouts, workspace, pointer
array) runs against any object with cupy's cuSOLVER binding names (:func:`syevj_batched`,
:func:`potrf_batched`), which is how it is tested without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from . import cupy_runtime
from .switches import switch

__all__ = ["CHOICES", "MAX_JACOBI_SIZE", "eigh_choice", "cholesky_choice", "load", "eigh_reasons",
           "cholesky_reasons", "eigh_route", "cholesky_route", "syevj_batched", "potrf_batched", "on_stream", "eigh", "cholesky_ex", "check_info"]

CHOICES = ("auto", "cupy")
MAX_JACOBI_SIZE = 32  # syevjBatched's limit on n
_INT_MAX = 2 ** 31 - 1
# cuSOLVER / cuBLAS enums (cusolverEigMode_t, cublasFillMode_t), fixed by their C headers
_EIG_MODE_VECTOR, _FILL_LOWER, _FILL_UPPER = 1, 0, 1
_PREFIX = {torch.float32: "s", torch.float64: "d"}


def eigh_choice() -> str:
    """``SAP_FAST_BATCHED_EIGH`` (see the module docstring)."""
    return switch("SAP_FAST_BATCHED_EIGH")


def cholesky_choice() -> str:
    """``SAP_FAST_BATCHED_CHOLESKY`` (see the module docstring)."""
    return switch("SAP_FAST_BATCHED_CHOLESKY")


@functools.lru_cache(maxsize=None)
def _cusolver_probe():
    try:
        from cupy_backends.cuda.libs import cusolver  # loads the library (cuda-pathfinder)
    except Exception as err:  # the cuSOLVER library (a CUDA wheel of torch brings one) not found
        return None, (f"cupy cannot load cuSOLVER ({cupy_runtime.typed_first_line(err)}); pip install "
                      "nvidia-cusolver (CUDA 13; nvidia-cusolver-cu12 for cupy-cuda12x)")
    return cusolver, None


def load():
    """(cupy's cuSOLVER binding, None) when the batched calls can run here, else (None, why)."""
    cp, why = cupy_runtime.load()
    if cp is None:
        return None, why
    return _cusolver_probe()


def _cupy_why() -> Optional[str]:
    return load()[1]


def eigh_reasons(device_type: str, n: int, choice: str, cupy_why: Callable[[], Optional[str]] = _cupy_why,
                 dtype: Optional[torch.dtype] = None) -> List[str]:
    """Why :func:`eigh` (syevjBatched) does not serve a batch of n×n Grams (empty = it does):
    only when asked (``SAP_FAST_BATCHED_EIGH=cupy``), on a GPU, for n ≤ 32, float32/float64,
    where cupy runs (``cupy_why()``: why not, asked last)."""
    if device_type != "cuda":
        return [f"runs on CUDA tensors, not {device_type}"]
    out = []
    if choice != "cupy":
        out.append("SAP_FAST_BATCHED_EIGH=cupy selects it")
    if not 0 < n <= MAX_JACOBI_SIZE:
        out.append(f"syevjBatched takes 0 < n ≤ {MAX_JACOBI_SIZE}, got n = {n}")
    if dtype is not None and dtype not in _PREFIX:
        out.append(f"float32/float64 only, got {dtype}")
    return out or [why for why in [cupy_why()] if why]


def cholesky_reasons(device_type: str, choice: str, cupy_why: Callable[[], Optional[str]] = _cupy_why,
                     dtype: Optional[torch.dtype] = None) -> List[str]:
    """Why :func:`cholesky_ex` (potrfBatched) does not serve a batch (empty = it does): only
    when asked (``SAP_FAST_BATCHED_CHOLESKY=cupy``), on a GPU, float32/float64, where cupy runs."""
    if device_type != "cuda":
        return [f"runs on CUDA tensors, not {device_type}"]
    out = []
    if choice != "cupy":
        out.append("SAP_FAST_BATCHED_CHOLESKY=cupy selects it")
    if dtype is not None and dtype not in _PREFIX:
        out.append(f"float32/float64 only, got {dtype}")
    return out or [why for why in [cupy_why()] if why]


def eigh_route(device_type: str, n: int, choice: str, cupy_ok: bool) -> str:
    """``"cupy"`` (syevjBatched) or ``"default"`` (the spectrum stage's own choice) for one
    float32/float64 batch of n×n Grams: cupy only when asked, on a GPU, for n ≤ 32."""
    return "default" if eigh_reasons(device_type, n, choice, lambda: None if cupy_ok else "no cupy") else "cupy"


def cholesky_route(device_type: str, choice: str, cupy_ok: bool) -> str:
    """``"cupy"`` (potrfBatched) or ``"default"`` (``torch.linalg.cholesky_ex``)."""
    return "default" if cholesky_reasons(device_type, choice, lambda: None if cupy_ok else "no cupy") else "cupy"


# -- argument handling -------------------------------------------------------------------------

def _check_batch(a: torch.Tensor, op: str, name: str, max_n: Optional[int] = None) -> Tuple[int, int]:
    """(batch, n) of an (n, n) or (B, n, n) float32/float64 tensor, or a one-line ValueError."""
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(a).__name__}")
    if a.dim() not in (2, 3) or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{op}: {name} must be (n, n) or (B, n, n), got shape {tuple(a.shape)}")
    if a.dtype not in _PREFIX:
        raise ValueError(f"{op}: {name} must be float32 or float64, got {a.dtype}; cast it with .double()")
    n = a.shape[-1]
    batch = a.shape[0] if a.dim() == 3 else 1
    if max_n is not None and n > max_n:
        raise ValueError(f"{op}: syevjBatched takes n ≤ {max_n}, got n = {n}; use torch.linalg.eigh")
    if n > _INT_MAX or batch > _INT_MAX:
        raise ValueError(f"{op}: n and B must fit in int32 for cuSOLVER, got shape {tuple(a.shape)}")
    return batch, n


def syevj_batched(lib, handle: int, gram: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending (B, n), eigenvectors as columns (B, n, n), info (B,) int32) of the
    batch by ``{s,d}syevjBatched`` from ``lib`` (cupy's cuSOLVER binding) on ``handle``, whose
    stream the caller has set. Queues the work and returns: ``info`` is read by the caller.

    Layout: cuSOLVER is column-major. It gets a column-major copy of ``gram`` (``gram.mT`` made
    contiguous: offset i + j·n holds gram[i, j]), so FILL_MODE_LOWER reads gram's lower triangle,
    as ``torch.linalg.eigh`` does; it overwrites the copy with the eigenvectors as columns, i.e.
    the buffer holds Vᵀ row-major, and V = buffer.mT.
    """
    batch, n = _check_batch(gram, "eigh", "gram", MAX_JACOBI_SIZE)
    dtype, device = gram.dtype, gram.device
    work = gram.reshape(batch, n, n).mT.clone(memory_format=torch.contiguous_format)
    values = torch.empty((batch, n), dtype=dtype, device=device)
    info = torch.zeros((batch,), dtype=torch.int32, device=device)
    if batch and n:
        prefix = _PREFIX[dtype]
        params = lib.createSyevjInfo()
        try:
            # defaults: tolerance = machine epsilon, 100 sweeps; ascending order is the contract
            lib.xsyevjSetSortEig(params, 1)
            lwork = getattr(lib, f"{prefix}syevjBatched_bufferSize")(
                handle, _EIG_MODE_VECTOR, _FILL_LOWER, n, work.data_ptr(), n, values.data_ptr(),
                params, batch)
            workspace = torch.empty((max(lwork, 1),), dtype=dtype, device=device)
            getattr(lib, f"{prefix}syevjBatched")(
                handle, _EIG_MODE_VECTOR, _FILL_LOWER, n, work.data_ptr(), n, values.data_ptr(),
                workspace.data_ptr(), lwork, info.data_ptr(), params, batch)
        finally:  # the parameters are read when the call is queued
            lib.destroySyevjInfo(params)
    vectors = work.mT.contiguous()
    if gram.dim() == 2:
        return values[0], vectors[0], info
    return values, vectors, info


def potrf_batched(lib, handle: int, m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L, info) of the batch by ``{s,d}potrfBatched``, as ``torch.linalg.cholesky_ex(m)``
    returns them: L lower-triangular with zeros above, ``info`` (B,) int32 (or a scalar for an
    (n, n) input), k > 0 where the leading k×k minor is not positive definite.

    Layout: the row-major copy of ``m`` is, to column-major cuSOLVER, mᵀ; FILL_MODE_UPPER then
    reads mᵀ's upper triangle, which is m's lower one (as torch reads it), and writes U with
    mᵀ = UᵀU there, i.e. Uᵀ = L in the row-major lower triangle. The strict upper triangle keeps
    m's entries and is zeroed.
    """
    batch, n = _check_batch(m, "cholesky_ex", "m")
    dtype, device = m.dtype, m.device
    work = m.reshape(batch, n, n).clone(memory_format=torch.contiguous_format)
    info = torch.zeros((batch,), dtype=torch.int32, device=device)
    if batch and n:
        # the array of matrix pointers, built on the device: no host round trip
        step = n * n * work.element_size()
        pointers = work.data_ptr() + torch.arange(batch, dtype=torch.int64, device=device) * step
        # freed on return while the call may still be queued: the block goes back to torch's
        # allocator for later work on this same stream, which runs after the call
        getattr(lib, f"{_PREFIX[dtype]}potrfBatched")(
            handle, _FILL_UPPER, n, pointers.data_ptr(), n, info.data_ptr(), batch)
    factor = work.tril_()
    if m.dim() == 2:
        return factor[0], info[0]
    return factor, info


# -- the entry points ----------------------------------------------------------------------------

@contextlib.contextmanager
def on_stream(cp, lib, device_index: int, stream) -> Iterator[int]:
    """cupy's cuSOLVER handle of device ``device_index``, with every call made inside the block
    queued on ``stream`` (torch's current stream there).

    cupy's cuSOLVER wrappers set the handle's stream to *cupy's* current stream at every call,
    so a stream set once on the handle is overridden: the calls run inside cupy's stream context
    made from torch's stream (:func:`cupy_runtime.stream_of`), and the handle is set to it too
    (for the bindings that do not reset it)."""
    with cp.cuda.Device(device_index), cupy_runtime.stream_of(cp, stream):
        handle = cp.cuda.device.get_cusolver_handle()
        lib.setStream(handle, stream.cuda_stream)
        yield handle


def _runtime(op: str, tensor: torch.Tensor):
    if not tensor.is_cuda:
        raise ValueError(f"{op} (cupy): expected a CUDA tensor, got one on {tensor.device}")
    lib, why = load()
    if lib is None:
        raise RuntimeError(f"{op} (cupy): {why}")
    return cupy_runtime.load()[0], lib


def eigh(gram: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(gram)`` by one ``syevjBatched`` call: ascending eigenvalues (B, n) and
    orthonormal eigenvectors as columns (B, n, n) of the symmetric matrices defined by gram's
    lower triangle; (n, n) gives (n,) and (n, n). CUDA float32/float64, n ≤ 32.

    Reads ``info`` once (a host synchronisation, as ``torch.linalg.eigh`` makes) and raises
    RuntimeError naming the first matrix that did not converge. Serves the spectrum stage with
    ``SAP_FAST_BATCHED_EIGH=cupy`` (see the module docstring).
    """
    cp, lib = _runtime("eigh", gram)
    _check_batch(gram, "eigh", "gram", MAX_JACOBI_SIZE)
    with torch.cuda.device(gram.device), on_stream(cp, lib, gram.device.index,
                                                   torch.cuda.current_stream(gram.device)) as handle:
        values, vectors, info = syevj_batched(lib, handle, gram)
    check_info(info, "eigh (cupy syevjBatched)")
    return values, vectors


def cholesky_ex(m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex(m)`` by one ``potrfBatched`` call: (L, info), with no host
    synchronisation (``info`` stays on the device; :func:`sap_fast.solve.check_infos` reads it
    once per α). CUDA float32/float64, (n, n) or (B, n, n). Serves the solve with
    ``SAP_FAST_BATCHED_CHOLESKY=cupy`` (see the module docstring)."""
    cp, lib = _runtime("cholesky_ex", m)
    _check_batch(m, "cholesky_ex", "m")
    with torch.cuda.device(m.device), on_stream(cp, lib, m.device.index,
                                                torch.cuda.current_stream(m.device)) as handle:
        return potrf_batched(lib, handle, m)


def check_info(info: torch.Tensor, op: str) -> None:
    """Raise for the first nonzero ``info`` (one host read): > 0 did not converge, < 0 an
    argument cuSOLVER rejected (a bug here)."""
    host = info.reshape(-1).cpu()
    bad = host.nonzero()
    if len(bad):
        index = int(bad[0])
        value = int(host[index])
        if value < 0:
            raise RuntimeError(f"{op}: cuSOLVER rejected argument {-value} (internal error, please report)")
        raise RuntimeError(f"{op} did not converge for matrix {index} (cuSOLVER info {value}); check the "
                           "Gram for NaN/Inf, or retry in float64")
