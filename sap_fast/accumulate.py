"""Stage 2: stream every covered layer's input rows into its Gram, never holding all of R.

A layer input becomes rows in chunks of at most ``chunk_rows`` rows (samples, and for a huge
single sample, slices of its output positions), each copied once straight into the accumulation
dtype and added to the record. Peak memory is the Grams plus one chunk, whatever the number of
samples or the spatial size.

Conv rows are the patches the conv really sees: the input is padded exactly as the layer pads it
(``padding_mode`` and ``'same'`` included), then unfolded with ``Tensor.unfold`` per spatial
dimension, so Conv1d/2d/3d, stride, dilation and groups share one code path.

A call whose rows go into a Gram skips the rows altogether where a kernel serves it: the stage
builds the call's geometry once (:func:`kernel_call`: the conv's input padded as the kernels read
it, and its checked :class:`~sap_fast.backends.geometry.ConvGeometry`), asks the gram stage
(:func:`sap_fast.backends.layer_gram`) for the Gram (on the CPU, the exact shift-correlation
Gram of stride-1 convs; on a GPU, the implicit-im2col CUDA or Triton kernels, and Triton's
tensor-core kernels in the tf32/bf16 modes), and streams rows only when it gets None.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import distributed
from ._runtime import checks
from ._runtime.checks import RunOptions
from ._runtime.forward import forward_batches
from ._runtime.geometry import conv_patches, conv_rows, kernel_input
from .backends.geometry import KERNEL_INPUT_DTYPES, ConvGeometry, conv_geometry
from .backends.gram import gram as layer_gram
from .backends.precision import INPUT_PRECISIONS, round_inputs
from .capture import Capture
from .stats import LayerStats, Stats
from .targets import CONV_TYPES, Target, select_targets

__all__ = ["CHUNK_ELEMENTS", "collect", "collect_stats", "conv_row_chunks", "first_non_finite",
           "kernel_call", "linear_row_chunks", "row_chunks"]

CHUNK_ELEMENTS = 1 << 23  # default chunk: 8M elements (64 MB in float64)


def conv_row_chunks(conv: nn.Module, x: torch.Tensor, groups: int, d: int, max_rows: int,
                    dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """``(groups, m, d)`` row blocks of the conv's patch matrix, ``m <= max_rows`` where possible."""
    patches = conv_patches(conv, x)
    n, c = patches.shape[:2]
    spatial = len(conv.kernel_size)
    out = patches.shape[2:2 + spatial]
    per_sample = math.prod(out)
    if per_sample <= max_rows:  # whole samples per chunk
        step = max_rows // per_sample
        steps = [(s, min(n, s + step), 0, out[0]) for s in range(0, n, step)]
    else:  # an oversized sample: slices of its first output dim (at least one slice per chunk)
        step = max(1, max_rows // math.prod(out[1:]))
        steps = [(s, s + 1, a, min(out[0], a + step)) for s in range(n) for a in range(0, out[0], step)]
    # (N, g, C/g, *out, *k) → (g, N, *out, C/g, *k): rows are (sample, position), columns (channel, offset)
    order = [1, 0] + list(range(3, 3 + spatial)) + [2] + list(range(3 + spatial, 3 + 2 * spatial))
    for s0, s1, a0, a1 in steps:
        block = patches[s0:s1, :, a0:a1].unflatten(1, (groups, c // groups)).permute(order)
        chunk = torch.empty(block.shape, dtype=dtype, device=x.device)
        chunk.copy_(block)  # the one copy: gather + convert
        yield chunk.view(groups, -1, d)


def linear_row_chunks(x: torch.Tensor, d: int, max_rows: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    rows = x.reshape(-1, d)
    for start in range(0, rows.shape[0], max_rows):
        yield rows[start:start + max_rows].to(dtype).unsqueeze(0)


def row_chunks(target: Target, module: nn.Module, x: torch.Tensor, max_rows: int,
               dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Dispatch point of the accumulate stage: the rows of one layer call, chunked."""
    if isinstance(module, CONV_TYPES):
        return conv_row_chunks(module, x, target.groups, target.d, max_rows, dtype)
    return linear_row_chunks(x, target.d, max_rows, dtype)


def _records_for(records: Dict[str, LayerStats], names: List[str], new) -> List[LayerStats]:
    """The distinct records to add one input's rows to, for targets ``names`` that all read it.

    Targets fed the same tensor on every call so far (self-attention's q/k/v) share one record,
    so the rows are accumulated once. A record shared with a target that this call does not
    feed is split off first (a copy), since their histories now differ.
    """
    if all(n not in records for n in names):
        record = new()
        for n in names:
            records[n] = record
        return [record]
    for n in names:
        if n not in records:
            records[n] = new()
        elif any(records[o] is records[n] for o in records if o not in names):
            records[n] = records[n].copy()
    return list({id(records[n]): records[n] for n in names}.values())


def collect_stats(model: nn.Module, data, *, layers=None, batch_size: int = 256, device=None,
                  dtype: torch.dtype = torch.float64, chunk_rows: Optional[int] = None,
                  input_precision: str = "fp32", show_progress: Optional[bool] = None,
                  process_group=None) -> Stats:
    """Streamed Gram of every covered layer's input over ``data`` (the trusted samples).

    Args:
        model: the trained model; it is run in eval mode (its flags are restored) and not changed.
        data: inputs — a tensor, an (inputs, targets) pair, a Dataset or a DataLoader.
        layers: which layers (None = all covered; names, module types, or ``predicate(name, module)``).
        batch_size: samples per forward pass (when ``data`` does not batch itself).
        device: must be the model's device if given; batches are moved there.
        dtype: accumulation dtype, ``torch.float64`` (default: exact products of fp32 inputs) or
            ``torch.float32`` (faster, loses small eigenvalues at large α; see benchmarks/README.md).
        chunk_rows: rows per accumulation chunk (default: 8M elements per chunk). Does not change
            the result, only peak memory.
        input_precision: ``"fp32"`` (as is), or ``"tf32"``/``"bf16"`` to emulate tensor-core input
            rounding (for precision studies).
        show_progress: progress bar: None = on interactive terminals.
        process_group: ``None`` = torch.distributed's default group when it is initialised
            (else local), ``False`` = local, ``True`` or a ``ProcessGroup`` = that group
            (:mod:`sap_fast.distributed`). Distributed: ``data`` is this rank's shard (it may be
            empty); the local Grams are summed with a few bucketed ``all_reduce`` calls and every
            rank gets the Stats of one process on the union of the shards (in rank order).

    Returns:
        :class:`Stats`, one record per target, in forward order. Targets that always read the
        same tensor (self-attention's q/k/v) share one record object.
    """
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    checks.choice(input_precision, "input_precision", INPUT_PRECISIONS)
    checks.positive_int(chunk_rows, "chunk_rows", allow_none=True)
    opts = checks.run_options(model, device=device, batch_size=batch_size,
                              process_group=process_group, show_progress=show_progress)
    return collect(model, data, opts, layers=layers, dtype=dtype, chunk_rows=chunk_rows,
                   input_precision=input_precision)


def collect(model: nn.Module, data, opts: RunOptions, *, layers=None,
            dtype: torch.dtype = torch.float64, chunk_rows: Optional[int] = None,
            input_precision: str = "fp32") -> Stats:
    """:func:`collect_stats` on checked arguments (``opts`` resolved by the caller)."""
    targets = select_targets(model, layers)
    if opts.group is None:
        records, samples = _collect_local(model, data, targets, opts, dtype, chunk_rows,
                                          input_precision, allow_empty=False)
        return Stats(records, samples)
    local = {}

    def run():  # the rank-local pass; its errors reach every rank through exchange()
        local["records"], local["samples"] = _collect_local(
            model, data, targets, opts, dtype, chunk_rows, input_precision, allow_empty=True)
        return distributed.RankLayout(local["samples"], distributed.layout(local["records"]))

    layouts = distributed.exchange(opts.group, run)
    return distributed.reduce_stats(local["records"], layouts, opts.group, opts.device, dtype)


def kernel_call(module: nn.Module, x: torch.Tensor,
                dtype: torch.dtype) -> Optional[Tuple[torch.Tensor, Optional[ConvGeometry]]]:
    """What the gram stage takes for one layer call: a conv's input padded as the kernels read
    it and its checked geometry, or a linear layer's input and None; None for a conv input the
    kernels do not read (not float32/float64: its rows stream, converted)."""
    if not isinstance(module, CONV_TYPES):
        return x, None
    if x.dtype not in KERNEL_INPUT_DTYPES:
        return None
    x, padding = kernel_input(module, x)
    return x, conv_geometry(x, list(module.kernel_size), list(module.stride), padding,
                            list(module.dilation), module.groups, dtype)


def _collect_local(model, data, targets: List[Target], opts: RunOptions, dtype, chunk_rows,
                   input_precision, allow_empty: bool) -> Tuple[Dict[str, LayerStats], int]:
    """One process's pass over ``data``: (records, samples). ``allow_empty``: a rank's empty shard."""
    records: Dict[str, LayerStats] = {}

    def sink(group: List[Target], module: nn.Module, x: torch.Tensor) -> None:
        first = group[0]
        max_rows = chunk_rows or max(1, CHUNK_ELEMENTS // (first.d * first.groups))
        shared = _records_for(records, [t.name for t in group],
                              lambda: LayerStats(first.d, first.groups, dtype, x.device))
        x = x.detach()
        # a kernel Gram serves a call only if every record it feeds is (or now goes) past its
        # width; rows are needed while a record keeps them
        rows = conv_rows(module, x) if isinstance(module, CONV_TYPES) else x.numel() // first.d
        if all(r.mode == "gram" or r.count + rows > r.d for r in shared):
            call = kernel_call(module, x, dtype)
            gram = None if call is None else layer_gram(
                *call, dtype, max_rows * first.d * first.groups, input_precision)
            if gram is not None:
                for record in shared:
                    record.add_gram(gram, rows)
                return
        for chunk in row_chunks(first, module, x, max_rows, dtype):
            if input_precision != "fp32":
                chunk = round_inputs(chunk, input_precision).to(dtype)
            for record in shared:
                record.add(chunk)

    samples = 0
    with Capture(model, targets, sink):
        for x, _, _ in forward_batches(model, data, batch_size=opts.batch_size, device=opts.device,
                                       what="data", desc="statistics", show_progress=opts.show_progress,
                                       allow_empty=allow_empty):
            samples += x.shape[0]
    if not records and samples:
        raise ValueError("no covered layer ran during the forward pass; check layers= and the model")
    bad = first_non_finite(records)
    if bad is not None:
        raise ValueError(f"statistics: non-finite activations (NaN/Inf) reach layer '{bad}'; check "
                         "the inputs and the layers before it")
    return records, samples


def first_non_finite(records: Dict[str, LayerStats]) -> Optional[str]:
    """The first record (in forward order: the culprit) holding NaN/Inf, or None; one host
    synchronisation per device for all records, none per batch."""
    names = list(records)
    by_device: Dict[torch.device, List[int]] = {}
    for i, name in enumerate(names):
        by_device.setdefault(records[name].device, []).append(i)
    finite = [True] * len(names)
    for positions in by_device.values():
        flags = torch.stack([records[names[i]].finite_flag() for i in positions]).tolist()
        for i, ok in zip(positions, flags):
            finite[i] = ok
    return next((n for n, ok in zip(names, finite) if not ok), None)
