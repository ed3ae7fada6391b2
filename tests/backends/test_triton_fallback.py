"""A Triton kernel that fails to compile on the user's machine (a Triton release that rejects it,
ptxas refusing it, too little shared memory) falls back to the torch path with one warning that
names the kernel and the Triton version, and is not tried again in that process; any other
error of a kernel still raises. Run through the gram stage's chooser on the CPU, where Triton's
interpreter serves ``SAP_FAST_GRAM_KERNEL=triton``, with the kernel made to fail as ptxas does."""
import warnings

import pytest
import torch
from torch import nn

import sap_fast
from sap_fast.backends import dispatch
from sap_fast.backends import triton as triton_backend

from .triton_support import update_stage_that_fails_to_compile

tl_gram = pytest.importorskip("sap_fast.backends.triton.gram")
OutOfResources = pytest.importorskip("triton.runtime.errors").OutOfResources

pytestmark = pytest.mark.skipif(not tl_gram.interpreted(), reason="needs Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.fixture
def fresh_kernels(monkeypatch):
    """No kernel marked broken before or after the test."""
    monkeypatch.setattr(triton_backend, "_BROKEN", {})
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", "triton")
    return triton_backend._BROKEN


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    return model, torch.randn(6, 3, 5, 5)


def test_the_interpreted_kernel_serves_the_triton_choice_on_cpu(fresh_kernels, monkeypatch):
    model, x = model_and_data()
    calls = []
    real = tl_gram.conv_gram
    monkeypatch.setattr(tl_gram, "conv_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    triton_stats = sap_fast.collect_stats(model, x, batch_size=3, show_progress=False)
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", "auto")
    portable = sap_fast.collect_stats(model, x, batch_size=3, show_progress=False)
    assert calls  # the Triton kernel ran
    for name in portable:
        assert torch.allclose(triton_stats[name].gram, portable[name].gram, rtol=1e-12, atol=1e-12)


def test_a_kernel_that_fails_to_compile_warns_once_then_the_torch_path_serves(fresh_kernels, monkeypatch):
    model, x = model_and_data()
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", "auto")
    want = sap_fast.collect_stats(model, x, batch_size=3, show_progress=False)
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", "triton")
    tries = []

    def refused(*args, **kwargs):
        tries.append(1)
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(tl_gram, "conv_gram", refused)
    monkeypatch.setattr(tl_gram, "linear_gram", refused)
    with pytest.warns(RuntimeWarning) as caught:
        got = sap_fast.collect_stats(model, x, batch_size=3, show_progress=False)
    messages = [str(w.message) for w in caught if "Triton" in str(w.message)]
    assert len(messages) == 1, messages
    import triton
    assert "Triton gram kernel does not compile here" in messages[0]
    assert f"triton {triton.__version__}" in messages[0] and "shared memory" in messages[0]
    assert "\n" not in messages[0]
    for name in want:  # the rows streamed (the CPU's own route for convs is the shift kernel)
        assert torch.allclose(got[name].gram, want[name].gram, rtol=1e-12, atol=1e-12)
    # not tried again in this process, and said so by backend_info
    assert len(tries) == 1 and triton_backend.for_device("gram", "cpu") is None
    assert "does not compile here" in sap_fast.backend_info()["triton_gram"]["compile_failure"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = sap_fast.collect_stats(model, x, batch_size=3, show_progress=False)
    assert len(tries) == 1  # the route now skips Triton: what "auto" picks
    assert all(torch.allclose(again[n].gram, want[n].gram, rtol=1e-12, atol=1e-12) for n in want)


def test_an_error_of_a_kernel_that_compiled_is_not_hidden(fresh_kernels, monkeypatch):
    model, x = model_and_data()

    def faulty(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tl_gram, "conv_gram", faulty)
    with pytest.raises((RuntimeError, ValueError), match="illegal memory access"):
        sap_fast.collect_stats(model, x, batch_size=3, show_progress=False)
    assert not fresh_kernels


def test_the_update_kernel_falls_back_the_same_way(fresh_kernels):
    """The update stage's chooser: a Triton implementation that fails to compile (its kernel
    stood in by one that raises as ptxas does) falls through to torch."""
    stage = update_stage_that_fails_to_compile()
    with pytest.warns(RuntimeWarning, match="Triton update kernel does not compile here .*using torch matmuls"):
        assert dispatch.call(stage, None) == "torch"
    assert "update" in fresh_kernels and triton_backend.compiled("update") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert dispatch.call(stage, None) == "torch"  # warned once only
