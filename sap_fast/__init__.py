"""sap_fast: Scaled Activation Projection (SAP) — one-shot correction of models trained on noisy labels.

The pipeline, one module per stage: :func:`select_trusted` (:mod:`.select`) → the covered
layers (:mod:`.targets`) and their hooks (:mod:`.capture`) → :func:`collect_stats` (:mod:`.accumulate`, :class:`Stats` in :mod:`.stats`)
→ spectra (:mod:`.spectrum`) or the Cholesky solve (:mod:`.solve`) → the update
(:class:`Projector`, :func:`correct`; :mod:`.project`) → :func:`sweep` to choose α
(:mod:`.sweep`); :mod:`.distributed` runs every stage over ``torch.distributed``.
:mod:`sap_fast.reference` is the slow float64 oracle every fast path is tested against.
The method step by step, its defaults and where they depart from the official code:
``docs/methods.md#sap``; what it costs on ResNet-50 and ViT-B/16: ``docs/cost-census.md``.

Below the core: :mod:`sap_fast.backends` (which kernel serves each stage, and the call) and
``sap_fast._runtime`` (running the model, data forms, checks, file writes).
Above it: :mod:`sap_fast.cli` (the ``sap-fast`` command), :mod:`sap_fast.experiments` (digits,
label noise, the demo, the comparison harness) and :mod:`sap_fast.baselines`.
"""
from importlib import metadata as _metadata

from . import distributed  # noqa: F401  (sap_fast.distributed.* is public)
from ._runtime.data import subset
from ._runtime.evaluate import evaluate
from .accumulate import collect_stats
from .backends.info import backend_info
from .project import Projector, correct
from .select import lowest_per_class, sample_scores, select_suspects, select_trusted
from .stats import LayerStats, Stats
from .sweep import DEFAULT_ALPHAS, SweepResult, SweepRow, sweep

try:  # the one version number is pyproject.toml's
    __version__ = _metadata.version("sap_fast")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["backend_info", "select_trusted", "select_suspects", "sample_scores", "lowest_per_class",
           "collect_stats", "Projector", "correct", "sweep", "Stats", "LayerStats",
           "SweepResult", "SweepRow", "DEFAULT_ALPHAS", "evaluate", "subset", "__version__"]
