"""The layers SAP covers: which modules, how ``layers=`` selects them, how attention splits into
q/k/v/out_proj targets, and how each target's weight is read and written.

A *target* is one projected weight with one input Gram:

- ``nn.Linear`` and ``nn.Conv1d/2d/3d``: the module's qualified name; a conv with ``groups > 1``
  has one Gram per group and its weight is handled as ``(groups, out/groups, d)``.
- ``nn.MultiheadAttention`` named ``m``: ``m.q``, ``m.k``, ``m.v`` (row blocks of
  ``in_proj_weight``, or ``q/k/v_proj_weight``, each with the Gram of its own input) and
  ``m.out_proj`` (input: the concatenated heads, which no forward hook sees).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ._runtime.checks import plain_model

__all__ = ["CONV_TYPES", "COVERED", "Target", "module_targets", "all_targets", "select_targets",
           "input_fits"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
COVERED = "nn.Linear, nn.Conv1d/2d/3d and nn.MultiheadAttention"


@dataclass(frozen=True)
class Target:
    name: str                 # record name in Stats
    owner: str                # the covered module (Linear, Conv, MultiheadAttention) it belongs to
    module: str               # qualified name of the module holding the parameter
    attr: str                 # parameter attribute on that module
    rows: Optional[Tuple[int, int]]  # row block of the parameter (MHA in_proj), None = all
    d: int                    # input width per group
    groups: int

    def weight(self, modules: Dict[str, nn.Module]) -> torch.Tensor:
        """The weight as ``(groups, out/groups, d)`` (a view of the parameter)."""
        w = getattr(modules[self.module], self.attr)
        if self.rows is not None:
            w = w[self.rows[0]:self.rows[1]]
        return w.reshape(self.groups, -1, self.d)

    def write(self, modules: Dict[str, nn.Module], value: torch.Tensor) -> None:
        w = getattr(modules[self.module], self.attr)
        if self.rows is not None:
            w = w[self.rows[0]:self.rows[1]]
        with torch.no_grad():
            w.copy_(value.reshape(w.shape).to(w.dtype))


def _conv_target(name: str, conv: nn.Module) -> Target:
    d = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return Target(name, name, name, "weight", None, d, conv.groups)


def _mha_targets(name: str, mha: nn.MultiheadAttention) -> List[Target]:
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        qkv = [Target(f"{name}.{p}", name, name, "in_proj_weight", (i * e, (i + 1) * e), e, 1)
               for i, p in enumerate("qkv")]
    else:
        qkv = [Target(f"{name}.q", name, name, "q_proj_weight", None, e, 1),
               Target(f"{name}.k", name, name, "k_proj_weight", None, mha.kdim, 1),
               Target(f"{name}.v", name, name, "v_proj_weight", None, mha.vdim, 1)]
    return qkv + [Target(f"{name}.out_proj", name, f"{name}.out_proj", "weight", None, e, 1)]


def module_targets(name: str, module: nn.Module) -> List[Target]:
    """The targets of one module (empty if SAP does not cover it)."""
    if isinstance(module, nn.MultiheadAttention):
        return _mha_targets(name, module)
    if isinstance(module, CONV_TYPES):
        return [_conv_target(name, module)]
    if isinstance(module, nn.Linear) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return [Target(name, name, name, "weight", None, module.in_features, 1)]
    return []


def all_targets(model: nn.Module) -> List[Target]:
    """Every covered target of the model, in module order."""
    mha_out = {f"{n}.out_proj" for n, m in model.named_modules()
               if isinstance(m, nn.MultiheadAttention)}
    found = []
    for name, module in model.named_modules():
        if name in mha_out:  # handled by its MultiheadAttention: hooks on out_proj never fire
            continue
        found.extend(module_targets(name, module))
    return found


def select_targets(model: nn.Module, layers=None) -> List[Target]:
    """Resolve ``layers=`` (None, names, module types, or a ``predicate(name, module)``)."""
    plain_model(model)
    targets = all_targets(model)
    if not targets:
        raise ValueError(f"the model has no layer SAP covers ({COVERED})")
    if layers is None:
        return targets
    modules = dict(model.named_modules())
    if callable(layers) and not isinstance(layers, type):
        chosen = [t for t in targets if layers(t.owner, modules[t.owner])]
    else:
        specs = [layers] if isinstance(layers, (str, type)) else list(layers)
        names = set()
        for spec in specs:
            if isinstance(spec, type):
                names |= {t.name for t in targets if isinstance(modules[t.owner], spec)}
            elif isinstance(spec, str):
                names |= _names_for(spec, targets, modules)
            else:
                raise TypeError(f"layers entries must be module names or types, got {type(spec).__name__}")
        chosen = [t for t in targets if t.name in names]
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no layer SAP covers ({COVERED})")
    return chosen


def _names_for(spec: str, targets: List[Target], modules: Dict[str, nn.Module]) -> set:
    """A record name, a covered module, or a container (every covered layer inside it)."""
    if any(t.name == spec for t in targets):
        return {spec}
    if spec not in modules:
        known = ", ".join(t.name for t in targets[:8]) + (", ..." if len(targets) > 8 else "")
        raise ValueError(f"layers: the model has no module named {spec!r} (covered layers: {known})")
    inside = {t.name for t in targets if t.owner == spec or t.owner.startswith(spec + ".") or spec == ""}
    if not inside:
        raise ValueError(f"layers: {spec!r} is a {type(modules[spec]).__name__}, which SAP does "
                         f"not cover ({COVERED})")
    return inside


def input_fits(module: nn.Module, x) -> bool:
    """Whether a covered layer's input (an MHA call's bound arguments) has the width the layer
    reads. A hook that sees one that does not leaves it alone, so the layer's own forward
    raises PyTorch's message (not a reshape error from inside the statistics)."""
    if isinstance(module, nn.MultiheadAttention):
        q, k, v = (x[n] for n in ("query", "key", "value"))
        return all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in (q, k, v)) and \
            (q.shape[-1], k.shape[-1], v.shape[-1]) == (module.embed_dim, module.kdim, module.vdim)
    if not isinstance(x, torch.Tensor):
        return False
    if isinstance(module, CONV_TYPES):
        spatial = len(module.kernel_size)
        return x.dim() in (spatial + 1, spatial + 2) and x.shape[-spatial - 1] == module.in_channels
    return x.dim() >= 1 and x.shape[-1] == module.in_features
