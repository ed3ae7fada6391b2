"""sap_fast's input Grams beside the input factors of two KFAC libraries and a hand-written
``F.unfold`` + matmul, on the CPU, in one process.

The input-side Gram ``RᵀR`` that :func:`sap_fast.collect_stats` streams for every Conv/Linear
layer is the input factor ``A`` that KFAC computes for the same layer, up to a normalisation.
This script first checks that: each peer's factor times its normalisation equals sap_fast's
float64 Gram (per layer kind, in float64 on a slice of the batch, and in float32 on the timed
batch); then it times every method (best of ``--repeats`` after one warm-up). The warm-up is
the run whose factors are compared on the timed batch and whose peak memory is measured (the
resident memory sampled every millisecond; the rise over its level at the call).

Methods, all on the same model and the same batch of ``N`` samples:

* ``sap_fast fp64`` / ``sap_fast fp32``: ``sap_fast.collect_stats(model, x, dtype=...)``;
* ``unfold fp32`` / ``unfold fp64``: forward pre-hooks that unfold each conv input with
  ``F.unfold`` (a linear input: its rows) and multiply ``RᵀR`` in that dtype;
* ``curvlinops forward-only``: ``KFACLinearOperator(fisher_type="forward-only")``, input factors
  only (its output-gradient factors are set to the identity, no backward pass);
* ``curvlinops KFAC``: ``KFACLinearOperator`` with its default Monte-Carlo Fisher (one sampled
  label per sample: a backward pass and the output-gradient factors as well);
* ``BackPACK KFAC``: ``backpack.extensions.KFAC()`` (one Monte-Carlo sample: the backward pass,
  plus the sampled square root of the loss Hessian backpropagated through every module);
* ``forward`` (under ``torch.no_grad``) and ``forward + backward`` (cross-entropy, ``.backward()``)
  alone: the floors of the input-side methods and of the KFAC ones.

Models: a VGG-11-shaped CNN at 32×32 (N = 128), a ResNet-18-shaped one at 64×64 (N = 64;
BatchNorm folded into the convs, as eval mode makes it, and the final pooling a fixed
``AvgPool2d``, since BackPACK's KFAC has no BatchNorm or adaptive-pooling extension), and a
ViT-Tiny/16-shaped HF transformers ``ViTForImageClassification`` at 224×224 (N = 32).

    pip install curvlinops-for-pytorch backpack-for-pytorch   (or the package's extra: ".[peers]")
    python benchmarks/peers.py [--models vgg11,resnet18,vit-tiny] [--repeats 3]
                               [--out benchmarks/results/peers-cpu.jsonl]   (and peers-cpu.png beside it)
    python benchmarks/peers.py --tiny     (the same models, a fraction of the width: seconds)
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import math
import os
import sys
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import progress_bar, write_results  # noqa: E402

import sap_fast  # noqa: E402

METHODS = ("sap_fast fp64", "sap_fast fp32", "unfold fp64", "unfold fp32", "curvlinops forward-only",
           "curvlinops KFAC", "BackPACK KFAC", "forward", "forward + backward")
FACTOR_METHODS = METHODS[:7]   # those that return an input factor per layer
AGREE_SAMPLES = 16             # the float64 agreement check's slice of the batch


# ---- models ---------------------------------------------------------------------------------

def vgg11(width: float, classes: int = 10) -> nn.Module:
    layers, c = [], 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            out = max(2, int(v * width))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            c = out
    hidden = max(2, int(512 * width))
    layers += [nn.Flatten(), nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
               nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


class Block(nn.Module):
    """ResNet's basic block, BatchNorm folded into the convs (their biases)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.down = nn.Conv2d(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None
        self.relu2 = nn.ReLU()

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + skip)


class ResNet18(nn.Module):
    def __init__(self, width: float, image: int, classes: int = 10):
        super().__init__()
        w = [max(2, int(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, c = [], w[0]
        for i, out in enumerate(w):
            for j in range(2):
                blocks.append(Block(c, out, 2 if i > 0 and j == 0 else 1))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AvgPool2d(image // 32)  # the last stage's whole map (image/32 square)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.blocks(self.stem(x)))))


class Logits(nn.Module):
    """An HF image classifier as a module that returns its logits tensor."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.vit = hf

    def forward(self, x):
        return self.vit(pixel_values=x).logits


def vit_tiny(tiny: bool, classes: int = 10) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    if tiny:
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, num_labels=classes)
    else:  # ViT-Tiny/16
        config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12,
                           num_attention_heads=3, intermediate_size=768, num_labels=classes)
    config._attn_implementation = "eager"
    return Logits(ViTForImageClassification(config))


def build(name: str, tiny: bool) -> Tuple[nn.Module, int, int, str]:
    """``(model, samples, image size, description)``."""
    scale = " at 1/16 of the width" if tiny else ""
    if name == "vgg11":
        return vgg11(1 / 16 if tiny else 1.0), 8 if tiny else 128, 32, \
            f"VGG-11-shaped CNN (8 convs 3×3, 3 linear){scale}, 32×32"
    if name == "resnet18":
        return ResNet18(1 / 16 if tiny else 1.0, 64), 8 if tiny else 64, 64, \
            f"ResNet-18-shaped (20 convs, 1 linear; BatchNorm folded){scale}, 64×64"
    if name == "vit-tiny":
        what = "2 blocks of width 32, patch 8, 32×32" if tiny else "12 blocks of width 192, patch 16, 224×224"
        return vit_tiny(tiny), 4 if tiny else 32, 32 if tiny else 224, \
            f"ViT-Tiny-shaped HF ViTForImageClassification ({what})"
    raise ValueError(f"unknown model {name!r}; the models are vgg11, resnet18, vit-tiny")


def covered(model: nn.Module) -> Dict[str, nn.Module]:
    """The Conv2d/Linear layers every method reads, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


# ---- the methods: each returns {layer name: (factor, normalisation)} ------------------------

def sap_fast_grams(model, x, y, dtype) -> Dict[str, Tuple[torch.Tensor, float]]:
    stats = sap_fast.collect_stats(model, x, batch_size=x.shape[0], dtype=dtype, show_progress=False)
    return {name: (rec, 1.0) for name, rec in stats.items()}  # LayerStats: .gram on demand


def unfold_grams(model, x, y, dtype) -> Dict[str, Tuple[torch.Tensor, float]]:
    """What one writes by hand: the unfolded rows of every layer's input, then ``RᵀR``."""
    out: Dict[str, Tuple[torch.Tensor, float]] = {}
    handles = []

    def hook(name):
        def pre(module, args):
            a = args[0].detach()
            if isinstance(module, nn.Conv2d):
                a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
                a = a.transpose(1, 2)
            r = a.reshape(-1, a.shape[-1]).to(dtype)
            out[name] = (r.T @ r, 1.0)
        return pre

    for name, m in covered(model).items():
        handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def positions(model, x) -> Dict[str, int]:
    """Weight-sharing positions per layer call: output positions of a conv, tokens of a linear."""
    seen, handles = {}, []
    for name, m in covered(model).items():
        def post(module, args, output, name=name):
            seen[name] = math.prod(output.shape[2:]) if isinstance(module, nn.Conv2d) else \
                math.prod(output.shape[1:-1])
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return seen


def curvlinops_factors(model, x, y, fisher_type: str) -> Dict[str, Tuple[torch.Tensor, float]]:
    from curvlinops import KFACLinearOperator

    layers = covered(model)
    params = [p for m in layers.values() for p in m.parameters(recurse=False)]
    op = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type=fisher_type,
                            check_deterministic=False, num_data=x.shape[0], num_per_example_loss_terms=1)
    op.compute_kronecker_factors()
    share = positions(model, x)
    factors = op.state_dict()["input_covariances"]
    # A = RᵀR / (N · positions): the sharing dimensions count as data points ("expand" KFAC)
    return {name: (a, float(x.shape[0] * share[name])) for name, a in factors.items()}


def backpack_model(model):
    """``(model, loss)`` extended for BackPACK (a copy; residual sums through its converter)."""
    from backpack import extend

    extended = extend(copy.deepcopy(model), use_converter=any(isinstance(m, Block) for m in model.modules()))
    return extended, extend(nn.CrossEntropyLoss())


def backpack_gaps(model) -> List[str]:
    """The module types of ``model`` that BackPACK's KFAC has no extension for (where it says)."""
    from backpack.extensions import KFAC

    known = getattr(KFAC(), "_BackpropExtension__module_extensions", None)
    if known is None:
        return []
    leaves = {type(m) for m in model.modules() if not list(m.children())}
    return sorted(t.__name__ for t in leaves if t not in known)


def backpack_factors(extended, x, y) -> Dict[str, Tuple[torch.Tensor, float]]:
    from backpack import backpack
    from backpack.extensions import KFAC

    model, loss_fn = extended
    model.zero_grad(set_to_none=True)
    with backpack(KFAC(mc_samples=1)):
        loss_fn(model(x), y).backward()
    out = {}
    for name, m in covered(model).items():
        out[name] = (m.weight.kfac[1], float(x.shape[0]))  # [G, A]: A = RᵀR / N
        for p in m.parameters(recurse=False):
            del p.kfac
    model.zero_grad(set_to_none=True)
    return out


def forward_only(model, x, y):
    with torch.no_grad():
        model(x)
    return {}


def forward_backward(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return {}


def method_calls(model) -> Dict[str, Callable]:
    extended = backpack_model(model)
    gaps = backpack_gaps(model)

    def with_backpack(x, y):
        try:
            return backpack_factors(extended, x, y)
        except NotImplementedError as err:
            if not gaps:
                raise
            raise NotImplementedError(f"no KFAC extension for {', '.join(gaps)} ({str(err).splitlines()[0]})") from None

    calls = {
        "sap_fast fp64": lambda x, y: sap_fast_grams(model, x, y, torch.float64),
        "sap_fast fp32": lambda x, y: sap_fast_grams(model, x, y, torch.float32),
        "unfold fp64": lambda x, y: unfold_grams(model, x, y, torch.float64),
        "unfold fp32": lambda x, y: unfold_grams(model, x, y, torch.float32),
        "curvlinops forward-only": lambda x, y: curvlinops_factors(model, x, y, "forward-only"),
        "curvlinops KFAC": lambda x, y: curvlinops_factors(model, x, y, "mc"),
        "BackPACK KFAC": with_backpack,
        "forward": lambda x, y: forward_only(model, x, y),
        "forward + backward": lambda x, y: forward_backward(model, x, y),
    }
    return {m: calls[m] for m in METHODS}


# ---- agreement --------------------------------------------------------------------------------

def kind(module: nn.Module, share: int) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv 1×1" if module.kernel_size == (1, 1) else f"conv {module.kernel_size[0]}×{module.kernel_size[1]}"
    return "linear over tokens" if share > 1 else "linear"


def as_gram(value) -> torch.Tensor:
    return value.gram[0] if isinstance(value, sap_fast.LayerStats) else value


def agreement(reference: Dict[str, Tuple], factors: Dict[str, Tuple], kinds: Dict[str, str]) -> Dict[str, dict]:
    """Per layer kind: the normalisation(s) and the largest ``‖f·A − G‖ / ‖G‖`` over its layers
    (``G``: sap_fast's float64 Gram), and the layers compared."""
    out: Dict[str, dict] = {}
    for name, (value, factor) in factors.items():
        gram = as_gram(reference[name][0]).double()
        err = float((as_gram(value).double() * factor - gram).norm() / gram.norm())
        row = out.setdefault(kinds[name], {"layers": 0, "max_rel_error": 0.0, "factors": set()})
        row["layers"] += 1
        row["max_rel_error"] = max(row["max_rel_error"], err)
        row["factors"].add(factor)
    for row in out.values():
        f = sorted(row.pop("factors"))
        row["factor"] = f[0] if len(f) == 1 else [f[0], f[-1]]
    return out


# ---- timing and memory ------------------------------------------------------------------------

def _trim():
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn: Callable[[], object]) -> Tuple[object, Optional[float]]:
    """``fn()`` and the rise of resident memory over its level at the call (its result included),
    sampled every millisecond in a thread (None where /proc is not there)."""
    if not os.path.exists("/proc/self/statm"):
        return fn(), None
    _trim()
    base = peak = _rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
        peak = max(peak, _rss())
    finally:
        done.set()
        thread.join()
    return result, (peak - base) / 2 ** 20


def timed(fn: Callable[[], object], repeats: int) -> List[float]:
    """The seconds of ``repeats`` calls (after the warm-up, which :func:`measured` made)."""
    times = []
    for _ in range(repeats):
        _trim()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


# ---- one model --------------------------------------------------------------------------------

def run_model(name: str, tiny: bool, repeats: int, progress: bool = True) -> dict:
    torch.manual_seed(0)
    model, n, size, description = build(name, tiny)
    model = model.eval()
    x = torch.randn(n, 3, size, size)
    y = torch.randint(0, 10, (n,))
    layers = covered(model)
    share = positions(model, x)
    kinds = {k: kind(m, share[k]) for k, m in layers.items()}
    calls = method_calls(model)
    result = {"model": name, "description": description, "samples": n, "image_size": size,
              "parameters": sum(p.numel() for p in model.parameters()),
              "layers": {k: sum(1 for v in kinds.values() if v == k) for k in sorted(set(kinds.values()))},
              "threads": torch.get_num_threads(), "methods": {}}
    print(f"{name}: {description}, N = {n}, {len(layers)} layers", flush=True)

    # agreement in float64 on a slice: the normalisations, exactly
    model64 = copy.deepcopy(model).double()
    calls64 = method_calls(model64)
    xs, ys = x[:AGREE_SAMPLES].double(), y[:AGREE_SAMPLES]
    reference64 = calls64["sap_fast fp64"](xs, ys)
    reference = None  # sap_fast fp64's Grams of the whole batch: its warm-up's
    bar = _bar(len(calls), name, progress)
    for method, call in calls.items():
        bar.set_postfix_str(method)
        row = result["methods"].setdefault(method, {})
        try:
            if method in FACTOR_METHODS:
                default = torch.get_default_dtype()
                torch.set_default_dtype(torch.float64)  # BackPACK makes its pooling Jacobians in it
                try:
                    row["agreement_fp64_model"] = agreement(reference64, calls64[method](xs, ys), kinds)
                finally:
                    torch.set_default_dtype(default)
            # the warm-up: its peak memory, and its factors against sap_fast fp64's
            factors, row["peak_rise_mib"] = measured(lambda: call(x, y))
            if method == "sap_fast fp64":
                reference = factors
            if method in FACTOR_METHODS:
                missing = sorted(set(layers) - set(factors))
                row["layers_compared"] = len(factors)
                if missing:
                    row["layers_missing"] = missing
                row["agreement_fp32_model"] = agreement(reference, factors, kinds)
            del factors
            times = timed(lambda: call(x, y), repeats)
            row.update(seconds=min(times), runs=times)
        except Exception as err:  # noqa: BLE001 - one method's failure is reported, not fatal
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        shown = f"{row['seconds']:.3f} s, +{row['peak_rise_mib']:.0f} MiB" if "seconds" in row else row["error"]
        bar.write(f"  {method:24s} {shown}")
        bar.update()
    bar.close()
    del model64, calls64, reference64, reference
    base64 = result["methods"]["sap_fast fp64"].get("seconds")
    base32 = result["methods"]["sap_fast fp32"].get("seconds")
    for row in result["methods"].values():
        if "seconds" in row and base64 and base32:
            row["vs_sap_fast_fp64"] = row["seconds"] / base64
            row["vs_sap_fast_fp32"] = row["seconds"] / base32
    return result


def _bar(total: int, name: str, enabled: bool):
    """A tqdm bar over one model's methods (on stderr), or a stand-in that only prints."""
    return progress_bar(total, name, "method", enabled)


# ---- tables and the plot ----------------------------------------------------------------------------------

WORK = {
    "sap_fast fp64": "forward (no graph), streamed Grams (stride-1 convs: shift-correlation)",
    "sap_fast fp32": "the same, float32 accumulation",
    "unfold fp64": "forward (no graph), whole F.unfold per layer, RᵀR in float64",
    "unfold fp32": "forward (no graph), whole F.unfold per layer, RᵀR in float32",
    "curvlinops forward-only": "forward with autograd graph, unfold, A per layer; G = identity",
    "curvlinops KFAC": "forward + sampled labels + backward, A and G per layer",
    "BackPACK KFAC": "forward + backward + sampled √Hessian backpropagated, A and G per layer",
    "forward": "model(x) under no_grad",
    "forward + backward": "cross-entropy .backward()",
}


def normalisation(method: str, layer_kind: str) -> str:
    """What a method's factor is multiplied by to give ``RᵀR`` (N: samples in the batch)."""
    if method.startswith("curvlinops"):
        if layer_kind.startswith("conv"):
            return "N·P (P: the conv's output positions)"
        return "N·T (T: tokens per sample)" if layer_kind == "linear over tokens" else "N"
    return "N" if method.startswith("BackPACK") else "1"


def markdown(results: List[dict]) -> str:
    lines = []
    for r in results:
        lines += [f"**{r['model']}**: {r['description']}, N = {r['samples']}, layers "
                  + ", ".join(f"{v} {k}" for k, v in r["layers"].items()), "",
                  "| method | what it does | seconds | ÷ sap_fast fp64 | ÷ sap_fast fp32 | peak memory rise |",
                  "|---|---|---:|---:|---:|---:|"]
        for method in METHODS:
            row = r["methods"].get(method)
            if row is None:
                continue
            if "seconds" not in row:
                lines.append(f"| {method} | {WORK[method]} | n/a: {row.get('error', '')} | | | |")
                continue
            lines.append(f"| {method} | {WORK[method]} | {row['seconds']:.3f} | {row['vs_sap_fast_fp64']:.2f}× | "
                         f"{row['vs_sap_fast_fp32']:.2f}× | {row['peak_rise_mib']:.0f} MiB |")
        lines += ["", "| method | layer kind | normalisation (A · factor = RᵀR) | max rel. error, fp64 model | "
                      "max rel. error, fp32 model |", "|---|---|---|---:|---:|"]
        for method in FACTOR_METHODS[1:]:
            row = r["methods"].get(method, {})
            fp32, fp64 = row.get("agreement_fp32_model", {}), row.get("agreement_fp64_model", {})
            for k in sorted(set(fp32) | set(fp64)):
                e64 = f"{fp64[k]['max_rel_error']:.1e}" if k in fp64 else ""
                e32 = f"{fp32[k]['max_rel_error']:.1e}" if k in fp32 else ""
                layers = (fp32.get(k) or fp64.get(k))["layers"]
                lines.append(f"| {method} | {k} ({layers}) | {normalisation(method, k)} | {e64} | {e32} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: List[dict], path: str) -> Optional[str]:
    """Per model, each method's seconds and peak memory rise over sap_fast fp64's (log scale):
    ``path`` (a PNG), or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = [m for m in METHODS if m != "sap_fast fp64"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.9 + 0.42 * len(methods) * max(1, len(results)) / 2.2),
                             sharey=True)
    height = 0.8 / max(1, len(results))
    for k, r in enumerate(results):
        base = r["methods"]["sap_fast fp64"]
        for ax, key in zip(axes, ("seconds", "peak_rise_mib")):
            values, ys = [], []
            for i, m in enumerate(methods):
                row = r["methods"].get(m, {})
                if key in row and base.get(key):
                    values.append(max(row[key], 1e-3) / max(base[key], 1e-3))
                    ys.append(i + (k - (len(results) - 1) / 2) * height)
            ax.barh(ys, values, height=height, label=r["model"])
    for ax, title in zip(axes, ("time ÷ sap_fast fp64", "peak memory rise ÷ sap_fast fp64")):
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3, which="both")
    axes[0].set_yticks(range(len(methods)))
    axes[0].set_yticklabels(methods)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right")
    fig.suptitle(f"Input factors on the CPU ({results[0]['threads']} threads; shorter is better; "
                 "a missing bar: the method failed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    # BackPACK's module hooks on models whose outputs are not tensors (the HF ViT) warn each call
    warnings.filterwarnings("ignore", message="For backward hooks to be called")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg11,resnet18,vit-tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the same models at a fraction of the width (seconds)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "peers-cpu.jsonl"))
    parser.add_argument("--plot", help="the PNG (default: --out with .png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    missing = [name for name, module in (("curvlinops-for-pytorch", "curvlinops"), ("backpack-for-pytorch", "backpack"))
               if not _importable(module)]
    if missing:
        print(f"peers.py: {' and '.join(missing)} not installed; pip install {' '.join(missing)} "
              "(the package's extra: .[peers])", file=sys.stderr)
        return 2
    load_at_start = list(os.getloadavg())  # other work on the machine moves the times: it is recorded
    results = [run_model(name, args.tiny, args.repeats, not args.no_progress) for name in args.models.split(",")]
    table = markdown(results)
    print(table)
    png = plot(results, args.plot or os.path.splitext(args.out)[0] + ".png")
    if png:
        print(f"wrote {png}")
    from importlib.metadata import version
    write_results(args.out, {"results": results, "markdown": table}, keyed={"methods": "method"}, threads=torch.get_num_threads(),
                  tiny=args.tiny, repeats=args.repeats, load_average_at_start=load_at_start,
                  load_average_at_end=list(os.getloadavg()),
                  versions={p: version(p) for p in ("curvlinops-for-pytorch", "backpack-for-pytorch", "transformers")})
    return 0


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # noqa: BLE001 - not installed, or broken against this torch
        return False


if __name__ == "__main__":
    sys.exit(main())
