"""Hooks must not serialise a GPU: nothing in the per-batch path of :func:`collect_stats` may
read a tensor back to the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, …), which on
CUDA would stall the stream once per batch and layer.

The CPU twin of ``torch.cuda.set_sync_debug_mode("error")`` (which
tests/backends/test_cuda_ops.py uses on a GPU): a TorchFunctionMode records every host-reading
call, and the count must not grow with the number of batches. The end-of-pass finiteness check is one read for all layers.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import sap_fast
from support import Attention, Tokens, conv_case

HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.cpu,
              torch.Tensor.numpy, torch.Tensor.__int__, torch.Tensor.__float__,
              torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.unique,
              torch.Tensor.unique}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _models():
    torch.manual_seed(0)
    conv, x = conv_case("2d-groups2", batch=12, seed=0)    # gram mode, grouped conv
    yield "conv", conv, x
    yield "tokens", Tokens().double(), torch.randn(12, 5, 6, dtype=torch.float64)  # rows + repeated module
    yield "attention", Attention().double(), torch.randn(12, 4, 5, dtype=torch.float64)  # q/k/v + out_proj


@pytest.mark.parametrize("name, model, x", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_host_reads_do_not_grow_with_batches(name, model, x):
    counts = {}
    for batch_size in (6, 2, 1):  # 2, 6 and 12 batches
        with HostReads() as mode:
            sap_fast.collect_stats(model, x, batch_size=batch_size, show_progress=False)
        counts[batch_size] = mode.calls
    assert counts[6] == counts[2] == counts[1], counts
    assert len(counts[1]) <= 1, counts  # the one finiteness read for all layers


def test_non_finite_layer_is_still_named_after_one_read():
    conv, x = conv_case("2d-groups2", batch=4, seed=1)
    x = x.clone()
    x[2, 0, 0, 0] = float("nan")
    with HostReads() as mode, pytest.raises(ValueError, match="non-finite activations .* layer '"):
        sap_fast.collect_stats(conv, x, batch_size=1, show_progress=False)
    assert len(mode.calls) == 1
