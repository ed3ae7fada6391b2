"""Argument checks and resolution, done once at the public boundary.

Every public function of sap_fast validates its arguments with these functions and resolves the
ones that name a resource (the device, the process group) into a :class:`RunOptions`; the
internal functions it calls take those resolved values and check nothing again. Each check
raises a one-line ``ValueError``/``TypeError`` that names the argument, what is allowed, and
what was given. ``where`` (optional) prefixes the message, e.g. with a baseline's name.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


__all__ = ["first_line", "torch_load_problem", "NonFiniteSample", "first_non_finite_tensor",
           "finite_parameters", "non_finite_kind", "number", "positive_int", "choice", "alpha",
           "SOLVERS", "solver", "plain_model", "model_device", "resolve_device", "resolve_group",
           "AMP", "amp_dtype", "RunOptions", "run_options"]


def first_line(err: BaseException) -> str:
    """An exception's message on one line (its first), or its type's name when it has none: what
    every one-line error that reports another error quotes."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def torch_load_problem(err: BaseException) -> str:
    """What a failed ``torch.load(..., weights_only=True)`` says about the file, in our words
    (torch's own message is a paragraph about pickles and PyTorch versions)."""
    text = str(err)
    if "Unsupported global" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        return (f"it holds pickled objects{f' ({found.group(1)})' if found else ''}, not only tensors, lists, "
                "dicts and numbers, and those are never loaded: a pickle can run code")
    if "Weights only load failed" in text or "zip archive" in text or "magic number" in text \
            or type(err).__name__ in ("UnpicklingError", "EOFError"):
        return "it is not a file torch.save wrote, or a damaged or truncated one"
    return f"{type(err).__name__}: {first_line(err)}"


class NonFiniteSample(ValueError):
    """A sample whose outputs (logits, scores) hold NaN/Inf in a pass over data: ``stage`` names
    the pass (``"scoring"``, ``"validation α=100"``, …), ``index`` the sample's position in the
    data that pass was given (callers that passed a part of their data name the whole)."""

    def __init__(self, stage: str, index: int, what: str = "data", found: str = "logits", hint: str = ""):
        self.stage, self.index, self.what, self.found = stage, int(index), what, found
        super().__init__(f"{stage}: sample {self.index} of {what} gives non-finite {found} (NaN/Inf); "
                         f"check that input and the model's weights{hint}")


def first_non_finite_tensor(named) -> Optional[str]:
    """The name of the first floating-point tensor of ``named`` (``(name, tensor)`` pairs) that
    holds NaN/Inf, or None: one host read per device for all of them, none per tensor."""
    items = [(n, t) for n, t in named if t.is_floating_point() or t.is_complex()]
    by_device = {}
    for i, (_, t) in enumerate(items):
        by_device.setdefault(t.device, []).append(i)
    finite = [True] * len(items)
    for positions in by_device.values():
        flags = torch.stack([torch.isfinite(items[i][1]).all() for i in positions]).tolist()
        for i, ok in zip(positions, flags):
            finite[i] = ok
    return next((items[i][0] for i, ok in enumerate(finite) if not ok), None)


def finite_parameters(module: nn.Module) -> nn.Module:
    """``module`` if every floating-point parameter and buffer is finite (one host read per
    device); else a one-line error naming the first tensor that is not."""
    named = [*module.named_parameters(), *module.named_buffers()]
    bad = first_non_finite_tensor(named)
    if bad is not None:
        raise ValueError(f"the model's tensor '{bad}' holds {non_finite_kind(dict(named)[bad])} values; "
                         "SAP needs finite weights: check the checkpoint it was loaded from")
    return module


def non_finite_kind(t: torch.Tensor) -> str:
    """What a tensor that is not all finite holds: ``"NaN"``, ``"Inf"`` or ``"NaN and Inf"``."""
    nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    return "NaN and Inf" if nan and inf else "NaN" if nan else "Inf"


def _prefix(where: Optional[str]) -> str:
    return f"{where}: " if where else ""


def number(value, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = True, high_open: bool = False, integer: bool = False,
           where: Optional[str] = None) -> float:
    """``value`` if it is a finite number (an int when ``integer``) in the stated range."""
    kind = "an int" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)):
        raise TypeError(f"{_prefix(where)}{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{_prefix(where)}{name} must be finite, got {value}")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        span = (f"in {lo}, {hi}" if low is not None and high is not None
                else f"{'>' if low_open else '>='} {low}" if low is not None
                else f"{'<' if high_open else '<='} {high}")
        raise ValueError(f"{_prefix(where)}{name} must be {span}, got {value}")
    return value


def positive_int(value, name: str, *, minimum: int = 1, allow_none: bool = False,
                 where: Optional[str] = None) -> Optional[int]:
    """``value`` if it is an int ``>= minimum`` (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{_prefix(where)}{name} must be {what}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return value


def choice(value, name: str, choices: Sequence, *, hint: str = "", where: Optional[str] = None):
    """``value`` if it is one of ``choices``; ``hint`` explains them in the message."""
    if value not in choices:
        raise ValueError(f"{_prefix(where)}{name} must be one of {tuple(choices)}{hint}, got {value!r}")
    return value


def alpha(value, name: str = "alpha") -> float:
    """A scale α: a finite number > 0 (0-d tensors and numpy scalars are accepted)."""
    if hasattr(value, "item") and not isinstance(value, (bool, int, float)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0 (the paper uses 1e4 to 1e6), got {value}")
    return float(value)


SOLVERS = ("eigh", "cholesky")  # and "auto": resolved by sap_fast.project.resolve_solver


def solver(value) -> str:
    """``"auto"``, ``"eigh"`` or ``"cholesky"``."""
    if isinstance(value, str) and value == "auto":
        return value
    return choice(value, "solver", SOLVERS,
                  hint=" ('eigh': one eigendecomposition shared by every α; 'cholesky': one "
                       "factorisation per α, no spectrum) or 'auto' (the default: 'cholesky' for "
                       "one α, 'eigh' for several α or spectra)")


def plain_model(value) -> nn.Module:
    """A plain ``nn.Module`` (not wrapped for data parallelism)."""
    if isinstance(value, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError("model is wrapped in DataParallel/DistributedDataParallel; pass model.module")
    if not isinstance(value, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(value).__name__}")
    return value


def model_device(module: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; the CPU for a model with neither."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def resolve_device(module: nn.Module, device=None) -> torch.device:
    """The model's own device; ``device`` may only confirm it (the caller's model is never moved)."""
    have = model_device(module)
    if device is None:
        return have
    want = torch.device(device)
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise ValueError(f"device={str(want)!r} but the model is on {have}; move the model "
                         f"first (model.to({str(want)!r})) or pass device=None")
    return have


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_group(value=None):
    """The group to work over, or None for the local (single-process) code path.

    ``None`` = the default group when ``torch.distributed`` is initialised, else local;
    ``False`` = local; ``True`` = the default group (an error if none is initialised); or a
    ``ProcessGroup``. A group of one rank is local.
    """
    if value is False:
        return None
    if value is None:
        if not _initialized():
            return None
        group = dist.group.WORLD
    elif value is True or isinstance(value, dist.ProcessGroup):
        if not _initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized; call "
                             "torch.distributed.init_process_group first (torchrun sets its environment) "
                             "or pass process_group=None")
        group = dist.group.WORLD if value is True else value
    else:
        raise TypeError(f"process_group must be None, True, False or a torch.distributed ProcessGroup, "
                        f"got {type(value).__name__}")
    return group if dist.get_world_size(group) > 1 else None


AMP = (None, "bf16", "fp16")


def amp_dtype(value) -> Optional[torch.dtype]:
    """``amp=`` as the autocast dtype: None (full precision), ``"bf16"`` or ``"fp16"``."""
    choice(value, "amp", AMP, hint=" (mixed precision for the passes that only rank or evaluate)")
    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[value]


@dataclass(frozen=True)
class RunOptions:
    """How a public call runs, resolved once: the model's device, samples per forward pass, the
    process group (None = local), progress bars (None = on interactive terminals), and the
    autocast dtype of the passes that only rank or evaluate (None = full precision)."""
    device: torch.device
    batch_size: int
    group: object = None
    show_progress: Optional[bool] = None
    amp: Optional[torch.dtype] = None


def run_options(module: nn.Module, *, device=None, batch_size: int = 256, process_group=None,
                show_progress: Optional[bool] = None, amp=None) -> RunOptions:
    """Check and resolve the arguments every pass over data shares."""
    return RunOptions(device=resolve_device(plain_model(module), device),
                      batch_size=positive_int(batch_size, "batch_size"),
                      group=resolve_group(process_group),
                      show_progress=show_progress, amp=amp_dtype(amp))
