"""The validation and test splits of ``sap-fast correct``, decoded once.

The α sweep evaluates the same validation images once per α (the 11-α grid and "no projection":
12 passes, more with ``--alphas auto``), and ``--test`` evaluates the test images once per α too.
Decoding a JPEG, resizing and cropping it costs far more than a small model's forward pass, so a
split read more than once is decoded in its first pass only: each image's uint8 pixels, after
resizing and cropping and before scaling and normalisation (:meth:`Preprocess.pixels`), go into
one ``(N, C, H, W)`` uint8 tensor, and every later pass batches from it, scaling each batch as the
decoding path scales each image (:meth:`Preprocess.scale`: the same float32 operations, so the
batches are the same bit for bit, and so is the sweep).

Where the tensor lives (``--eval-cache``): ``auto`` (the default) keeps it in memory while the
splits fit ``--eval-cache-gib`` (default: a quarter of the machine's memory), else in a
memory-mapped file in the folder where the outputs are staged; ``memory`` and ``disk`` force one
or the other; ``off`` decodes every pass again. A 224×224 RGB image takes 147 KiB, so the
default budget holds about 7 100 images per GiB of it. The file is removed as soon as it is
mapped (the mapping keeps its pages), so no run, finished, failed or killed, leaves it behind;
its space is reserved up front, so a full disk is an error at the start, not in the middle.
Data that is not decoded (a ``.pt`` file of tensors) is read as it is.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .data import LoadError, Preprocess, StreamLoader, collate, loader

MODES = ("auto", "memory", "disk", "off")
MIXED = "not kept: images of more than one size"
__all__ = ["EvalCache", "DecodedLoader", "MODES", "add_arguments", "default_budget_gib"]


def default_budget_gib() -> float:
    """A quarter of the machine's physical memory, in GiB (4 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 / 2 ** 30
    except (AttributeError, ValueError, OSError):
        return 4.0


def add_arguments(group) -> None:
    group.add_argument("--eval-cache", choices=MODES, default="auto",
                       help="the validation and test images, decoded once into uint8 pixels that every α's "
                            "evaluation reads: auto (default) in memory within --eval-cache-gib, else in a "
                            "memory-mapped file beside --out (removed at once, nothing is left); memory; "
                            "disk; off (decode every pass again)")
    group.add_argument("--eval-cache-gib", type=float, metavar="GIB",
                       help="memory the decoded splits may take with --eval-cache auto (default: a quarter "
                            "of the machine's memory)")


def _decodes(dataset) -> bool:
    return callable(getattr(dataset, "pixels", None)) and isinstance(getattr(dataset, "preprocess", None), Preprocess)


def _images_of(dataset: Dataset) -> Tuple[Optional[Dataset], Optional[list]]:
    """The image dataset that decodes ``dataset``'s samples (one with ``pixels(i)`` and a
    ``preprocess``: the folders and Clothing1M) and their positions in it; (None, None) for data
    that is not decoded."""
    if _decodes(dataset):
        return dataset, None
    if isinstance(dataset, Subset) and _decodes(dataset.dataset):
        return dataset.dataset, list(dataset.indices)
    return None, None


class _Pixels(Dataset):
    """``(uint8 pixels, label)`` of the samples of an image dataset (or a subset of one)."""

    def __init__(self, images: Dataset, positions: Optional[list], targets: torch.Tensor):
        self.images, self.positions, self.targets = images, positions, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        at = i if self.positions is None else self.positions[i]
        return self.images.pixels(at), int(self.targets[i])


class EvalCache:
    """The run's choice (``mode``) and what is left of its memory budget; :meth:`loader` gives
    each split its loader. ``folder``: where a memory-mapped cache file is made."""

    def __init__(self, mode: str = "auto", budget_gib: Optional[float] = None, folder: Optional[str] = None):
        if mode not in MODES:
            raise ValueError(f"--eval-cache {mode}: use one of {', '.join(MODES)}")
        if budget_gib is not None and not budget_gib >= 0:
            raise ValueError(f"--eval-cache-gib must be >= 0, got {budget_gib}")
        self.mode = mode
        self.budget = int((default_budget_gib() if budget_gib is None else budget_gib) * 2 ** 30)
        self.folder = folder
        self.loaders = {}  # what: DecodedLoader

    @classmethod
    def from_args(cls, args: argparse.Namespace, folder: Optional[str] = None) -> "EvalCache":
        return cls(getattr(args, "eval_cache", "auto"), getattr(args, "eval_cache_gib", None), folder)

    def loader(self, dataset: Dataset, *, what: str, batch_size: int, workers: int = 0, device="cpu"):
        """A loader of ``[inputs, targets]`` batches of ``dataset``: decoded once (a
        :class:`DecodedLoader`) when it holds images and the cache is on, else the streaming one."""
        images, positions = _images_of(dataset)
        if self.mode == "off" or images is None:
            return loader(dataset, batch_size=batch_size, workers=workers, device=device)
        self.loaders[what] = DecodedLoader(_Pixels(images, positions, dataset.targets), images.preprocess, self,
                                           what=what, batch_size=batch_size, workers=workers, device=device)
        return self.loaders[what]

    def summary(self) -> dict:
        """Per split: where its pixels were kept and how many bytes (for the report)."""
        return {what: {"where": l.where, "bytes": l.nbytes} for what, l in self.loaders.items()}

    def _place(self, nbytes: int) -> str:
        """``memory`` or ``disk`` for ``nbytes`` more, taking them from the budget if in memory."""
        if self.mode == "memory" or (self.mode == "auto" and nbytes <= self.budget):
            self.budget -= nbytes if self.mode == "auto" else 0
            return "memory"
        return "disk"


def _mapped(folder: Optional[str], shape: Tuple[int, ...], what: str) -> torch.Tensor:
    """A uint8 tensor of ``shape`` in a memory-mapped file in ``folder`` (its nearest existing
    ancestor while it is not there yet: nothing is created), removed from the folder at once."""
    folder = os.path.abspath(folder or tempfile.gettempdir())
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    nbytes = int(np.prod(shape))
    fd, path = tempfile.mkstemp(prefix=".sap_fast-eval-cache-", suffix=".u8", dir=folder)
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)  # the space now, not a SIGBUS when the disk fills
            else:
                os.ftruncate(fd, nbytes)
        except OSError as err:
            raise LoadError(f"{what}: no room for its decoded images ({nbytes / 2 ** 30:.2f} GiB) in {folder} "
                            f"({err.strerror}); free some, or pass --eval-cache memory or off") from None
        array = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    finally:
        os.close(fd)
        try:
            os.unlink(path)  # the mapping keeps the pages; the name goes now
        except OSError:
            pass
    return torch.from_numpy(array)


class DecodedLoader(StreamLoader):
    """The loader of one split: its first complete pass decodes every image (in ``workers``
    processes, as the streaming loader does) and keeps its pixels; every later pass batches from
    them. The same batches in the same order as the streaming loader, bit for bit. A pass that
    stops early, or images that come out at different sizes, leave nothing kept: the next pass
    decodes again."""

    def __init__(self, pixels: _Pixels, preprocess: Preprocess, cache: EvalCache, *, what: str,
                 batch_size: int, workers: int, device):
        if int(batch_size) < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        if int(workers) < 0:
            raise ValueError(f"--workers must be 0 or more, got {workers}")
        extra = dict(prefetch_factor=4) if workers > 0 else {}  # workers end with the decoding pass
        super().__init__(pixels, batch_size=int(batch_size), shuffle=False, num_workers=int(workers),
                         collate_fn=collate, **extra)
        self.preprocess, self.cache, self.what = preprocess, cache, what
        self.pin = torch.device(device).type == "cuda"
        self.store: Optional[torch.Tensor] = None
        self.targets: Optional[torch.Tensor] = None
        self.where: Optional[str] = None
        self.nbytes = 0
        self.complete = False

    def __iter__(self):
        if self.complete:
            yield from self._kept()
            return
        done, keep = 0, self.where != MIXED
        for pixels, labels in super().__iter__():
            if keep:
                keep = self._keep(done, pixels, labels)
            done += pixels.shape[0]
            yield [self._scaled(pixels), labels]
        self.complete = keep and self.store is not None and done == self.store.shape[0]

    def _keep(self, start: int, pixels: torch.Tensor, labels: torch.Tensor) -> bool:
        if self.store is None:
            n = len(self.dataset)
            shape = (n, *pixels.shape[1:])
            self.nbytes = int(np.prod(shape))
            self.where = self.where or self.cache._place(self.nbytes)
            self.store = torch.empty(shape, dtype=torch.uint8) if self.where == "memory" else \
                _mapped(self.cache.folder, shape, self.what)
            self.targets = torch.empty(n, dtype=labels.dtype)
        if tuple(pixels.shape[1:]) != tuple(self.store.shape[1:]):  # images of another size: stream
            self.store = self.targets = None
            self.where, self.nbytes = MIXED, 0
            return False
        self.store[start:start + pixels.shape[0]] = pixels
        self.targets[start:start + labels.shape[0]] = labels
        return True

    def _kept(self):
        step = self.batch_size
        for start in range(0, self.store.shape[0], step):
            yield [self._scaled(self.store[start:start + step]), self.targets[start:start + step]]

    def _scaled(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.preprocess.scale(pixels)
        return x.pin_memory() if self.pin else x
