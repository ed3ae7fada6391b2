"""Stage 2: stream every covered layer's input rows into its Gram, never holding all of R.

A layer input becomes rows in chunks of at most ``chunk_rows`` rows (samples, and for a huge
single sample, slices of its output positions), each copied once straight into the accumulation
dtype and added to the record. Peak memory is the Grams plus one chunk, whatever the number of
samples or the spatial size.

Conv rows are the patches the conv really sees: the input is padded exactly as the layer pads it
(``padding_mode`` and ``'same'`` included), then unfolded with ``Tensor.unfold`` per spatial
dimension, so Conv1d/2d/3d, stride, dilation and groups share one code path.

A call whose rows go into a Gram skips the rows altogether where a kernel serves it
(:func:`sap_fast.backend.gram_route`): on CPU, stride-1 convs use the exact shift-correlation
Gram (``torch.ops.sap_fast.conv_gram_shift``); on CUDA, every conv uses the implicit-im2col Gram
kernel (``torch.ops.sap_fast.conv_gram``, or the Triton one in ``sap_fast.kernels.gram_triton``),
and the tf32/bf16 modes use the Triton kernels on tensor cores for convs and linear layers.
Other calls take the portable path above.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import backend, distributed, shift
from .forward import forward_batches, resolve_device
from .layers import CONV_TYPES, Target, select_targets
from .capture import Capture
from .stats import LayerStats, Stats

CHUNK_ELEMENTS = 1 << 23  # default chunk: 8M elements (64 MB in float64)
INPUT_PRECISIONS = ("fp32", "tf32", "bf16")


def conv_padding(conv: nn.Module) -> list:
    """The ``F.pad`` amounts (last dim first) that the conv applies to its input."""
    pads = []
    for i in reversed(range(len(conv.kernel_size))):
        k, dil = conv.kernel_size[i], conv.dilation[i]
        if conv.padding == "same":
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        elif conv.padding == "valid":
            pads += [0, 0]
        else:
            pads += [conv.padding[i]] * 2
    return pads


def conv_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A view ``(N, C, *out, *kernel)`` of every patch the conv reads (only the padding copies)."""
    spatial = len(conv.kernel_size)
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    pads = conv_padding(conv)
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    for i in range(spatial):
        k, dil, step = conv.kernel_size[i], conv.dilation[i], conv.stride[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, step)  # appends the window as the last dim
        if dil > 1:
            x = x[..., ::dil]
    return x


def _round_inputs(chunk: torch.Tensor, precision: str) -> torch.Tensor:
    """Emulate tensor-core input formats: round fp32 to TF32 (10-bit) or BF16 (7-bit) mantissas."""
    if precision == "bf16":
        return chunk.to(torch.bfloat16).to(torch.float32)
    if precision == "tf32":  # round-to-nearest-even on the 13 dropped mantissa bits
        bits = chunk.to(torch.float32).contiguous().view(torch.int32)
        bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
        return bits.view(torch.float32)
    return chunk


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


def _padded_size(conv: nn.Module, x: torch.Tensor) -> List[int]:
    """The spatial size of the conv's input after its own padding, first dim first."""
    spatial = len(conv.kernel_size)
    pads = conv_padding(conv)
    return [x.shape[-spatial + i] + pads[2 * (spatial - 1 - i)] + pads[2 * (spatial - 1 - i) + 1]
            for i in range(spatial)]


def _conv_rows(conv: nn.Module, x: torch.Tensor) -> int:
    """Rows of the patch matrix of one conv call: samples × output positions."""
    spatial = len(conv.kernel_size)
    samples = x.shape[0] if x.dim() == spatial + 2 else 1
    out = [(size - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
           for i, size in enumerate(_padded_size(conv, x))]
    return samples * math.prod(out)


def row_chunks(target: Target, module: nn.Module, x: torch.Tensor, max_rows: int,
               dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Dispatch point of the accumulate stage: the rows of one layer call, chunked."""
    if isinstance(module, CONV_TYPES):
        return conv_row_chunks(module, x, target.groups, target.d, max_rows, dtype)
    return linear_row_chunks(x, target.d, max_rows, dtype)


def _native_padding(conv: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
    """The input and per-dim zero padding for the native kernels (which pad zeros symmetrically):
    other padding modes and asymmetric ``'same'`` padding are applied here instead."""
    pads = conv_padding(conv)
    low, high = pads[0::2][::-1], pads[1::2][::-1]  # per spatial dim, first dim first
    if conv.padding_mode == "zeros" and low == high:
        return x, low
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode), [0] * len(low)


def _triton_precision(dtype: torch.dtype, input_precision: str) -> str:
    """The Triton kernel's mode for a record dtype and input precision (see gram_route)."""
    if input_precision == "fp32":
        return "fp64" if dtype == torch.float64 else "fp32"
    return input_precision


def _kernel_choice(x: torch.Tensor) -> str:
    """``SAP_FAST_GRAM_KERNEL``, read for GPU tensors only (CPU calls have one route each)."""
    return backend.gram_kernel_choice() if x.device.type == "cuda" else "auto"


def native_gram(module: nn.Module, x: torch.Tensor, dtype: torch.dtype, max_elements: int,
                input_precision: str = "fp32") -> Optional[torch.Tensor]:
    """The Gram ``(groups, d, d)`` of one conv or linear call (its :func:`_conv_rows` rows, or
    every row of a linear input) from a kernel that never materialises the rows, or None when
    none serves this call (then the caller streams rows). :func:`backend.gram_route` decides."""
    if x.dtype not in (torch.float32, torch.float64):
        return None
    conv = isinstance(module, CONV_TYPES)
    on_cuda = x.device.type == "cuda"
    choice = _kernel_choice(x)
    stride_one = conv and all(s == 1 for s in module.stride) and math.prod(module.kernel_size) > 1
    route = backend.gram_route(
        x.device.type, dtype, input_precision, conv=conv, stride_one_spatial=stride_one,
        shift_pays=(choice == "shift" and stride_one and len(module.kernel_size) <= 2
                    and shift.pays(_padded_size(module, x), module.kernel_size, module.dilation)),
        native_cpu=backend.native() is not None, native_cuda=on_cuda and backend.native_cuda(),
        triton_ok=on_cuda and backend.triton_gram() is not None, choice=choice)
    if route is None:
        return None
    if not conv:  # Triton, tf32/bf16 linear: every row of the input, any leading dims
        return backend.triton_gram().linear_gram(x.reshape(-1, x.shape[-1]),
                                                 _triton_precision(dtype, input_precision))
    spatial = len(module.kernel_size)
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    x, padding = _native_padding(module, x)
    k, dil, stride = list(module.kernel_size), list(module.dilation), list(module.stride)
    if route == "cuda":
        return torch.ops.sap_fast.conv_gram(x, k, stride, padding, dil, module.groups, dtype)
    if route == "triton":
        return backend.triton_gram().conv_gram(x, k, stride, padding, dil, module.groups,
                                               _triton_precision(dtype, input_precision))
    if route == "torch-shift":
        return shift.shift_gram(x, k, padding, dil, module.groups, dtype)
    # "shift" (CPU): the kernel copies its input into a zero-margined buffer: bound it by whole samples
    margined = math.prod(x.shape[2 + i] + 2 * dil[i] * (k[i] - 1) for i in range(spatial))
    step = max(1, max_elements // (margined * x.shape[1]))
    gram = None
    for part in x.split(step):
        g = torch.ops.sap_fast.conv_gram_shift(part, k, padding, dil, module.groups, dtype)
        gram = g if gram is None else gram.add_(g)
    return gram


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
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    group = distributed.resolve_group(process_group)
    if group is None:
        records, samples = _collect_local(model, data, layers, batch_size, device, dtype, chunk_rows,
                                          input_precision, show_progress, allow_empty=False)
        return Stats(records, samples)
    local = {}

    def run():  # the rank-local pass; its errors reach every rank through exchange()
        local["records"], local["samples"] = _collect_local(
            model, data, layers, batch_size, device, dtype, chunk_rows, input_precision,
            show_progress, allow_empty=True)
        return {"samples": local["samples"], "layers": distributed._layout(local["records"])}

    layouts = distributed.exchange(group, run)
    return distributed.reduce_stats(local["records"], local["samples"], layouts, group,
                                    resolve_device(model, device), dtype)


def _collect_local(model, data, layers, batch_size, device, dtype, chunk_rows, input_precision,
                   show_progress, allow_empty: bool) -> Tuple[Dict[str, LayerStats], int]:
    """One process's pass over ``data``: (records, samples). ``allow_empty``: a rank's empty shard."""
    targets = select_targets(model, layers)
    dev = resolve_device(model, device)
    records: Dict[str, LayerStats] = {}

    def sink(group: List[Target], module: nn.Module, x: torch.Tensor) -> None:
        first = group[0]
        max_rows = chunk_rows or max(1, CHUNK_ELEMENTS // (first.d * first.groups))
        shared = _records_for(records, [t.name for t in group],
                              lambda: LayerStats(first.d, first.groups, dtype, x.device))
        x = x.detach()
        # a kernel Gram serves a call only if every record it feeds is (or now goes) past its
        # width; rows are needed while a record keeps them
        rows = _conv_rows(module, x) if isinstance(module, CONV_TYPES) else x.numel() // first.d
        if all(r.mode == "gram" or r.count + rows > r.d for r in shared):
            gram = native_gram(module, x, dtype, max_rows * first.d * first.groups, input_precision)
            if gram is not None:
                for record in shared:
                    record.add_gram(gram, rows)
                return
        for chunk in row_chunks(first, module, x, max_rows, dtype):
            if input_precision != "fp32":
                chunk = _round_inputs(chunk, input_precision).to(dtype)
            for record in shared:
                record.add(chunk)

    samples = 0
    with Capture(model, targets, sink):
        for x, _, _ in forward_batches(model, data, batch_size=batch_size, device=dev,
                                       what="data", desc="statistics", show_progress=show_progress,
                                       allow_empty=allow_empty):
            samples += x.shape[0]
    if not records and samples:
        raise ValueError("no covered layer ran during the forward pass; check layers= and the model")
    bad = first_non_finite(records)
    if bad is not None:
        raise ValueError(f"non-finite activations (NaN/Inf) reach layer '{bad}'; check the "
                         "inputs and the layers before it")
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
