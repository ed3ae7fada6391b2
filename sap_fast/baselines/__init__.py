"""The methods SAP is compared with, under one calling convention:

    method(model, retain, forget, **hyperparameters) -> nn.Module

``model`` is never changed (a corrected copy comes back; ``inplace=True`` changes it instead),
``retain`` and ``forget`` are labelled data (an ``(inputs, targets)`` pair, a Dataset or a
DataLoader), the defaults are the papers' (see each module and ``docs/methods.md``), ``seed``
fixes every random choice (a fixed seed gives the same weights on CPU), and a bad
hyperparameter is a one-line error naming the method. For label-noise correction the forget
set is :func:`sap_fast.select_suspects` and the retain set :func:`sap_fast.select_trusted`.
"""
from .finetune import finetune
from .gradient_ascent import gradient_ascent
from .manif import manif_smc
from .random_labels import random_labels
from .scrub import scrub
from .ssd import ssd
from .ugradsl import gls_loss, ugradsl, ugradsl_plus

METHODS = {
    "finetune": finetune,
    "gradient_ascent": gradient_ascent,
    "random_labels": random_labels,
    "ssd": ssd,
    "scrub": scrub,
    "ugradsl": ugradsl,
    "ugradsl_plus": ugradsl_plus,
    "manif_smc": manif_smc,
}

__all__ = ["METHODS", "gls_loss", *METHODS]
