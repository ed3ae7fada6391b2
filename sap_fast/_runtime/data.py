"""Turn every accepted form of ``data`` into batches of ``(inputs, targets | None)``.

``data`` may be a tensor of inputs, a pair ``(inputs, targets)`` of tensors, a map-style
``Dataset``, or a ``DataLoader`` / any re-iterable yielding tensors or
``(input, target, ...)`` tuples. Every stage of the pipeline reads data through
:func:`batches`, so the accepted forms are the same everywhere.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["Batch", "is_pair", "split_item", "batches", "num_samples", "subset"]

Batch = Tuple[torch.Tensor, Optional[torch.Tensor]]


def is_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)
            and data[0].shape[:1] == data[1].shape[:1])


def split_item(item, what: str) -> Batch:
    """A batch from a loader: a tensor, or a sequence whose first two items are input, target."""
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        target = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
        return item[0], target
    raise TypeError(f"{what} yielded a {type(item).__name__}; expected a tensor or an "
                    "(input, target, ...) tuple of tensors")


def batches(data, batch_size: int = 256, *, what: str = "data") -> Iterator[Batch]:
    """Yield ``(inputs, targets or None)`` batches; ``batch_size`` applies unless ``data`` batches itself."""
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start:start + batch_size], None
    elif is_pair(data):
        x, y = data
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
    elif isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        for item in loader:
            yield split_item(item, what)
    elif hasattr(data, "__iter__"):
        if iter(data) is data:
            raise TypeError(f"{what} is a one-shot iterator; pass a re-iterable (a list, Dataset "
                            "or DataLoader) since the pipeline may read it more than once")
        for item in data:
            yield split_item(item, what)
    else:
        raise TypeError(f"{what} is a {type(data).__name__}; pass a tensor, an (inputs, targets) "
                        "pair, a Dataset or a DataLoader")


def num_samples(data) -> Optional[int]:
    """Number of samples when it is known without iterating, else None."""
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if is_pair(data):
        return data[0].shape[0]
    if isinstance(data, DataLoader):
        try:
            return len(data.dataset)
        except TypeError:
            return None
    if isinstance(data, Dataset):
        try:
            return len(data)
        except TypeError:
            return None
    return None


def subset(data, indices: Sequence[int] | torch.Tensor):
    """The samples of ``data`` at ``indices``, in the same form as ``data`` (e.g. the trusted set)."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(data, torch.Tensor):
        return data[idx]
    if is_pair(data):
        return data[0][idx], data[1][idx]
    if isinstance(data, DataLoader):
        return DataLoader(Subset(data.dataset, idx.tolist()), batch_size=data.batch_size,
                          shuffle=False, collate_fn=data.collate_fn, num_workers=data.num_workers)
    if isinstance(data, Dataset):
        return Subset(data, idx.tolist())
    if isinstance(data, (list, tuple)):  # a list of batches: flatten to samples, then pick
        inputs, targets = zip(*(split_item(b, "data") for b in data))
        x = torch.cat(inputs)[idx]
        if any(t is None for t in targets):
            return x
        return x, torch.cat(targets)[idx]
    raise TypeError(f"cannot take a subset of a {type(data).__name__}; pass a tensor, an "
                    "(inputs, targets) pair, a Dataset, a DataLoader or a list of batches")
