"""Slow, readable float64 reference ("oracle") for SAP — Scaled Activation Projection.

This module is the judge of every fast path in ``sap_fast``: it computes the same correction
in the plainest possible way, on purpose without any cleverness:

1. Run a deep copy of the model (eval mode, no grad) over the trusted data and *materialize*
   each covered layer's representation matrix R (rows = what the layer's weight multiplies:
   input rows of a Linear, im2col patches of a conv, per-head-concatenated attention outputs
   before ``out_proj``), in float64.
2. Thin SVD of R, normalised energies ``s_i = σ_i² / Σ σ_j²``, importances
   ``λ_i = α s_i / ((α − 1) s_i + 1)``, projection ``Wp = V diag(λ) Vᵀ``.
3. Every covered weight, flattened to ``(out, d)`` (per group for grouped convs), becomes
   ``W · Wpᵀ`` (computed in float64, cast back to the parameter dtype).

It is deliberately slow and memory hungry (R grows with the number of samples and the spatial
size) and must stay independent of the rest of the package: it imports only torch and stdlib.

Covered layers and record names (``name`` = qualified name from ``model.named_modules()``):

- ``nn.Linear`` (except the ``out_proj`` of an ``nn.MultiheadAttention``): ``name``.
- ``nn.Conv1d/2d/3d``: ``name``; one R per group.
- ``nn.MultiheadAttention``: ``name.q``, ``name.k``, ``name.v`` (inputs of the three
  in-projections) and ``name.out_proj`` (input of ``out_proj``).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["representations", "correct", "projection_matrix"]

_BATCH = 64  # batch size when ``data`` is a single tensor
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MHA_PARTS = ("q", "k", "v", "out_proj")


# --------------------------------------------------------------------------------------------
# Spectrum and projection
# --------------------------------------------------------------------------------------------


def projection_matrix(R: torch.Tensor, alpha: float) -> torch.Tensor:
    """The d×d SAP matrix ``Wp = V diag(λ) Vᵀ`` of one representation matrix ``R`` (rows, d)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    R = R.detach().to(torch.float64)
    if R.dim() != 2:
        raise ValueError(f"R must be 2-D (rows, d), got shape {tuple(R.shape)}")
    _, sigma, Vh = torch.linalg.svd(R, full_matrices=False)
    energy = sigma**2
    total = energy.sum()
    if not total > 0:
        raise ValueError("R has no energy (all zeros or no rows): SAP is undefined")
    s = energy / total
    lam = alpha * s / ((alpha - 1.0) * s + 1.0)
    V = Vh.T  # columns are the right singular vectors (d × r)
    return (V * lam) @ V.T


# --------------------------------------------------------------------------------------------
# Representations: patches of convolutions
# --------------------------------------------------------------------------------------------


def _explicit_padding(conv: nn.Module) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, exactly as PyTorch applies it."""
    n = len(conv.kernel_size)
    if conv.padding == "valid":
        return [(0, 0)] * n
    if conv.padding == "same":
        # PyTorch pads total = dilation*(k-1); the odd extra element goes to the right.
        pads = []
        for k, dil in zip(conv.kernel_size, conv.dilation):
            total = dil * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in conv.padding]


def _pad_input(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply the conv's padding (with its padding_mode) explicitly, so unfolding needs none."""
    pads = _explicit_padding(conv)
    flat = []
    for left, right in reversed(pads):  # F.pad lists the last dim first
        flat += [left, right]
    if not any(flat):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, flat, mode=mode)


def _patches_1d_2d(conv: nn.Module, xg: torch.Tensor) -> torch.Tensor:
    """im2col rows (N·L, Cg·prod(k)) of one group's padded input, via F.unfold."""
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv, nn.Conv1d):
        # Treat the sequence as an image of height 1.
        xg = xg.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    cols = F.unfold(xg, kernel, dilation=dilation, padding=0, stride=stride)  # (N, d, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _patches_3d(conv: nn.Module, xg: torch.Tensor) -> torch.Tensor:
    """im2col rows of one group's padded 5-D input.

    F.unfold does not support 5-D input, so the patches are read by a convolution with one-hot
    kernels: output channel j has a single 1 at the (channel, kd, kh, kw) position that patch
    element j reads, in the order of ``weight.flatten(1)``. Multiplying by 1 and adding zeros
    is exact in floating point.
    """
    cg = xg.shape[1]
    d = cg * math.prod(conv.kernel_size)
    eye = torch.eye(d, dtype=xg.dtype, device=xg.device).reshape(d, cg, *conv.kernel_size)
    cols = F.conv3d(xg, eye, stride=conv.stride, padding=0, dilation=conv.dilation)
    return cols.movedim(1, -1).reshape(-1, d)  # (N·Do·Ho·Wo, d), positions row-major


def _conv_patches(conv: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One im2col matrix per group, rows = (sample, output position), cols = weight order."""
    n_spatial = len(conv.kernel_size)
    if x.dim() == n_spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    x = _pad_input(conv, x.to(torch.float64))
    cg = conv.in_channels // conv.groups
    patch_fn = _patches_3d if isinstance(conv, nn.Conv3d) else _patches_1d_2d
    return [patch_fn(conv, x[:, g * cg : (g + 1) * cg]) for g in range(conv.groups)]


def _conv_width(conv: nn.Module) -> int:
    return conv.in_channels // conv.groups * math.prod(conv.kernel_size)


# --------------------------------------------------------------------------------------------
# Representations: multi-head attention, unrolled by hand
# --------------------------------------------------------------------------------------------


def _check_mha_supported(mha: nn.MultiheadAttention) -> None:
    if mha.bias_k is not None or mha.bias_v is not None:
        raise NotImplementedError("reference SAP: MultiheadAttention(add_bias_kv=True) unsupported")
    if mha.add_zero_attn:
        raise NotImplementedError("reference SAP: MultiheadAttention(add_zero_attn=True) unsupported")


def _mha_projection_weights(mha: nn.MultiheadAttention):
    """(Wq, Wk, Wv) in-projection weights, whichever way the module stores them."""
    if mha._qkv_same_embed_dim:
        E = mha.embed_dim
        w = mha.in_proj_weight
        return w[:E], w[E : 2 * E], w[2 * E :]
    return mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight


def _to_additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool mask (True = masked out) → float64 additive mask; float masks are added as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
        return zeros.masked_fill(mask, float("-inf"))
    return mask.to(torch.float64)


def _batch_major(t: torch.Tensor, batch_first: bool, unbatched: bool) -> torch.Tensor:
    """Any accepted MHA input layout → (B, L, features), float64."""
    t = t.to(torch.float64)
    if unbatched:
        return t.unsqueeze(0)
    return t if batch_first else t.transpose(0, 1)


def _mha_inputs(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict:
    """Normalise the call's positional/keyword arguments to forward()'s parameter names."""
    bound = inspect.signature(mha.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _mha_records(mha: nn.MultiheadAttention, call: dict) -> dict[str, torch.Tensor]:
    """R rows of one MHA call: the q/k/v inputs and the concatenated heads before out_proj.

    Rows follow the layout the caller used (``(B, L)`` order if batch_first else ``(L, B)``),
    so ``R_out_proj @ out_proj.weight.T + bias`` reshaped is exactly the module's output.
    """
    if call.get("is_causal"):
        raise NotImplementedError("reference SAP: MultiheadAttention(is_causal=True) unsupported")
    query, key, value = call["query"], call["key"], call["value"]
    unbatched = query.dim() == 2
    bf = mha.batch_first
    q_in, k_in, v_in = (_batch_major(t, bf, unbatched) for t in (query, key, value))

    # In-projections (biases are the three E-sized slices of in_proj_bias).
    E, H = mha.embed_dim, mha.num_heads
    hd = E // H
    Wq, Wk, Wv = (w.to(torch.float64) for w in _mha_projection_weights(mha))
    if mha.in_proj_bias is not None:
        bq, bk, bv = mha.in_proj_bias.to(torch.float64).chunk(3)
    else:
        bq = bk = bv = None
    q, k, v = F.linear(q_in, Wq, bq), F.linear(k_in, Wk, bk), F.linear(v_in, Wv, bv)

    # Split heads: (B, L, E) → (B, H, L, hd).
    B, L, S = q.shape[0], q.shape[1], k.shape[1]
    q, k, v = (t.reshape(B, -1, H, hd).transpose(1, 2) for t in (q, k, v))

    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, H, L, S)
    attn_mask = _to_additive(call.get("attn_mask"))
    if attn_mask is not None:
        # (L, S) is shared; (B·H, L, S) — or (H, L, S) unbatched — is per batch and head.
        scores = scores + (attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(B, H, L, S))
    kpm = _to_additive(call.get("key_padding_mask"))
    if kpm is not None:
        scores = scores + kpm.reshape(B, 1, 1, S)  # (B, S), or (S,) unbatched
    heads = torch.softmax(scores, dim=-1) @ v  # dropout is off in eval mode

    concat = heads.transpose(1, 2).reshape(B, L, E)  # per-token concatenation of all heads
    if unbatched:
        concat = concat[0]
    elif not bf:
        concat = concat.transpose(0, 1)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64).reshape(-1, t.shape[-1])

    return {"q": rows(query), "k": rows(key), "v": rows(value), "out_proj": rows(concat)}


# --------------------------------------------------------------------------------------------
# Which records a model has
# --------------------------------------------------------------------------------------------


def _covered_records(model: nn.Module) -> list[tuple[str, str, nn.Module, str]]:
    """(record name, owning module name, module, part) for every covered layer record.

    part is "linear", "conv", or one of the MHA parts "q", "k", "v", "out_proj".
    """
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    mha_out_projs = {id(m.out_proj) for m in mhas}
    records = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            records += [(f"{name}.{p}", name, module, p) for p in _MHA_PARTS]
        elif isinstance(module, nn.Linear) and id(module) not in mha_out_projs:
            records.append((name, name, module, "linear"))
        elif isinstance(module, _CONVS):
            records.append((name, name, module, "conv"))
    return records


def _select(records: list, layers: Sequence[str] | None) -> list:
    """Keep the records named (or owned by a module named) in ``layers``."""
    if layers is None:
        return records
    if isinstance(layers, str):
        layers = [layers]
    wanted = set(layers)
    known = {r[0] for r in records} | {r[1] for r in records}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"layers not covered by SAP (or not in the model): {sorted(unknown)}")
    return [r for r in records if r[0] in wanted or r[1] in wanted]


def _group_count(module: nn.Module, part: str) -> int:
    return module.groups if part == "conv" else 1


def _width(module: nn.Module, part: str) -> int:
    if part == "linear":
        return module.in_features
    if part == "conv":
        return _conv_width(module)
    return {"q": module.embed_dim, "k": module.kdim, "v": module.vdim, "out_proj": module.embed_dim}[part]


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


def _batches(data) -> Iterable[torch.Tensor]:
    """Input tensors from a tensor (split into batches) or an iterable of tensors / tuples."""
    if isinstance(data, torch.Tensor):
        yield from data.split(_BATCH)
        return
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _register_hooks(selected: list, chunks: dict) -> list:
    """Forward pre-hooks that append each call's rows to ``chunks[record][group]``."""
    handles = []
    by_mha: dict[int, tuple[nn.Module, list[tuple[str, str]]]] = {}
    for rec, _, module, part in selected:
        if part == "linear":

            def hook(mod, args, kwargs, rec=rec):
                x = _first_input(args, kwargs)
                chunks[rec][0].append(x.detach().to(torch.float64).reshape(-1, mod.in_features))

        elif part == "conv":

            def hook(mod, args, kwargs, rec=rec):
                for g, rows in enumerate(_conv_patches(mod, _first_input(args, kwargs).detach())):
                    chunks[rec][g].append(rows)

        else:  # one hook per MHA serves all of its selected parts
            by_mha.setdefault(id(module), (module, []))[1].append((rec, part))
            continue
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    for module, parts in by_mha.values():
        _check_mha_supported(module)

        def hook(mod, args, kwargs, parts=parts):
            call = _mha_inputs(mod, args, kwargs)
            call = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
            rows = _mha_records(mod, call)
            for rec, part in parts:
                chunks[rec][0].append(rows[part])

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _device_of(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def representations(
    model: nn.Module, data, *, layers: Sequence[str] | None = None
) -> dict[str, list[torch.Tensor]]:
    """Materialized float64 representation matrices, ``{record: [R_group0, R_group1, ...]}``.

    ``data``: one input tensor (split into batches of 64 along dim 0) or an iterable of input
    tensors or of ``(input, target, ...)`` tuples. Rows of R are all samples' rows in data order;
    a module called several times per forward contributes the rows of every call, in call order.
    A covered layer that never runs gets ``(0, d)`` matrices.
    """
    model = copy.deepcopy(model).eval()
    selected = _select(_covered_records(model), layers)
    chunks = {rec: [[] for _ in range(_group_count(m, part))] for rec, _, m, part in selected}
    handles = _register_hooks(selected, chunks)
    device = _device_of(model)
    try:
        with torch.no_grad():
            for x in _batches(data):
                model(x.to(device) if device is not None else x)
    finally:
        for h in handles:
            h.remove()

    out = {}
    for rec, _, module, part in selected:
        d = _width(module, part)
        empty = torch.zeros(0, d, dtype=torch.float64)
        out[rec] = [torch.cat(c) if c else empty for c in chunks[rec]]
    return out


# --------------------------------------------------------------------------------------------
# Correction
# --------------------------------------------------------------------------------------------


def _weight_slices(module: nn.Module, part: str) -> list[tuple[nn.Parameter, slice]]:
    """(parameter, row slice of its (out, d) flattening) that each group's Wp multiplies."""
    if part == "linear":
        return [(module.weight, slice(None))]
    if part == "conv":
        out_g = module.out_channels // module.groups
        return [(module.weight, slice(g * out_g, (g + 1) * out_g)) for g in range(module.groups)]
    if part == "out_proj":
        return [(module.out_proj.weight, slice(None))]
    E = module.embed_dim
    if module._qkv_same_embed_dim:
        i = "qkv".index(part)
        return [(module.in_proj_weight, slice(i * E, (i + 1) * E))]
    return [(getattr(module, f"{part}_proj_weight"), slice(None))]


def _project_rows(param: nn.Parameter, rows: slice, Wp: torch.Tensor) -> None:
    """param.flatten(1)[rows] ← W · Wpᵀ, in float64, written back in param's dtype."""
    W = param.detach().to(torch.float64).flatten(1)
    W[rows] = W[rows] @ Wp.to(W.device).T
    param.copy_(W.reshape(param.shape).to(param.dtype))


def correct(model: nn.Module, data, *, alpha: float, layers: Sequence[str] | None = None) -> nn.Module:
    """A SAP-corrected deep copy of ``model``; the caller's model is not modified.

    Every covered weight (per group for grouped convs; q/k/v slices of an MHA separately) is
    right-multiplied by ``Wpᵀ`` of its own representation. Biases and everything else are kept.
    Records with no rows (a layer that never ran) are left unchanged.
    """
    reps = representations(model, data, layers=layers)
    corrected = copy.deepcopy(model)
    records = {rec: (m, part) for rec, _, m, part in _covered_records(corrected)}
    with torch.no_grad():
        for rec, Rs in reps.items():
            module, part = records[rec]
            for R, (param, rows) in zip(Rs, _weight_slices(module, part), strict=True):
                if R.shape[0] == 0:
                    continue
                _project_rows(param, rows, projection_matrix(R, alpha))
    return corrected
