"""sap_fast: Scaled Activation Projection (SAP) — one-shot correction of models trained on noisy labels.

The pipeline (one module per stage): :func:`select_trusted` → :func:`collect_stats` →
spectra → projection (:func:`correct`), and :func:`sweep` to choose α on a validation split.
:mod:`sap_fast.reference` is the slow float64 oracle every fast path is tested against.
"""
from . import distributed
from .accumulate import collect_stats
from .backend import backend_info
from .data import subset
from .evaluate import evaluate
from .project import correct
from .select import lowest_per_class, sample_scores, select_suspects, select_trusted
from .stats import LayerStats, Stats
from .sweep import DEFAULT_ALPHAS, SweepResult, SweepRow, sweep

__version__ = "0.1.0"

__all__ = ["backend_info", "select_trusted", "select_suspects", "sample_scores", "lowest_per_class",
           "collect_stats", "correct", "sweep", "Stats", "LayerStats",
           "SweepResult", "SweepRow", "DEFAULT_ALPHAS", "evaluate", "subset", "__version__"]
