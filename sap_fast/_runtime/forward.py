"""Running the model over data: device, eval mode, input checks, and naming the failing layer.

Every stage that runs the model (scoring, statistics, evaluation) goes through
:func:`forward_batches`, so they share the same input checks and error messages.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from .data import batches, num_samples
from .checks import first_line
from .memory import release_freed

__all__ = ["eval_mode", "failing_layer_tracker", "set_progress", "progress", "SampleBar",
           "forward_batches"]

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is a dependency, but a missing progress bar must not break the pipeline
    tqdm = None


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


def set_progress(enabled: Optional[bool]) -> Optional[bool]:
    """Progress bars everywhere: None = on interactive terminals (default), True = always,
    False = never. Returns the previous setting."""
    global _PROGRESS_DEFAULT
    previous, _PROGRESS_DEFAULT = _PROGRESS_DEFAULT, enabled
    return previous


def progress(iterable, *, desc: str, total: Optional[int] = None, enabled: Optional[bool] = None,
             unit: str = "it"):
    """A tqdm bar on interactive terminals (``enabled=None``), on demand, or none."""
    if enabled is None:
        enabled = _PROGRESS_DEFAULT
    if tqdm is None or enabled is False:
        return iterable
    return tqdm(iterable, desc=desc, total=total, disable=None if enabled is None else False,
                leave=False, unit=unit)


class SampleBar:
    """A bar counted in samples (images/s and ETA), created at the first batch (so the unit can
    say "img" for image batches), starting from ``initial`` samples already done; a no-op where
    progress is off (``enabled``: as in :func:`progress`)."""

    def __init__(self, desc: str, total: Optional[int], enabled: Optional[bool] = None, initial: int = 0):
        if enabled is None:
            enabled = _PROGRESS_DEFAULT
        self.desc, self.total, self.initial, self.bar = desc, total, initial, None
        self.on = tqdm is not None and enabled is not False
        self.disable = None if enabled is None else False

    def update(self, x: torch.Tensor) -> None:
        if not self.on:
            return
        if self.bar is None:
            unit = "img" if x.dim() == 4 else "sample"
            self.bar = tqdm(desc=self.desc, total=self.total, initial=self.initial, disable=self.disable,
                            leave=False, unit=unit, unit_scale=True, dynamic_ncols=True)
        self.bar.update(x.shape[0])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def forward_batches(model: nn.Module, data, *, batch_size: int, device: torch.device,
                    need_targets: bool = False, what: str = "data", desc: str = "forward",
                    show_progress: Optional[bool] = None, allow_empty: bool = False,
                    amp: Optional[torch.dtype] = None,
                    ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]:
    """Yield ``(inputs, targets, outputs)`` per batch, with the model in eval mode and no grad;
    ``amp``: run the forward under ``torch.autocast`` in that dtype (only for passes that rank
    or evaluate; the statistics pass never sets it).

    Raises one-line errors for empty data (unless ``allow_empty``: a rank's empty shard),
    missing targets, integer inputs to a float model, and for inputs the model rejects (naming
    the innermost layer that raised).
    """
    seen = 0
    float_model = _float_model(model)
    bar = SampleBar(desc, num_samples(data), show_progress)
    try:
        with eval_mode(model), torch.no_grad(), failing_layer_tracker(model) as stack:
            for x, y in batches(data, batch_size, what=what):
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"{what} yielded inputs of type {type(x).__name__}; expected tensors")
                if x.shape[:1] == (0,):
                    continue
                if need_targets and y is None:
                    raise ValueError(f"{what} has no targets, but they are needed here; pass (inputs, "
                                     "targets) pairs, a TensorDataset(x, y) or a loader yielding (x, y)")
                if float_model and not x.is_floating_point():
                    raise TypeError(f"{what} holds {x.dtype} inputs but the model computes in floating "
                                    "point; convert them first (e.g. x.float() / 255)")
                x = x.to(device, non_blocking=True)
                y = None if y is None else y.to(device, non_blocking=True)
                stack.clear()
                try:
                    with _autocast(device, amp):
                        out = model(x)
                except Exception as exc:  # re-raise with the layer that rejected the input
                    where = f"layer '{stack[-1]}'" if stack else "the model"
                    raise ValueError(f"{what}: {where} rejected inputs of shape {tuple(x.shape)}: "
                                     f"{first_line(exc)}") from exc
                seen += x.shape[0]
                yield x, y, out
                bar.update(x)
                if device.type == "cpu":
                    release_freed(x.numel() * x.element_size())
    finally:
        bar.close()
    if seen == 0 and not allow_empty:
        raise ValueError(f"{what} is empty; pass at least one sample")
