"""pytest-benchmark suite: the portable path against the reference, side by side.

    python -m pytest benchmarks/test_bench_portable.py --benchmark-only --benchmark-group-by=param:case

Compare within one run (same machine, same load); absolute CPU times mean little.
"""
import pytest
import torch
from torch import nn

import sap_fast
from sap_fast import reference

CASES = {
    "conv3x3-32ch-16px": (lambda: nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                                nn.Flatten(), nn.Linear(32 * 256, 10)), (32, 16, 16), 32),
    "wide-linear-4096": (lambda: nn.Sequential(nn.Linear(4096, 10)), (4096,), 500),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    build, shape, n = CASES[request.param]
    torch.manual_seed(0)
    return request.param, build(), torch.randn(n, *shape).relu()


@pytest.mark.parametrize("impl", ["sap_fast", "reference"])
def test_correct(benchmark, case, impl):
    name, model, x = case
    benchmark.group = name
    fn = (lambda: sap_fast.correct(model, x, alpha=3e4)) if impl == "sap_fast" else \
        (lambda: reference.correct(model, x, alpha=3e4))
    out = benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)
    assert isinstance(out, nn.Module)
