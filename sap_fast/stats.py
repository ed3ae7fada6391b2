"""Per-layer input statistics: the streamed Gram ``RᵀR`` (or, while there are fewer rows than the
width, the rows themselves), mergeable across shards and saved to one file.

Keeping rows while ``count <= d`` is what makes wide, short layers (ResNet-50's classifier at
1000 samples: 1000 rows of width 2048) cheap: a thin SVD of the rows instead of a ``d × d`` Gram,
and the update never builds a ``d × d`` matrix. Past ``d`` rows the Gram is smaller than the rows.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List, Mapping, Optional

import torch

from ._runtime.checks import first_line, torch_load_problem
from ._runtime.io import atomic_write

__all__ = ["FORMAT", "VERSION", "LayerStats", "Stats"]

FORMAT = "sap_fast.stats"
VERSION = 1


class LayerStats:
    """Input statistics of one target: ``groups`` Grams of width ``d`` over ``count`` rows each."""

    def __init__(self, d: int, groups: int = 1, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu"):
        self.d, self.groups, self.dtype, self.device = d, groups, dtype, torch.device(device)
        self.count = 0
        self._chunks: List[torch.Tensor] = []   # rows, while count <= d
        self._gram: Optional[torch.Tensor] = None

    # -- accumulation -------------------------------------------------------------------------
    def add(self, chunk: torch.Tensor) -> None:
        """Add a ``(groups, m, d)`` block of rows (already in ``self.dtype``)."""
        if chunk.shape[0] != self.groups or chunk.shape[-1] != self.d:
            raise ValueError(f"rows of shape {tuple(chunk.shape)} do not fit a record of "
                             f"{self.groups} group(s) of width {self.d}")
        self.count += chunk.shape[1]
        if self._gram is None and self.count <= self.d:
            self._chunks.append(chunk)
            return
        self._switch_to_gram()  # the rows outnumber the width: the Gram is the smaller summary
        self._gram.baddbmm_(chunk.transpose(1, 2), chunk)

    def add_gram(self, gram: torch.Tensor, rows: int) -> None:
        """Add the Gram ``(groups, d, d)`` of ``rows`` rows that were never materialised (the
        native kernels). Only for rows that take the record past its width, into Gram mode."""
        if tuple(gram.shape) != (self.groups, self.d, self.d) or gram.dtype != self.dtype:
            raise ValueError(f"a Gram of shape {tuple(gram.shape)} ({gram.dtype}) does not fit a record "
                             f"of {self.groups} group(s) of width {self.d} ({self.dtype})")
        if self._gram is None and self.count + rows <= self.d:
            raise ValueError("this record keeps its rows until they outnumber its width; add rows instead")
        self._switch_to_gram()
        self._gram += gram
        self.count += rows

    def _switch_to_gram(self) -> None:
        if self._gram is not None:
            return
        self._gram = torch.zeros(self.groups, self.d, self.d, dtype=self.dtype, device=self.device)
        for block in self._chunks:
            self._gram.baddbmm_(block.transpose(1, 2), block)
        self._chunks = []

    @property
    def mode(self) -> str:
        """``"rows"`` while the rows are kept (thin SVD), ``"gram"`` once they outnumber the width."""
        return "gram" if self._gram is not None else "rows"

    @property
    def rows(self) -> torch.Tensor:
        """The kept rows ``(groups, count, d)``; only in ``"rows"`` mode."""
        if self._gram is not None:
            raise ValueError("this record holds a Gram, not rows (it saw more rows than its width)")
        if len(self._chunks) != 1:  # consolidate, releasing each chunk as it is copied
            out = torch.empty(self.groups, self.count, self.d, dtype=self.dtype, device=self.device)
            start, chunks, self._chunks = 0, self._chunks, []
            while chunks:
                block = chunks.pop(0)
                out[:, start:start + block.shape[1]] = block
                start += block.shape[1]
            self._chunks = [out]
        return self._chunks[0]

    @property
    def gram(self) -> torch.Tensor:
        """``RᵀR`` per group, ``(groups, d, d)`` (formed from the rows in ``"rows"`` mode)."""
        if self._gram is not None:
            return self._gram
        r = self.rows
        return r.transpose(1, 2) @ r

    def finite_flag(self) -> torch.Tensor:
        """A 0-d bool tensor on the record's device (no host synchronisation): all entries finite."""
        blocks = [self._gram] if self._gram is not None else self._chunks
        flags = [torch.isfinite(b).all() for b in blocks]
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=self.device)

    def copy(self) -> "LayerStats":
        """An independent copy (row chunks are never modified in place, so they are shared)."""
        out = LayerStats(self.d, self.groups, self.dtype, self.device)
        out.count, out._chunks = self.count, list(self._chunks)
        out._gram = None if self._gram is None else self._gram.clone()
        return out

    # -- combining ----------------------------------------------------------------------------
    def _compatible(self, other: "LayerStats", name: str) -> None:
        if (self.d, self.groups, self.dtype) != (other.d, other.groups, other.dtype):
            raise ValueError(f"cannot merge stats of layer {name!r}: width/groups/dtype "
                             f"{(self.d, self.groups, self.dtype)} vs {(other.d, other.groups, other.dtype)}")

    def merged(self, other: "LayerStats", name: str = "?") -> "LayerStats":
        """A new record holding the rows of both (disjoint shards add up exactly)."""
        self._compatible(other, name)
        out = LayerStats(self.d, self.groups, self.dtype, self.device)
        for part in (self, other):
            if part.mode == "gram":
                out._switch_to_gram()
                out._gram += part._gram.to(self.device)
                out.count += part.count
            elif part.count:
                out.add(part.rows.to(self.device))
        return out

    # -- (de)serialisation --------------------------------------------------------------------
    def state(self) -> dict:
        key, value = ("gram", self._gram) if self._gram is not None else ("rows", self.rows)
        return {"d": self.d, "groups": self.groups, "count": self.count, key: value.cpu()}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> "LayerStats":
        data = state.get("gram", state.get("rows"))
        out = cls(int(state["d"]), int(state["groups"]), data.dtype, device)
        out.count = int(state["count"])
        if "gram" in state:
            out._gram = data.to(device)
        elif out.count:
            out._chunks = [data.to(device)]
        return out

    def __repr__(self) -> str:
        return (f"LayerStats(d={self.d}, groups={self.groups}, rows={self.count}, "
                f"mode={self.mode!r}, dtype={self.dtype})")


class Stats(Mapping[str, LayerStats]):
    """Layer name → :class:`LayerStats`, in the order the layers first ran in the forward pass.

    ``num_samples`` counts the samples (not rows) the statistics were taken from. Targets that
    read the same tensor on every call (self-attention's q/k/v) may share one record object.
    ``a + b`` / ``a.merge(b)`` combine disjoint shards; ``save``/``load`` use one file.
    """

    def __init__(self, layers: Dict[str, LayerStats], num_samples: int = 0):
        self._layers = dict(layers)
        self.num_samples = num_samples

    def __getitem__(self, name: str) -> LayerStats:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def merge(self, other: "Stats") -> "Stats":
        if not isinstance(other, Stats):
            raise TypeError(f"can only merge Stats with Stats, got {type(other).__name__}")
        if set(self) != set(other):
            diff = sorted(set(self) ^ set(other))
            raise ValueError(f"cannot merge stats over different layers (only in one: {diff[:5]}); "
                             "collect both shards with the same layers=")
        return Stats({n: self[n].merged(other[n], n) for n in self},
                     self.num_samples + other.num_samples)

    __add__ = merge

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (:func:`sap_fast._runtime.io.atomic_write`: a temporary file in the same
        folder, then a rename; an existing file survives any failure)."""
        payload = {"format": FORMAT, "version": VERSION, "num_samples": self.num_samples,
                   "layers": {n: s.state() for n, s in self._layers.items()}}
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> "Stats":
        """The statistics :meth:`save` wrote to ``path``; any other file is a one-line
        ``ValueError`` saying what the file should be (a missing one: ``FileNotFoundError``)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r}: no such file (a sap_fast stats file, written by Stats.save)")
        not_stats = (f"{path!r} is not a sap_fast stats file (statistics are written by Stats.save, "
                     "or by sap-fast correct --stats-out)")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # torch's own message is about pickles, not about this file
            raise ValueError(f"{not_stats}; {torch_load_problem(err)}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(not_stats)
        if payload.get("version") != VERSION:
            raise ValueError(f"{path!r} has stats format version {payload.get('version')}; "
                             f"this sap_fast reads version {VERSION}")
        try:
            layers = {n: LayerStats.from_state(s, map_location) for n, s in payload["layers"].items()}
            return cls(layers, int(payload.get("num_samples", 0)))
        except Exception as err:
            raise ValueError(f"{path!r}: a damaged sap_fast stats file ({type(err).__name__}: "
                             f"{first_line(err)}); write it again with Stats.save") from None

    def __repr__(self) -> str:
        lines = [f"Stats({len(self)} layers, {self.num_samples} samples)"]
        lines += [f"  {n}: {s!r}" for n, s in self._layers.items()]
        return "\n".join(lines)
