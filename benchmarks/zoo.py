"""ResNet-50 and ViT-B/16 in plain torch, in torchvision's layout, plus a per-layer cost census.

torchvision and timm need not import (they do not on the CPU development machine), so this module
rebuilds the two models the GPU benchmarks use with torchvision's module names, layout and (random)
initialisation:

- :func:`resnet50`: ResNet-50 v1.5 (stride on the 3×3 conv), ``conv1 bn1 relu maxpool
  layer1..layer4 avgpool fc``; Bottleneck blocks ``conv1 bn1 conv2 bn2 conv3 bn3 relu
  [downsample.0 (1×1 conv), downsample.1 (BN)]``. 23,536,718 parameters with 14 classes.
- :func:`vit_b_16`: ViT-B/16, ``conv_proj`` (16×16/16), ``class_token``, ``encoder.pos_embedding``,
  ``encoder.layers.encoder_layer_{i}`` (``ln_1``, ``self_attention`` =
  ``nn.MultiheadAttention(768, 12, batch_first=True)``, ``ln_2``, ``mlp.0`` Linear 768→3072,
  ``mlp.1`` GELU, ``mlp.2`` Dropout, ``mlp.3`` Linear 3072→768, ``mlp.4`` Dropout),
  ``encoder.ln``, ``heads.head``. 85,809,422 parameters with 14 classes.

:func:`build` returns torchvision's model where torchvision imports (the GPU machine) and ours
otherwise; ``model.bench_source`` says which ("torchvision" or "benchmarks/zoo.py").

:func:`census` lists, per layer SAP covers (``sap_fast.targets.select_targets``), the
width d, rows per sample L, and the Gram cost per sample (L·d² MACs, L·d(d+1)/2 for the
symmetric half), from one batch-1 forward on the meta device (no memory, no compute). The totals
for both models, and the floors derived from them, are tabulated in docs/cost-census.md:

    >>> c = census(build("resnet50"))
    >>> c.gram_flops(1000) / 1e12          # 40.78 TFLOP for 1000 samples at 224×224

The census counts every Gram once: in self-attention the q/k/v blocks of ``in_proj`` read the
same tensor, so k and v carry ``gram_of = <the q target>`` and are left out of the totals by
default (``distinct=False`` counts them too). :func:`shift_macs` counts one target's Gram in the
shift-correlation form where that form applies (stride-1 convs).
"""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional

import torch
from torch import nn

from sap_fast.targets import CONV_TYPES, select_targets

__all__ = ["resnet50", "vit_b_16", "build", "census", "shift_macs", "Census", "LayerCensus", "MODELS",
           "Bottleneck", "ResNet", "VisionTransformer", "EncoderBlock", "Encoder"]

MODELS = ("resnet50", "vit_b_16")
OURS = "benchmarks/zoo.py"


# -- ResNet-50 (torchvision layout, v1.5) --------------------------------------------------------
def _conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv1x1(c_in, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)  # v1.5: the stride sits on the 3×3
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, width: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * Bottleneck.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, width * Bottleneck.expansion, stride),
                                       nn.BatchNorm2d(width * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, width, stride, downsample)]
        self.inplanes = width * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 14) -> ResNet:
    """ResNet-50 v1.5 with torchvision's names and random initialisation."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes)


# -- ViT-B/16 (torchvision layout) ---------------------------------------------------------------
class MLPBlock(nn.Sequential):
    """``0`` Linear, ``1`` GELU, ``2`` Dropout, ``3`` Linear, ``4`` Dropout (torchvision's MLP)."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float):
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp_dim, in_dim), nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout,
                                                    batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout))
            for i in range(num_layers)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, input):
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """torchvision's ViT without the conv stem / representation layer options."""

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int,
                 hidden_dim: int, mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0,
                 num_classes: int = 1000):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1  # + the class token
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout)
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        # torchvision's initialisation (its zero classifier included; see build(random_head=))
        fan_in = self.conv_proj.in_channels * self.conv_proj.kernel_size[0] * self.conv_proj.kernel_size[1]
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x):
        n, _, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        x = self.conv_proj(x)  # (n, hidden, h/p, w/p)
        return x.reshape(n, self.hidden_dim, (h // p) * (w // p)).permute(0, 2, 1)

    def forward(self, x):
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


def vit_b_16(num_classes: int = 14, image_size: int = 224) -> VisionTransformer:
    """ViT-B/16 with torchvision's names and random initialisation (classifier head zero, as in
    torchvision; ``build`` re-draws it)."""
    return VisionTransformer(image_size, 16, num_layers=12, num_heads=12, hidden_dim=768,
                             mlp_dim=3072, num_classes=num_classes)


# -- build ---------------------------------------------------------------------------------------
def _canonical(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "").replace("/", "")
    aliases = {"resnet50": "resnet50", "vitb16": "vit_b_16"}
    if key not in aliases:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    return aliases[key]


def _torchvision_builder(name: str):
    try:
        import torchvision.models as tvm
    except Exception:  # not installed, or broken against this torch
        return None
    return getattr(tvm, name)


def build(name: str, num_classes: int = 14, prefer_torchvision: bool = True, *,
          device=None, random_head: bool = True, image_size: int = 224) -> nn.Module:
    """``resnet50`` or ``vit_b_16`` (dashes/underscores optional), randomly initialised.

    torchvision's builder when ``prefer_torchvision`` and torchvision imports, ours otherwise;
    ``model.bench_source`` is ``"torchvision"`` or ``"benchmarks/zoo.py"``. ``device``
    builds the parameters there directly (``"meta"`` for a free, shape-only model).
    ``random_head``: a zero-initialised classifier (torchvision's ViT) is re-drawn with
    ``nn.Linear``'s default initialisation, whichever the source, so logits and projected heads
    are not all zero.
    ``image_size``: the ViT's input side (its position embedding depends on it; smoke runs use
    32); ResNet-50 takes any size.
    """
    name = _canonical(name)
    builder = _torchvision_builder(name) if prefer_torchvision else None
    with torch.device(device) if device is not None else _nullcontext():
        extra = {"image_size": image_size} if name == "vit_b_16" and image_size != 224 else {}
        if builder is not None:
            model, source = builder(num_classes=num_classes, **extra), "torchvision"
        else:
            model, source = {"resnet50": resnet50, "vit_b_16": vit_b_16}[name](num_classes, **extra), OURS
        if random_head:
            head = model.fc if name == "resnet50" else model.heads.head
            if head.weight.device.type != "meta" and not head.weight.detach().any():
                head.reset_parameters()
    model.bench_source = source
    return model


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- census --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCensus:
    """One covered target: its input width d (per group), rows per sample L (per group)."""

    name: str                 # target name, as sap_fast.targets names it
    kind: str                 # "conv", "linear", "mha.q/k/v", "mha.out_proj"
    d: int
    groups: int
    rows_per_sample: int
    c_out: int                # output features of this target (all groups)
    gram_of: Optional[str] = None  # target whose Gram is identical (same input tensor)

    @property
    def gram_macs(self) -> int:
        """L·d² per group, summed over groups: MACs per sample of the full Gram RᵀR."""
        return self.groups * self.rows_per_sample * self.d * self.d

    @property
    def sym_macs(self) -> int:
        """MACs per sample of the Gram's upper triangle only."""
        return self.groups * self.rows_per_sample * self.d * (self.d + 1) // 2

    @property
    def fwd_macs(self) -> int:
        """MACs per sample of the layer's own matmul (L·d·C_out)."""
        return self.rows_per_sample * self.d * self.c_out


class Census:
    """Per-target census of one model at one input size, with totals for N samples."""

    def __init__(self, layers: List[LayerCensus], image_size: int):
        self.layers, self.image_size = layers, image_size

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerCensus:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def distinct(self) -> List[LayerCensus]:
        """The targets with a Gram of their own (self-attention's k and v share q's)."""
        return [l for l in self.layers if l.gram_of is None]

    def _pick(self, distinct: bool) -> List[LayerCensus]:
        return self.distinct() if distinct else self.layers

    def gram_flops(self, n: int = 1, symmetric: bool = False, distinct: bool = True) -> int:
        """2·n·Σ L·d² (or the symmetric half): FLOPs of every Gram over n samples."""
        return 2 * n * sum(l.sym_macs if symmetric else l.gram_macs for l in self._pick(distinct))

    def fwd_flops(self, n: int = 1) -> int:
        """2·n·Σ L·d·C_out over every target (conv/linear matmuls; attention's QKᵀ/AV excluded)."""
        return 2 * n * sum(l.fwd_macs for l in self.layers)

    def eig_flops(self, distinct: bool = True) -> int:
        """Σ 9d³ (per group): textbook symmetric eigensolver cost of every Gram."""
        return sum(9 * l.groups * l.d ** 3 for l in self._pick(distinct))

    def cholesky_flops(self, distinct: bool = True) -> float:
        return sum(l.groups * l.d ** 3 / 3 for l in self._pick(distinct))

    def gram_bytes(self, itemsize: int = 4, distinct: bool = True) -> int:
        """Memory of all Grams (full d×d per group)."""
        return sum(itemsize * l.groups * l.d * l.d for l in self._pick(distinct))

    def rows_bytes(self, n: int, itemsize: int = 4, distinct: bool = True) -> int:
        """Memory of every materialised R (n·L rows × d) — what an unfold-and-store method holds."""
        return sum(itemsize * n * l.groups * l.rows_per_sample * l.d for l in self._pick(distinct))

    def summary(self, n: int = 1000) -> Dict[str, float]:
        distinct = self.distinct()
        return {"image_size": self.image_size, "samples": n, "targets": len(self.layers),
                "distinct_grams": len(distinct),
                "gram_tflop_full": self.gram_flops(n) / 1e12,
                "gram_tflop_sym": self.gram_flops(n, symmetric=True) / 1e12,
                "fwd_tflop": self.fwd_flops(n) / 1e12,
                "eig_tflop_9d3": self.eig_flops() / 1e12,
                "cholesky_tflop": self.cholesky_flops() / 1e12,
                "grams_fp32_MB": self.gram_bytes(4) / 1e6,
                "grams_fp64_MB": self.gram_bytes(8) / 1e6,
                "rows_fp32_GB": self.rows_bytes(n, 4) / 1e9,
                "max_d": max(l.d for l in distinct),
                "sum_d": sum(l.groups * l.d for l in distinct)}

    def table(self) -> List[dict]:
        return [{"name": l.name, "kind": l.kind, "d": l.d, "groups": l.groups,
                 "rows_per_sample": l.rows_per_sample, "c_out": l.c_out,
                 "gram_macs": l.gram_macs, "sym_macs": l.sym_macs, "fwd_macs": l.fwd_macs,
                 "gram_of": l.gram_of} for l in self.layers]


def _mha_call(mha: nn.MultiheadAttention, args, kwargs) -> dict:
    bound = inspect.signature(mha.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def census(model: nn.Module, image_size: int = 224, *, input_shape=None) -> Census:
    """Per covered target: d, rows per sample, Gram/forward MACs per sample.

    One forward of a batch-1 input ``(1, 3, image_size, image_size)`` (or ``input_shape``,
    batch first, batch 1) on the meta device: the model's parameters and buffers are swapped for
    meta tensors with ``torch.func.functional_call``, so nothing is computed or allocated and the
    caller's model is not touched. Rows are counted by hooks: forward hooks on convs (output
    positions) and linears (input rows), and a pre-hook on each ``nn.MultiheadAttention`` (its
    ``out_proj`` hooks never fire; q/k/v/out_proj rows come from the query/key/value token counts).
    A target called several times per forward counts all its calls; one never called gets 0 rows.
    """
    targets = select_targets(model)
    modules = dict(model.named_modules())
    rows: Dict[str, int] = {t.name: 0 for t in targets}
    gram_of: Dict[str, Optional[str]] = {t.name: None for t in targets}
    handles = []

    def conv_hook(mod, args, out, name):
        rows[name] += out.numel() // mod.out_channels  # output positions (batch 1)

    def linear_hook(mod, args, out, name):
        x = args[0]
        rows[name] += x.numel() // mod.in_features

    def mha_hook(mod, args, kwargs, name):
        call = _mha_call(mod, args, kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        rows[f"{name}.q"] += q.numel() // mod.embed_dim
        rows[f"{name}.k"] += k.numel() // mod.kdim
        rows[f"{name}.v"] += v.numel() // mod.vdim
        rows[f"{name}.out_proj"] += q.numel() // mod.embed_dim
        if k is q:
            gram_of[f"{name}.k"] = f"{name}.q"
        if v is q:
            gram_of[f"{name}.v"] = f"{name}.q"
        elif v is k:
            gram_of[f"{name}.v"] = f"{name}.k"

    owners = {t.owner for t in targets}
    try:
        for owner in owners:
            mod = modules[owner]
            if isinstance(mod, nn.MultiheadAttention):
                handles.append(mod.register_forward_pre_hook(partial(mha_hook, name=owner), with_kwargs=True))
            elif isinstance(mod, CONV_TYPES):
                handles.append(mod.register_forward_hook(partial(conv_hook, name=owner)))
            else:
                handles.append(mod.register_forward_hook(partial(linear_hook, name=owner)))
        state = {k: torch.empty_like(v, device="meta")
                 for k, v in [*model.named_parameters(), *model.named_buffers()]}
        shape = tuple(input_shape) if input_shape is not None else (1, 3, image_size, image_size)
        if shape[0] != 1:
            raise ValueError(f"census counts rows per sample: input_shape must have batch 1, got {shape}")
        x = torch.empty(shape, device="meta")
        was_training = [m.training for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                torch.func.functional_call(model, state, (x,), strict=False, tie_weights=True)
        finally:
            for m, flag in zip(model.modules(), was_training):
                m.training = flag
    finally:
        for h in handles:
            h.remove()

    layers = []
    for t in targets:
        mod = modules[t.owner]
        if isinstance(mod, nn.MultiheadAttention):
            part = t.name.rsplit(".", 1)[1]
            kind, c_out = f"mha.{part}", mod.embed_dim
        elif isinstance(mod, CONV_TYPES):
            kind, c_out = "conv", mod.out_channels
        else:
            kind, c_out = "linear", mod.out_features
        layers.append(LayerCensus(t.name, kind, t.d, t.groups, rows[t.name], c_out, gram_of[t.name]))
    return Census(layers, image_size)


def shift_macs(model: nn.Module, layer: LayerCensus) -> int:
    """MACs per sample of one target's Gram in the shift-correlation form where it applies
    (stride-1 convs with a kernel of more than one element: ((2k_h−1)(2k_w−1)+1)/2 C×C
    correlations per position, as δ and −δ give transposed blocks), else its upper triangle."""
    module = dict(model.named_modules()).get(layer.name)
    kernel = getattr(module, "kernel_size", None)
    if kernel is None or math.prod(kernel) == 1 or any(s != 1 for s in module.stride):
        return layer.sym_macs
    channels = layer.d // math.prod(kernel)
    offsets = (math.prod(2 * k - 1 for k in kernel) + 1) // 2  # δ and −δ give transposed blocks
    return layer.groups * layer.rows_per_sample * offsets * channels * channels


if __name__ == "__main__":  # print the census of both models
    import json

    for model_name in MODELS:
        m = build(model_name, device="meta")
        print(model_name, m.bench_source, sum(p.numel() for p in m.parameters()))
        print(json.dumps(census(m).summary(1000), indent=1))
