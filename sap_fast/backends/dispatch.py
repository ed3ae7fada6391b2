"""Which implementation serves a stage's call: one chooser for every stage.

A stage (:class:`Stage`) is an ordered priority list of implementations (:class:`Implementation`).
Each implementation says why it cannot serve a call (:meth:`Implementation.not_supported_reasons`:
one-line strings, empty = it can) and runs it (``run(inputs)``). :func:`choose` picks the first
implementation with no reasons and lists every one it skipped with its reasons; :func:`call`
chooses and runs. ``inputs`` is the stage's own record of the call (tensors, the geometry, the
switches and installed backends it read), so a choice is a pure function of it: the stages'
tests and :func:`sap_fast.backend_info` build such records without running anything.

A Triton implementation (``triton_kernel`` set) that fails to *compile* on this machine (a
Triton release that rejects it, ptxas refusing it, too little shared memory) is handled here:
:func:`call` warns once, naming the kernel, the Triton version and the error, marks the kernel
broken for the rest of the process (its reasons then say why), and runs the next implementation
that supports the call. Errors of a kernel that compiled (a bad launch, a CUDA fault) propagate.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from . import triton

__all__ = ["Implementation", "Stage", "choose", "call", "Skipped"]

#: (implementation name, its reasons)
Skipped = Tuple[str, List[str]]


@dataclass(frozen=True)
class Implementation:
    """One way to serve a stage.

    ``name``: what :func:`sap_fast.backend_info` and ``sap-fast info`` print; ``label``: one line
    saying what it is (``"native: ..."``, ``"portable: ..."``); ``reasons(inputs)``: why it cannot
    serve ``inputs`` (empty = it can); ``run(inputs)``: the call; ``triton_kernel``: the Triton
    kernel module it launches (``"gram"``, ``"update"``), whose compile failures fall through
    to the next implementation."""
    name: str
    label: str
    reasons: Callable[[Any], List[str]]
    run: Callable[[Any], Any]
    triton_kernel: Optional[str] = None

    def not_supported_reasons(self, inputs) -> List[str]:
        """Why this implementation cannot serve ``inputs`` (one line each); empty = it can."""
        broken = triton.broken(self.triton_kernel) if self.triton_kernel else None
        return ([broken] if broken else []) + list(self.reasons(inputs))


@dataclass(frozen=True)
class Stage:
    """A stage's implementations, highest priority first; the last one serves every call."""
    name: str
    implementations: Tuple[Implementation, ...]

    def __getitem__(self, name: str) -> Implementation:
        for impl in self.implementations:
            if impl.name == name:
                return impl
        raise KeyError(f"stage {self.name} has no implementation {name!r}; it has "
                       f"{[i.name for i in self.implementations]}")

    @property
    def names(self) -> List[str]:
        return [impl.name for impl in self.implementations]


def _choose(implementations: Sequence[Implementation], inputs) -> Tuple[Implementation, List[Skipped]]:
    skipped: List[Skipped] = []
    for impl in implementations:
        reasons = impl.not_supported_reasons(inputs)
        if not reasons:
            return impl, skipped
        skipped.append((impl.name, reasons))
    raise RuntimeError(f"no implementation serves this call ({'; '.join(f'{n}: {r[0]}' for n, r in skipped)})")


def choose(stage: Stage, inputs) -> Tuple[Implementation, List[Skipped]]:
    """(the implementation that serves ``inputs``, [(each skipped implementation, its reasons)])."""
    return _choose(stage.implementations, inputs)


def call(stage: Stage, inputs):
    """Choose the implementation for ``inputs`` and run it; a Triton kernel that fails to
    compile here is marked broken (one warning) and the next supporting implementation runs."""
    remaining = stage.implementations
    while True:
        impl, _ = _choose(remaining, inputs)
        try:
            return impl.run(inputs)
        except Exception as err:
            if impl.triton_kernel is None or not triton.compile_failure(err):
                raise
            triton.mark_broken(impl.triton_kernel, err)
        remaining = remaining[remaining.index(impl) + 1:]
