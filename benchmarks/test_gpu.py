"""pytest-benchmark suite for the GPU measurements (benchmarks/README.md), side by side in one run:
Gram accumulation per precision mode, correct() per solver, sweep() per solver, and the official
approach's gather + SVD, for ResNet-50 and ViT-B/16 at 224×224 (1000 trusted samples, batch 128,
inputs on the GPU). The scripts benchmarks/gpu_gram.py and gpu_e2e.py add floors, memory, Wp
errors and per-stage tables.

    python -m pytest benchmarks/test_gpu.py --benchmark-only --benchmark-group-by=param:model \
        --benchmark-json=$OUT/gpu-bench.json

Skips, saying why, on a machine without CUDA.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: these benchmarks run on the GPU machine (benchmarks/gpu_suite.sh)",
                allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sap_fast  # noqa: E402
import zoo as bench_models  # noqa: E402
from gpu_gram import KERNELS, MODES, mode_settings  # noqa: E402

SAMPLES, BATCH, SIZE = 1000, 128, 224
ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module", params=["resnet50", "vit_b_16"])
def model(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    net = bench_models.build(request.param, num_classes=14, device="cuda").eval()
    x = torch.randn(SAMPLES, 3, SIZE, SIZE, device="cuda").relu_()
    yield request.param, net, x
    del net, x
    torch.cuda.empty_cache()


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("mode", list(MODES) + list(KERNELS))
def test_gram(benchmark, model, mode, monkeypatch):
    name, net, x = model
    benchmark.group = f"{name}: Gram"
    kwargs, kernel, _ = mode_settings(mode)
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", kernel)
    stats = benchmark.pedantic(_synced(lambda: sap_fast.collect_stats(
        net, x, batch_size=BATCH, show_progress=False, **kwargs)), **ROUNDS)
    assert stats.num_samples == SAMPLES


def test_forward_only(benchmark, model):
    """The forward pass collect_stats must run anyway: Gram time = collect_stats − this."""
    name, net, x = model
    benchmark.group = f"{name}: Gram"

    def forward():
        with torch.no_grad():
            for start in range(0, SAMPLES, BATCH):
                net(x[start:start + BATCH])
    benchmark.pedantic(_synced(forward), **ROUNDS)


@pytest.mark.parametrize("solver", ["cholesky", "eigh"])
def test_correct(benchmark, model, solver):
    name, net, x = model
    benchmark.group = f"{name}: correct() at α=3e4, exact mode"
    fixed = benchmark.pedantic(_synced(lambda: sap_fast.correct(net, x, alpha=3e4, batch_size=BATCH,
                                                                solver=solver)), **ROUNDS)
    assert fixed is not net


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_sweep(benchmark, model, solver):
    name, net, x = model
    benchmark.group = f"{name}: sweep() over the default grid"
    val = (x, torch.randint(0, 14, (len(x),), device="cuda"))  # random labels: only the time matters
    result = benchmark.pedantic(_synced(lambda: sap_fast.sweep(net, x, val, batch_size=BATCH, solver=solver,
                                                               show_progress=False)), **ROUNDS)
    assert len(result.table) == 12


def test_official_gather_and_svd(benchmark, model):
    from official import official_correct
    name, net, x = model
    benchmark.group = f"{name}: correct() at α=3e4, exact mode"
    benchmark.pedantic(_synced(lambda: official_correct(net, x, [3e4], max_batch_size=BATCH,
                                                        on_model=lambda a, m: None)),
                       rounds=1, iterations=1, warmup_rounds=0)
