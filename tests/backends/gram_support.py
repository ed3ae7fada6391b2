"""Forcing the gram stage's choice in a test: :func:`force_gram`."""
from __future__ import annotations

from typing import Callable, Optional

import pytest

from sap_fast.backends import gram as gram_backend
from sap_fast.backends.dispatch import Implementation, Stage

_REAL = gram_backend.GRAM  # the stage's own implementations, whatever a test has forced


def force_gram(monkeypatch, pick: Callable[[gram_backend.GramCall], Optional[str]]) -> None:
    """Every gram-stage call runs the implementation ``pick(call)`` names (None = ``"rows"``: the
    caller streams rows), whatever its reasons; the implementations themselves run unchanged."""
    def run(call):
        return _REAL[pick(call) or "rows"].run(call)

    monkeypatch.setattr(gram_backend, "GRAM", Stage("gram", (Implementation("forced", "forced", lambda c: [], run),)))


def rows_only(monkeypatch) -> None:
    """Every gram-stage call streams rows (the portable path)."""
    force_gram(monkeypatch, lambda call: None)


def real_route(*args, **kwargs):
    """:func:`sap_fast.backends.gram.route` on the stage's own implementations, inside a test that
    forces the stage."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gram_backend, "GRAM", _REAL)
        return gram_backend.route(*args, **kwargs)
