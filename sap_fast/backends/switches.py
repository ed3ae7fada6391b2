"""The environment switches of the backends, read in one place (:func:`switch`).

============================  ==========================================  ===================
variable                      values (first = default)                    stage
============================  ==========================================  ===================
``SAP_FAST_BACKEND``          ``auto``, ``portable`` (plain torch only)   every stage
``SAP_FAST_GRAM_KERNEL``      ``auto``, ``cuda``, ``cupy``, ``triton``,   accumulate (Gram)
                              ``shift``
``SAP_FAST_GRAM_DMMA``        ``auto`` (also ``1``, ``on``), ``0``        accumulate (CUDA
                              (also ``off``)                              float64 Gram tiles)
``SAP_FAST_BATCHED_EIGH``     ``auto``, ``cupy``                          spectrum
``SAP_FAST_BATCHED_CHOLESKY`` ``auto``, ``cupy``                          solve
``SAP_FAST_TRITON_AUTOTUNE``  ``1`` (also ``on``), ``0`` (also ``off``)   project (Triton
                                                                          update tiles)
``TRITON_INTERPRET``          ``0``, ``1`` (Triton's own switch: its      accumulate (Triton
                              interpreter runs the kernels on the CPU)    on the CPU)
============================  ==========================================  ===================

Each is read on every call (a test or a benchmark may change it between calls); an unknown
value is an error that names the variable and its allowed values.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

__all__ = ["SWITCHES", "switch", "switches"]

#: variable → (allowed values, default first; aliases → the value they stand for; the hint an
#: unknown value gets, None = "one of" the allowed values)
SWITCHES: Dict[str, Tuple[Tuple[str, ...], Dict[str, str], Optional[str]]] = {
    "SAP_FAST_BACKEND": (("auto", "portable"), {}, None),
    "SAP_FAST_GRAM_KERNEL": (("auto", "cuda", "cupy", "triton", "shift"), {}, None),
    "SAP_FAST_GRAM_DMMA": (("auto", "0"), {"1": "auto", "on": "auto", "off": "0"}, "auto, 0 or 1"),
    "SAP_FAST_BATCHED_EIGH": (("auto", "cupy"), {}, None),
    "SAP_FAST_BATCHED_CHOLESKY": (("auto", "cupy"), {}, None),
    "SAP_FAST_TRITON_AUTOTUNE": (("1", "0"), {"on": "1", "off": "0"}, "1 or 0"),
    "TRITON_INTERPRET": (("0", "1"), {"false": "0", "off": "0", "true": "1", "on": "1"}, "0 or 1"),
}


def switch(variable: str) -> str:
    """The value of one switch (lower case, aliases resolved; unset or empty = the default).

    Raises ValueError, in one line, for a value the switch does not take."""
    choices, aliases, hint = SWITCHES[variable]
    given = os.environ.get(variable, "").strip().lower() or choices[0]
    value = aliases.get(given, given)
    if value not in choices:
        raise ValueError(f"{variable}={given!r}: use {hint or f'one of {choices}'}")
    return value


def switches() -> Dict[str, str]:
    """Every switch and its value now."""
    return {variable: switch(variable) for variable in SWITCHES}
