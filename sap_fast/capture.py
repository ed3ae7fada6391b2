"""Hooks that hand every covered layer's *input* to a sink, once per call of the layer.

Linear/Conv: a forward pre-hook sees the input directly. ``nn.MultiheadAttention`` needs more:
its query/key/value are the inputs of the q/k/v blocks of the in-projection, and the input of
``out_proj`` (the concatenated heads) is never a module input — PyTorch calls
``F.multi_head_attention_forward`` with ``out_proj.weight`` directly, so hooks on ``out_proj``
never fire. We recompute it with the same functional call and an identity output projection,
which keeps every option of the module (masks, bias_kv, zero_attn, causal) exact.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .targets import Target, input_fits

__all__ = ["Sink", "heads_before_out_proj", "Capture"]

# sink(targets, module, x): ``x`` is the input of every target in ``targets`` (several when one
# tensor feeds the q/k/v blocks of a self-attention layer, so its rows are formed only once)
Sink = Callable[[List[Target], nn.Module, torch.Tensor], None]


def _mha_inputs(mha: nn.MultiheadAttention, args, kwargs):
    bound = inspect.signature(mha.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def heads_before_out_proj(mha: nn.MultiheadAttention, call: dict) -> torch.Tensor:
    """The per-token concatenation of all heads, i.e. the input ``out_proj`` would see."""
    query, key, value = call["query"], call["key"], call["value"]
    batched = query.dim() == 3
    if mha.batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e = mha.embed_dim
    identity = torch.eye(e, dtype=query.dtype, device=query.device)
    separate = not mha._qkv_same_embed_dim
    heads, _ = F.multi_head_attention_forward(
        query, key, value, e, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias,
        mha.bias_k, mha.bias_v, mha.add_zero_attn, 0.0, identity, None, training=False,
        key_padding_mask=call["key_padding_mask"], need_weights=False, attn_mask=call["attn_mask"],
        use_separate_proj_weight=separate, q_proj_weight=mha.q_proj_weight if separate else None,
        k_proj_weight=mha.k_proj_weight if separate else None,
        v_proj_weight=mha.v_proj_weight if separate else None, is_causal=call["is_causal"])
    return heads  # token-major layout does not matter: every token is one row


class Capture:
    """Context manager: while active, ``sink(targets, module, input)`` is called per layer call."""

    def __init__(self, model: nn.Module, targets: List[Target], sink: Sink):
        self.model, self.targets, self.sink = model, targets, sink
        self._handles = []

    def __enter__(self) -> "Capture":
        modules = dict(self.model.named_modules())
        by_owner: Dict[str, List[Target]] = {}
        for t in self.targets:
            by_owner.setdefault(t.owner, []).append(t)
        for owner, targets in by_owner.items():
            module = modules[owner]
            if isinstance(module, nn.MultiheadAttention):
                hook = self._mha_hook(targets)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                (target,) = targets
                hook = self._input_hook(target)
                self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _input_hook(self, target: Target):
        def hook(module, args):
            if input_fits(module, args[0]):  # else the module's own forward raises its own error
                self.sink([target], module, args[0])
        return hook

    def _mha_hook(self, targets: List[Target]):
        def hook(module, args, kwargs):
            call = _mha_inputs(module, args, kwargs)
            if not input_fits(module, call):  # the module's own forward raises its own error
                return None
            by_input: Dict[object, Tuple[torch.Tensor, List[Target]]] = {}
            for t in targets:  # q, k, v, then out_proj: records keep this order
                part = t.name.rsplit(".", 1)[1]
                if part == "out_proj":
                    by_input["out_proj"] = (heads_before_out_proj(module, call), [t])
                else:
                    x = call[{"q": "query", "k": "key", "v": "value"}[part]]
                    by_input.setdefault(id(x), (x, []))[1].append(t)
            for x, group in by_input.values():
                self.sink(group, module, x)
            return None
        return hook
