"""Triton kernels of sap_fast (GPU fast paths; on CPU they run only under ``TRITON_INTERPRET=1``).

- :mod:`.gram`: the implicit-im2col Gram of convs (and linear layers as 1×1 convs);
- :mod:`.update`: the λ-scaled weight update fused with its two products.

Each kernel module also holds a plain-torch twin (``*_reference``) with identical semantics: the
oracle for its tests. Importing this package imports no kernel module (nor Triton), so
``sap_fast`` never needs Triton; :func:`load` does, once.

What happens when Triton cannot run (each stage's chooser, :mod:`..dispatch`, reads
:func:`why_not` and :func:`broken` among the Triton implementation's reasons and picks the next
implementation):

- Triton missing or failing to import: :func:`load` says why, and the Gram stage streams rows on
  the portable path (or uses the CUDA kernels where they serve the call), the update stage runs
  torch matmuls; ``sap-fast info`` prints the reason;
- no GPU, or ``SAP_FAST_BACKEND=portable``: the same implementations serve; on the CPU the
  kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before import) and
  only for the Gram stage with ``SAP_FAST_GRAM_KERNEL=triton``;
- a kernel that fails to *compile* on this machine (a Triton release that rejects it, ptxas
  refusing it, too little shared memory): the chooser warns once (:func:`mark_broken`: the
  kernel, the Triton version, the error), runs the next implementation for that call (rows on
  the portable path for the Gram, torch matmuls for the update), and the kernel's reasons say
  why it is skipped for the rest of the process (:func:`broken`). Errors of a kernel that
  compiled (a bad launch, a CUDA fault) propagate.

Each kernel module's launcher builds its launches as :class:`Launch` records before running
them, so ``tools/check_triton.py`` compiles, without a GPU, exactly what a launch compiles.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from typing import Dict, NamedTuple, Optional

import torch

from ..native import forced_portable
from ..switches import switch

__all__ = ["Launch", "load", "compiled", "for_device", "why_not", "broken", "mark_broken",
           "compile_failure", "summary"]

log = logging.getLogger("sap_fast")
_FALLBACK = {"update": "using torch matmuls", "gram": "streaming rows on the portable path"}
_BROKEN: Dict[str, str] = {}  # kernel module name → why it does not compile here


class Launch(NamedTuple):
    """One kernel launch as a launcher makes it: ``kernel[grid](*args, **kwargs)``. ``kernel`` is
    a ``triton.JITFunction`` or a ``triton.runtime.Autotuner``; ``grid`` a tuple or a function of
    the launch's meta-parameters."""
    kernel: object
    grid: object
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


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
    """The kernel module when it can run compiled (a GPU, not forced portable, and the kernel
    has not failed to compile in this process), else None: :func:`for_device` on ``"cuda"``."""
    return for_device(name, "cuda")


def for_device(name: str, device_type: str):
    """The kernel module to run on tensors of ``device_type``: :func:`compiled` on a GPU; on the
    CPU the module only while Triton's interpreter runs (``TRITON_INTERPRET=1``), and only for
    the callers that ask for it by name (the Gram stage with ``SAP_FAST_GRAM_KERNEL=triton``);
    None once the kernel has failed to compile in this process (:func:`broken`)."""
    return None if broken(name) or why_not(name, device_type) else load(name)[0]


def why_not(name: str, device_type: str) -> Optional[str]:
    """Why kernel module ``name`` cannot run on tensors of ``device_type`` (one line), or None.
    A kernel that failed to compile here is not among these: the chooser adds :func:`broken` to
    the reasons of every Triton implementation (:mod:`..dispatch`)."""
    if forced_portable():
        return "SAP_FAST_BACKEND=portable"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return load(name)[1]
    if device_type != "cpu":
        return f"no Triton kernels for {device_type} tensors"
    if switch("TRITON_INTERPRET") != "1":
        return "CPU tensors run the Triton kernels only under Triton's interpreter (TRITON_INTERPRET=1)"
    module, why = load(name)
    if module is None:
        return why
    if not module.interpreted():
        return "TRITON_INTERPRET=1 was set after the Triton kernels were imported (set it before importing sap_fast)"
    return None


def broken(name: str) -> Optional[str]:
    """Why kernel module ``name`` stopped being used in this process (it failed to compile), or None."""
    return _BROKEN.get(name)


def compile_failure(err: BaseException) -> bool:
    """Whether ``err`` was raised while Triton compiled a kernel (not while a compiled one ran):
    a Triton compile error (front end, ptxas, out of shared memory or registers), or any error
    raised from inside Triton's compiler or its backends (an MLIR pass that fails)."""
    try:
        from triton.errors import TritonError
        from triton.runtime.errors import InterpreterError
    except Exception:
        return False
    if isinstance(err, InterpreterError):  # the CPU interpreter ran the kernel: a kernel bug
        return False
    if isinstance(err, TritonError):
        return True
    import triton
    root = os.path.dirname(os.path.abspath(triton.__file__))
    compiler_dirs = tuple(os.path.join(root, d) + os.sep for d in ("compiler", "backends"))
    tb = err.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(compiler_dirs):
            return True
        tb = tb.tb_next
    return False


def _last_line(text) -> str:
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def summary(err: BaseException, limit: int = 300) -> str:
    """One line for a compile error: its type; for a Triton ``CompilationError`` the kernel
    source line it points at (its message starts with source lines); its last line of message;
    and the innermost error it chains, if any."""
    text = type(err).__name__
    node, src = getattr(err, "node", None), getattr(err, "src", None)
    line = getattr(node, "lineno", None)
    if src and line and line <= len(src.split("\n")):
        text += f" at {line}:{node.col_offset} `{src.split(chr(10))[line - 1].strip()}`"
        message = _last_line(getattr(err, "error_message", None))
    else:
        message = _last_line(err)
    if message:
        text += f": {message}"
    inner = err
    while inner.__cause__ is not None:
        inner = inner.__cause__
    if inner is not err:
        text += f" ({type(inner).__name__}" + (f": {_last_line(inner)})" if _last_line(inner) else ")")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def mark_broken(name: str, err: BaseException) -> str:
    """Stop using kernel module ``name`` in this process after ``err`` (a compile failure): warn
    once, naming the kernel, the Triton version and the error; return why (one line)."""
    import triton
    why = (f"the Triton {name} kernel does not compile here (triton {triton.__version__}: "
           f"{summary(err)}); {_FALLBACK[name]}")
    if name not in _BROKEN:
        _BROKEN[name] = why
        warnings.warn(f"sap_fast: {why}", RuntimeWarning, stacklevel=3)
    return _BROKEN[name]
