"""The OFFICIAL SAP code's algorithm, re-implemented as the slow baseline of the GPU benchmarks.

It lives in ``benchmarks/``, beside the scripts that time ``sap_fast`` against it, and is not part of
the installed package: from a checkout, ``sys.path.insert(0, "benchmarks"); from official import
official_correct``.

What github.com/sangamesh-kodge/SAP does (read in its Verifix copy, the same code; utils.py:
``get_representation_matrix_mislabeled``, ``get_SVD``, ``get_scaled_feature_mat``,
``get_projections``; models/model_utils.py, models/vit.py) with projection location "pre" and
type "Mr" (its steps and defaults: docs/methods.md#official-sap):

1. **Gather.** Stack the N trusted inputs on the model's device; one forward pass of the
   eval-mode model in batches of ``max_batch_size``. Every covered layer's input rows are formed
   on the device (conv: ``F.unfold`` patches, padding zeros included; linear: every token row;
   ``nn.MultiheadAttention``: the in-projection input once for q, k and v ("qkv"), and the
   concatenated heads before ``out_proj``, by unrolling attention) and copied to the CPU per
   batch. Each batch keeps at most c = ⌊max_samples/(N/B)⌋ + 1 rows per layer, uniformly at
   random; the per-batch rows are concatenated (re-copying the accumulated array each batch, as
   ``np.concatenate`` does), and a layer with more than ``max_samples`` rows in the end keeps a
   uniform random subset of ``max_samples``.
2. **SVD.** Per layer, R = rowsᵀ (d × n) as a contiguous float32 host tensor, moved to ``device``,
   ``torch.linalg.svd(R, full_matrices=False)``; U and σ come back to the host.
3. **Per α.** s = σ²/Σσ², λ = αs/((α−1)s+1) (float32, host), F = U·diag(√λ) and M = F Fᵀ on
   ``device``; a fresh ``copy.deepcopy`` of the original model; every covered weight
   W_flat ← W_flat · Mᵀ. The model is handed to ``on_model(alpha, model)`` or kept.

Liberties, each documented where it is taken (none changes the result):

- torch tensors and ``torch.randperm`` (seeded ``torch.Generator``) instead of numpy arrays and
  ``np.random.shuffle``: the same copies and the same sampling distribution, other random draws.
- Forward hooks (and, for self-attention, an instance-level forward that unrolls attention once,
  as the official ``get_activations`` does) instead of the official per-model ``get_activations``
  methods; rows are ``.cpu()``-ed per call without the official's extra ``clone``/``deepcopy``
  copies, and the capture runs under ``torch.no_grad()`` (the official one builds an autograd
  graph it never uses).
- Only the "pre" side of the retain set is computed. The official code also materialises and
  SVDs every layer's *output* rows ("post") and the whole pipeline again for a 1 350-sample
  forget set, and per α multiplies every weight by identity post matrices and forms M_f, M_r·M_f,
  M_f·M_r; with location "pre" and type "Mr" none of that affects the corrected model. All of
  it is skipped, so this baseline is *faster* than the real official run (conservative for any
  speed-up claimed against it).
- Generality the official code lacks (it would crash): grouped convs (one R per group), non-zero
  padding modes and "same" padding (padded explicitly, as sap_fast.reference does), Conv1d/3d,
  cross-attention (separate q/k/v records), attention masks (heads recomputed with
  ``F.multi_head_attention_forward``), a layer called several times per forward (rows of every
  call), and non-float32 weights (M is cast to the weight's dtype). A layer that never runs is
  left unchanged.

The caller's model is not modified (hooks are removed, train/eval flags restored).

    res = official_correct(model, x, [1e4, 3e4], on_model=lambda a, m: evaluate(m))
    res.stage_times  # {"gather": s, "svd": s, "project": {1e4: s, 3e4: s}, "total": s}
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sap_fast import reference as _ref
from sap_fast.capture import heads_before_out_proj
from sap_fast.targets import CONV_TYPES, all_targets

__all__ = ["official_correct", "OfficialResult", "importance", "per_batch_cap"]


@dataclass
class OfficialResult:
    alphas: List[float]
    models: Dict[float, nn.Module]          # α → corrected copy (empty when on_model was given)
    stage_times: Dict[str, object]          # gather, svd, project {α: s}, total = their sum (s)
    rows: Dict[str, List[int]]              # record → rows kept per group (after subsampling)
    widths: Dict[str, int]                  # record → d
    svd_times: Dict[str, float] = field(default_factory=dict)  # record → seconds (all groups)
    device: str = "cpu"
    per_batch_cap: Optional[int] = None     # c = ⌊max_samples/(N/B)⌋ + 1
    R: Dict[str, List[torch.Tensor]] = field(default_factory=dict)  # record → kept rows (keep_rows)
    # time_limit reached: the run stopped early and its stage times are lower bounds. ``progress``
    # says how far it got: gather batches and SVD records done, out of how many
    capped: bool = False
    progress: Dict[str, int] = field(default_factory=dict)


def per_batch_cap(n_samples: int, max_batch_size: int, max_samples: int) -> int:
    """The official per-batch row cap ``int(max_samples / (N / B)) + 1``."""
    return int(max_samples / (n_samples / max_batch_size)) + 1


def importance(S: torch.Tensor, alpha: float) -> torch.Tensor:
    """λ = αs/((α−1)s+1), s = σ²/Σσ², in σ's dtype (float32 in the official code)."""
    ratio = S ** 2 / (S ** 2).sum()
    return alpha * ratio / ((alpha - 1) * ratio + 1)


# -- rows ----------------------------------------------------------------------------------------
def _conv_rows(conv: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """im2col rows per group, on x's device and dtype."""
    if (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and x.dim() == 4):
        # the official reshape_conv_input_activation
        u = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        return [u.permute(0, 2, 1).contiguous().view(-1, u.shape[1])]
    n_spatial = len(conv.kernel_size)
    if x.dim() == n_spatial + 1:
        x = x.unsqueeze(0)
    x = _ref._pad_input(conv, x)
    cg = conv.in_channels // conv.groups
    patch = _ref._patches_3d if isinstance(conv, nn.Conv3d) else _ref._patches_1d_2d
    return [patch(conv, x[:, g * cg:(g + 1) * cg]) for g in range(conv.groups)]


def _unrolled_self_attention(mha: nn.MultiheadAttention, x: torch.Tensor):
    """models/vit.py ``EncoderBlock.get_activations``: packed in-projection, SDPA, head concat.
    Returns (concatenated heads as rows, attention output in x's layout)."""
    batch_major = x if mha.batch_first else x.transpose(0, 1)
    bsz, seq_len, e = batch_major.shape
    h = mha.num_heads
    q, k, v = F._in_projection_packed(batch_major, batch_major, batch_major, mha.in_proj_weight,
                                      mha.in_proj_bias)
    q, k, v = (t.view(bsz, seq_len, h, e // h).permute(0, 2, 1, 3) for t in (q, k, v))
    heads = F.scaled_dot_product_attention(q, k, v)  # eval: no dropout
    heads = heads.permute(0, 2, 1, 3).contiguous().view(seq_len * bsz, e)
    out = F.linear(heads, mha.out_proj.weight, mha.out_proj.bias).view(bsz, seq_len, e)
    return heads, (out if mha.batch_first else out.transpose(0, 1))


class _Gatherer:
    """Hooks that hand each covered layer's rows (on the CPU) to ``self.batch`` during a forward."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.batch: Dict[tuple, List[torch.Tensor]] = {}   # (record, group) → this batch's rows
        self.widths: Dict[str, int] = {}
        self.groups: Dict[str, int] = {}
        self._handles, self._patched = [], []
        self.owners = {}
        for t in all_targets(model):
            self.owners.setdefault(t.owner, t)

    def _add(self, record: str, group: int, rows: torch.Tensor) -> None:
        self.widths[record] = rows.shape[1]
        self.groups[record] = max(self.groups.get(record, 0), group + 1)
        rows = rows.detach()
        host = rows.cpu()
        if host is rows:  # already on the CPU: copy, as the official deepcopy does (in-place ops)
            host = rows.clone()
        self.batch.setdefault((record, group), []).append(host)

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for owner in self.owners:
            mod = modules[owner]
            if isinstance(mod, nn.MultiheadAttention):
                self._handles.append(mod.register_forward_pre_hook(self._mha_hook(owner), with_kwargs=True))
                self._patch_self_attention(owner, mod)
            elif isinstance(mod, CONV_TYPES):
                def hook(m, args, name=owner):
                    for g, rows in enumerate(_conv_rows(m, args[0].detach())):
                        self._add(name, g, rows)
                self._handles.append(mod.register_forward_pre_hook(hook))
            else:
                def hook(m, args, name=owner):
                    self._add(name, 0, args[0].detach().reshape(-1, m.in_features))
                self._handles.append(mod.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for mod in self._patched:
            del mod.forward
        self._handles, self._patched = [], []

    # Self-attention without masks runs unrolled, once, like the official get_activations; the
    # pre-hook below covers every other call (cross-attention, masks) by recomputing the heads.
    def _patch_self_attention(self, owner: str, mha: nn.MultiheadAttention) -> None:
        original = mha.forward
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            return

        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if (query is key is value and key_padding_mask is None and attn_mask is None
                    and not is_causal and query.dim() == 3):
                heads, out = _unrolled_self_attention(mha, query)
                self._add(f"{owner}.qkv", 0, query.detach().reshape(-1, mha.embed_dim))
                self._add(f"{owner}.out_proj", 0, heads.detach())
                return out, None
            return original(query, key, value, key_padding_mask=key_padding_mask,
                            need_weights=need_weights, attn_mask=attn_mask,
                            average_attn_weights=average_attn_weights, is_causal=is_causal)

        mha.forward = forward
        self._patched.append(mha)

    def _mha_hook(self, owner: str):
        def hook(mha, args, kwargs):
            call = _ref._mha_inputs(mha, args, kwargs)
            if mha in self._patched and not self._needs_fallback(call):
                return None  # the unrolled forward records this call
            call = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
            q, k, v = call["query"], call["key"], call["value"]
            if q is k is v:
                self._add(f"{owner}.qkv", 0, q.reshape(-1, mha.embed_dim))
            else:
                for part, t, d in (("q", q, mha.embed_dim), ("k", k, mha.kdim), ("v", v, mha.vdim)):
                    self._add(f"{owner}.{part}", 0, t.reshape(-1, d))
            heads = heads_before_out_proj(mha, call)
            self._add(f"{owner}.out_proj", 0, heads.reshape(-1, mha.embed_dim))
            return None
        return hook

    @staticmethod
    def _needs_fallback(call: dict) -> bool:
        q = call["query"]
        return not (q is call["key"] is call["value"] and call["key_padding_mask"] is None
                    and call["attn_mask"] is None and not call["is_causal"] and q.dim() == 3)


# -- the algorithm -------------------------------------------------------------------------------
def _stack(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    xs = [item[0] if isinstance(item, (tuple, list)) else item for item in data]
    return torch.cat(xs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _record_for(target, available: Dict[str, object]) -> Optional[str]:
    """The record whose M a target's weight is multiplied by (self-attention q/k/v share qkv)."""
    if target.name in available:
        return target.name
    owner, part = target.name.rsplit(".", 1)
    if part in ("q", "k", "v") and f"{owner}.qkv" in available:
        return f"{owner}.qkv"
    return None


def official_correct(model: nn.Module, data, alphas: Sequence[float], *, max_samples: Optional[int] = 50000,
                     max_batch_size: int = 128, device=None, seed: int = 0,
                     on_model: Optional[Callable[[float, nn.Module], None]] = None,
                     keep_rows: bool = False, time_limit: Optional[float] = None) -> OfficialResult:
    """SAP the way the official code does it (module docstring), one corrected copy per α.

    ``data``: the N trusted inputs, one tensor (N, ...) or an iterable of tensors / (x, y, ...)
    tuples (stacked into one tensor on the model's device first, as the official code does).
    ``max_samples=None`` disables subsampling. ``device``: where the SVDs and projection matrices
    are computed (the official code: "cuda"); default the model's device. ``on_model(alpha,
    corrected)`` is called per α instead of keeping the copies in ``result.models`` (its own time
    is not part of ``stage_times``). ``keep_rows``: also return the subsampled rows per record
    and group (``result.R``, (n, d) host tensors; for tests).

    ``time_limit`` (seconds from the call): the run stops at the first gather batch or SVD record
    that ends past it, skips the per-α stage, and returns ``capped=True`` with what it measured
    (lower bounds of the full run's stage times) and how far it got (``progress``). On a GPU the
    full run copies every unfolded row to the host (about 87 GB for ResNet-50 at 1000 samples)
    and runs float32 SVDs of up to 4608 × 50 000, so a benchmark with a time budget caps it.
    """
    alphas = [float(a) for a in alphas]
    if any(not a > 0 for a in alphas):
        raise ValueError(f"every alpha must be > 0, got {alphas}")
    model_device = _model_device(model)
    device = torch.device(device) if device is not None else model_device
    gen = torch.Generator().manual_seed(seed)
    times: Dict[str, object] = {"project": {}}
    started = time.perf_counter()
    progress: Dict[str, int] = {}

    def out_of_time() -> bool:
        return time_limit is not None and time.perf_counter() - started > time_limit

    # 1. gather ---------------------------------------------------------------------------------
    _sync(model_device)
    t0 = time.perf_counter()
    x_all = _stack(data).to(model_device)
    n_samples = x_all.shape[0]
    cap = per_batch_cap(n_samples, max_batch_size, max_samples) if max_samples is not None else None
    acc: Dict[tuple, torch.Tensor] = {}
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        batches = torch.split(x_all, max_batch_size, dim=0)
        progress.update(gather_batches=0, gather_batches_total=len(batches))
        with _Gatherer(model) as gatherer, torch.no_grad():
            for batch in batches:
                if out_of_time():
                    break
                gatherer.batch = {}
                model(batch)
                for key, chunks in gatherer.batch.items():
                    rows = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
                    if cap is not None and rows.shape[0] > cap:  # shuffle, keep a subset
                        rows = rows[torch.randperm(rows.shape[0], generator=gen)[:cap]]
                    # like np.concatenate([acc, new]): the accumulated rows are copied every batch
                    acc[key] = torch.cat([acc[key], rows]) if key in acc else rows
                progress["gather_batches"] += 1
        widths, groups = dict(gatherer.widths), dict(gatherer.groups)
    finally:
        for m, flag in zip(model.modules(), flags):
            m.training = flag
    for key, rows in acc.items():
        if max_samples is not None and rows.shape[0] > max_samples:
            acc[key] = rows[torch.randperm(rows.shape[0], generator=gen)[:max_samples]]
    del x_all
    _sync(model_device)
    times["gather"] = time.perf_counter() - t0

    # 2. SVD per layer --------------------------------------------------------------------------
    t0 = time.perf_counter()
    spectra: Dict[str, List[Optional[tuple]]] = {}
    svd_times: Dict[str, float] = {}
    kept: Dict[str, List[torch.Tensor]] = {}
    progress.update(svd_records=0, svd_records_total=len(widths))
    for record in widths:
        if out_of_time():
            break
        ts = time.perf_counter()
        per_group = []
        for g in range(groups[record]):
            rows = acc.pop((record, g), None)
            if rows is None or rows.shape[0] == 0:
                per_group.append(None)
                continue
            mat = rows.t().contiguous().to(torch.float32)    # torch.Tensor(activation.transpose())
            if keep_rows:
                kept.setdefault(record, [None] * groups[record])[g] = rows
            del rows
            U, S, _ = torch.linalg.svd(mat.to(device), full_matrices=False)
            per_group.append((U.cpu(), S.cpu(), mat.shape[1]))  # U, S → host, as get_SVD does
            del U, S, mat
        spectra[record] = per_group
        _sync(device)
        svd_times[record] = time.perf_counter() - ts
        progress["svd_records"] += 1
    times["svd"] = time.perf_counter() - t0
    if progress["gather_batches"] < progress["gather_batches_total"] \
            or progress["svd_records"] < progress["svd_records_total"]:
        times["total"] = times["gather"] + times["svd"]
        rows_kept = {r: [sp[2] if sp is not None else 0 for sp in per] for r, per in spectra.items()}
        return OfficialResult(alphas, {}, times, rows_kept, widths, svd_times, str(device), cap, kept,
                              capped=True, progress=progress)
    rows_kept = {r: [sp[2] if sp is not None else 0 for sp in per] for r, per in spectra.items()}

    # 3. per α: scaled bases, M = F Fᵀ, a deep copy, W ← W Mᵀ --------------------------------------
    models: Dict[float, nn.Module] = {}
    for alpha in alphas:
        _sync(device)
        t0 = time.perf_counter()
        mats: Dict[str, List[Optional[torch.Tensor]]] = {}
        for record, per in spectra.items():
            mats[record] = []
            for sp in per:
                if sp is None:
                    mats[record].append(None)
                    continue
                U, S, _ = sp
                feature = torch.mm(U.to(device), torch.diag(importance(S, alpha).to(device) ** 0.5))
                mats[record].append(torch.mm(feature, feature.transpose(0, 1)))
        corrected = copy.deepcopy(model)
        modules = dict(corrected.named_modules())
        with torch.no_grad():
            for t in all_targets(corrected):
                record = _record_for(t, mats)
                if record is None or all(M is None for M in mats[record]):
                    continue  # the layer never ran
                w = t.weight(modules)                              # (groups, out/g, d) view
                new = w.detach().clone()
                for g, M in enumerate(mats[record]):
                    if M is not None:
                        M = M.to(device=w.device, dtype=w.dtype)
                        new[g] = torch.mm(w[g], M.transpose(0, 1))
                t.write(modules, new)
        del mats
        _sync(device)
        _sync(model_device)
        times["project"][alpha] = time.perf_counter() - t0
        if on_model is not None:
            on_model(alpha, corrected)
            del corrected
        else:
            models[alpha] = corrected
    times["total"] = times["gather"] + times["svd"] + sum(times["project"].values())
    return OfficialResult(alphas, models, times, rows_kept, widths, svd_times, str(device), cap, kept,
                          progress=progress)
