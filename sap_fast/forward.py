"""Running the model over data: device, eval mode, input checks, and naming the failing layer.

Every stage that runs the model (scoring, statistics, evaluation) goes through
:func:`forward_batches`, so they share the same input checks and error messages.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from .data import batches, num_samples

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is a dependency, but a missing progress bar must not break the pipeline
    tqdm = None


def model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def resolve_device(model: nn.Module, device=None) -> torch.device:
    """The model's own device; ``device`` may only confirm it (the caller's model is never moved)."""
    have = model_device(model)
    if device is None:
        return have
    want = torch.device(device)
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise ValueError(f"device={str(want)!r} but the model is on {have}; move the model "
                         f"first (model.to({str(want)!r})) or pass device=None")
    return have


def check_alpha(alpha, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{name} must be finite and > 0 (the paper uses 1e4 to 1e6), got {alpha}")
    return float(alpha)


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _float_model(model: nn.Module) -> bool:
    has_float = any(p.is_floating_point() for p in model.parameters())
    embeds = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
    return has_float and not embeds


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration; every module's own ``training`` flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def failing_layer_tracker(model: nn.Module):
    """Record which modules are mid-forward, so an exception can name the innermost one."""
    stack: List[str] = []
    handles = []

    def enter(name):
        def hook(module, args):
            stack.append(name)
        return hook

    def leave(module, args, output):  # must return None: a returned value replaces the output
        if stack:
            stack.pop()

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name), prepend=True))
            handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


_PROGRESS_DEFAULT: Optional[bool] = None  # what enabled=None means; the CLI's --quiet sets False


def set_progress(enabled: Optional[bool]) -> None:
    """Progress bars everywhere: None = on interactive terminals (default), False = never."""
    global _PROGRESS_DEFAULT
    _PROGRESS_DEFAULT = enabled


def progress(iterable, *, desc: str, total: Optional[int] = None, enabled: Optional[bool] = None,
             unit: str = "it"):
    """A tqdm bar on interactive terminals (``enabled=None``), on demand, or none."""
    if enabled is None:
        enabled = _PROGRESS_DEFAULT
    if tqdm is None or enabled is False:
        return iterable
    return tqdm(iterable, desc=desc, total=total, disable=None if enabled is None else False,
                leave=False, unit=unit)


def forward_batches(model: nn.Module, data, *, batch_size: int, device: torch.device,
                    need_targets: bool = False, what: str = "data", desc: str = "forward",
                    show_progress: Optional[bool] = None, allow_empty: bool = False,
                    ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]:
    """Yield ``(inputs, targets, outputs)`` per batch, with the model in eval mode and no grad.

    Raises one-line errors for empty data (unless ``allow_empty``: a rank's empty shard),
    missing targets, integer inputs to a float model, and for inputs the model rejects (naming
    the innermost layer that raised).
    """
    check_batch_size(batch_size)
    n = num_samples(data)
    total = None if n is None else max(1, math.ceil(n / batch_size))
    seen = 0
    float_model = _float_model(model)
    with eval_mode(model), torch.no_grad(), failing_layer_tracker(model) as stack:
        for x, y in progress(batches(data, batch_size, what=what), desc=desc, total=total,
                             enabled=show_progress, unit="batch"):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{what} yielded inputs of type {type(x).__name__}; expected tensors")
            if x.shape[:1] == (0,):
                continue
            if need_targets and y is None:
                raise ValueError(f"{what} has no targets, but they are needed here; pass "
                                 "(inputs, targets) pairs, a TensorDataset(x, y) or a loader yielding (x, y)")
            if float_model and not x.is_floating_point():
                raise TypeError(f"{what} holds {x.dtype} inputs but the model computes in floating "
                                "point; convert them first (e.g. x.float() / 255)")
            x = x.to(device, non_blocking=True)
            y = None if y is None else y.to(device, non_blocking=True)
            stack.clear()
            try:
                out = model(x)
            except Exception as exc:  # re-raise with the layer that rejected the input
                where = f"layer '{stack[-1]}'" if stack else "the model"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(f"{what}: {where} rejected inputs of shape {tuple(x.shape)}: "
                                 f"{first}") from exc
            seen += x.shape[0]
            yield x, y, out
    if seen == 0 and not allow_empty:
        raise ValueError(f"{what} is empty; pass at least one sample")
