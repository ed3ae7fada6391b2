"""Shared test support: small models covering every layer kind (float64 unless asked otherwise),
relative-error comparisons, and a snapshot of a caller's model to prove it was left unchanged."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO_ROOT, "benchmarks")


def benchmark_module(name: str):
    """The module ``benchmarks/<name>.py`` of this checkout (code only the benchmarks use), imported
    the way the scripts import each other: with ``benchmarks/`` first on ``sys.path``."""
    import importlib
    import sys

    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(name)


class Tokens(nn.Module):
    """Linear on (B, T, d) token inputs, a module called twice, and a classifier."""

    def __init__(self, d=6, t=5, classes=3):
        super().__init__()
        self.embed = nn.Linear(d, 8)
        self.mix = nn.Linear(8, 8)      # called twice per forward
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        h = torch.tanh(self.mix(h)) + self.mix(h * 0.5)
        return self.head(h.mean(1))


class Attention(nn.Module):
    """Self-attention (and optionally cross-attention with kdim/vdim) around an MLP."""

    def __init__(self, e=8, heads=2, batch_first=True, cross=False, classes=3):
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.inp = nn.Linear(5, e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first)
        if cross:
            self.memory = nn.Linear(5, 6)
            self.xattn = nn.MultiheadAttention(e, heads, kdim=6, vdim=6, batch_first=batch_first)
        self.head = nn.Linear(e, classes)

    def forward(self, x):  # x: (B, T, 5)
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        if self.cross:
            m = self.memory(x)
            if not self.batch_first:
                m = m.transpose(0, 1)
            h = h + self.xattn(h, m, m)[0]
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


def conv_net(dim: int, conv_kwargs: dict, c_in=4, c_out=4, classes=3):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](c_in, c_out, **conv_kwargs)
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dim](1)
    return nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten(), nn.Linear(c_out, classes))


CONV_CASES = {  # name: (dim, kwargs, spatial size)
    "1d-stride2-pad1": (1, dict(kernel_size=3, stride=2, padding=1), (11,)),
    "1d-same-even-dil": (1, dict(kernel_size=4, padding="same", dilation=2), (9,)),
    "2d-nonsquare-stride-dil": (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (9, 8)),
    "2d-same-even": (2, dict(kernel_size=(4, 3), padding="same"), (7, 6)),
    "2d-valid": (2, dict(kernel_size=3, padding="valid"), (6, 5)),
    "2d-groups2": (2, dict(kernel_size=3, padding=1, groups=2), (6, 6)),
    "2d-depthwise": (2, dict(kernel_size=3, padding=1, stride=2, groups=4), (7, 7)),
    "2d-reflect": (2, dict(kernel_size=3, padding=2, padding_mode="reflect"), (6, 7)),
    "2d-replicate": (2, dict(kernel_size=3, padding=1, padding_mode="replicate", dilation=2), (7, 6)),
    "2d-circular": (2, dict(kernel_size=(2, 3), padding=(1, 1), padding_mode="circular"), (5, 6)),
    "3d-stride-groups": (3, dict(kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=1, groups=2), (4, 5, 4)),
    "3d-dil-reflect": (3, dict(kernel_size=2, dilation=2, padding=1, padding_mode="reflect"), (4, 4, 5)),
}


def conv_case(name: str, batch: int, seed: int):
    dim, kwargs, size = CONV_CASES[name]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = conv_net(dim, kwargs).double()
    x = torch.randn(batch, 4, *size, generator=g, dtype=torch.float64)
    return model, x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def max_weight_rel_err(fast, ref) -> float:
    """Largest relative error over every parameter of two models of the same architecture."""
    pf, pr = dict(fast.named_parameters()), dict(ref.named_parameters())
    assert pf.keys() == pr.keys()
    return max(rel_err(pf[k].detach(), pr[k].detach()) for k in pr)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, \
        [m.training for m in model.modules()]


def assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), f"caller's model changed: {k}"
    assert [m.training for m in model.modules()] == flags, "caller's train/eval flags changed"


def tiny_vit(classes=3):
    """ViT-B/16's layout (benchmarks/zoo.py) at toy size: 32×32 inputs, 16×16 patches, two
    blocks of width 16, and a random classifier head (torchvision's is zero)."""
    zoo = benchmark_module("zoo")

    torch.manual_seed(0)
    vit = zoo.VisionTransformer(32, 16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                                num_classes=classes)
    nn.init.normal_(vit.heads.head.weight)
    return vit


def unfold_gram(x, kernel_size, stride, padding, dilation, groups) -> torch.Tensor:
    """float64 oracle of a conv Gram kernel (zero padding): R materialised one spatial dim at a
    time with ``Tensor.unfold``, ``(groups, d, d)`` with columns in ``weight.view(out, -1)``
    order (channel, then taps)."""
    x = x.detach().to("cpu", torch.float64)
    spatial = x.dim() - 2
    x = F.pad(x, [p for i in reversed(range(spatial)) for p in (padding[i], padding[i])])
    for i in range(spatial):
        span = dilation[i] * (kernel_size[i] - 1) + 1
        # unfold appends the window as the last dim; every dilation-th element is a tap
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    n, c = x.shape[:2]
    out = x.shape[2: 2 + spatial]
    x = x.reshape(n, groups, c // groups, *out, *kernel_size)
    rows_first = [0, *range(3, 3 + spatial), 1, 2, *range(3 + spatial, 3 + 2 * spatial)]
    r = x.permute(rows_first).reshape(-1, groups, c // groups * math.prod(kernel_size))
    return torch.einsum("rgi,rgj->gij", r, r)


def run_command(argv, out, env=None, timeout: float = 600):
    """``argv`` in a fresh process whose working folder is ``out`` (``{out}`` in an argument is
    replaced by it), with this checkout's ``sap_fast`` first on its ``PYTHONPATH`` and ``env``
    added to the environment. Returns the ``subprocess.CompletedProcess``, its ``out`` set to
    the folder. A command still running after ``timeout`` seconds is killed with every process
    it started (its own process group), and what it wrote is kept."""
    import signal
    import subprocess

    out = str(out)
    argv = [a.replace("{out}", out) for a in argv]
    path = [REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    full_env.update(env or {})
    process = subprocess.Popen(argv, cwd=out, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (AttributeError, ProcessLookupError, PermissionError):
            process.kill()
        stdout, stderr = process.communicate()
        stderr += f"\n[killed after {timeout:.0f} s]"
    run = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    run.out = out
    return run


def model_factory(*extra: str) -> str:
    """The source of a tiny factory module for ``--model module:function`` in the CLI tests:
    ``make(outputs=3)``, a seeded conv + linear net, plus ``extra`` definitions."""
    return '''
import torch
from torch import nn

def make(outputs=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, outputs))
''' + "".join("\n" + e for e in extra)
