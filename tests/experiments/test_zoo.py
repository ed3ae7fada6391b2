"""benchmarks/zoo.py: ResNet-50 v1.5 and ViT-B/16 in torchvision's layout (names,
parameter counts, forwards) and their per-layer cost census, whose totals are the ones tabulated in
docs/cost-census.md and whose rows equal sap_fast.reference's representations."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sap_fast import reference
from sap_fast.targets import select_targets
from support import benchmark_module, tiny_vit

bm = benchmark_module("zoo")

pytestmark = pytest.mark.usefixtures("one_thread")

R50_PARAMS, VIT_PARAMS = 23_536_718, 85_809_422   # 14 classes (torchvision's counts)
VIT = "encoder.layers.encoder_layer_"


@pytest.fixture(scope="module")
def r50():
    return bm.build("resnet50", prefer_torchvision=False)


@pytest.fixture(scope="module")
def vit_meta():
    return bm.build("vit_b_16", prefer_torchvision=False, device="meta")


# -- models ----------------------------------------------------------------------------------------
def test_parameter_counts_and_source(r50, vit_meta):
    assert sum(p.numel() for p in r50.parameters()) == R50_PARAMS
    assert sum(p.numel() for p in vit_meta.parameters()) == VIT_PARAMS
    assert r50.bench_source == vit_meta.bench_source == "benchmarks/zoo.py"
    try:
        import torchvision  # noqa: F401
        expected = "torchvision"
    except Exception:
        expected = "benchmarks/zoo.py"
    assert bm.build("ViT-B/16", device="meta").bench_source == expected
    with pytest.raises(ValueError, match="unknown model"):
        bm.build("resnet18")


def test_resnet50_names_and_layout(r50):
    names = [t.name for t in select_targets(r50)]
    assert len(names) == 54
    for n in ("conv1", "layer1.0.conv2", "layer1.0.downsample.0", "layer2.0.conv2", "layer4.2.conv3", "fc"):
        assert n in names
    assert names[0] == "conv1" and names[-1] == "fc"
    mods = dict(r50.named_modules())
    assert mods["layer2.0.conv2"].stride == (2, 2) and mods["layer2.0.conv1"].stride == (1, 1)  # v1.5
    assert isinstance(mods["layer3.0.downsample.1"], nn.BatchNorm2d)
    assert isinstance(mods["avgpool"], nn.AdaptiveAvgPool2d) and isinstance(mods["maxpool"], nn.MaxPool2d)


def test_vit_b16_names_and_layout(vit_meta):
    names = [t.name for t in select_targets(vit_meta)]
    assert len(names) == 1 + 12 * 6 + 1
    for part in ("q", "k", "v", "out_proj"):
        assert f"{VIT}0.self_attention.{part}" in names
    for n in ("conv_proj", f"{VIT}0.mlp.0", f"{VIT}11.mlp.3", "heads.head"):
        assert n in names
    mods = dict(vit_meta.named_modules())
    mha = mods[f"{VIT}0.self_attention"]
    assert isinstance(mha, nn.MultiheadAttention) and mha.batch_first
    assert (mha.embed_dim, mha.num_heads) == (768, 12)
    assert [type(mods[f"{VIT}0.mlp.{i}"]) for i in range(5)] == [nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout]
    assert mods[f"{VIT}0.mlp.0"].out_features == 3072
    conv = mods["conv_proj"]
    assert conv.kernel_size == conv.stride == (16, 16)
    keys = set(vit_meta.state_dict())
    assert {"class_token", "encoder.pos_embedding", f"{VIT}0.self_attention.in_proj_weight",
            f"{VIT}0.ln_1.weight", f"{VIT}0.ln_2.bias", "encoder.ln.weight", "heads.head.weight"} <= keys
    assert vit_meta.encoder.pos_embedding.shape == (1, 197, 768)


def test_forwards(r50, vit_meta):
    torch.manual_seed(0)
    r50.eval()
    with torch.no_grad():
        out = r50(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 14) and torch.isfinite(out).all() and out.abs().sum() > 0
    assert vit_meta(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 14)
    with pytest.raises(Exception, match="Wrong image height"):
        vit_meta(torch.empty(1, 3, 32, 224, device="meta"))


def test_vit_forward_matches_a_hand_unrolled_one():
    vit = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = vit(x)
        t = F.conv2d(x, vit.conv_proj.weight, vit.conv_proj.bias, stride=16).flatten(2).transpose(1, 2)
        t = torch.cat([vit.class_token.expand(2, -1, -1), t], 1) + vit.encoder.pos_embedding
        for blk in vit.encoder.layers:
            a = blk.self_attention
            h = F.layer_norm(t, (16,), blk.ln_1.weight, blk.ln_1.bias, 1e-6)
            q, k, v = (F.linear(h, w, b).view(2, 5, 2, 8).transpose(1, 2)
                       for w, b in zip(a.in_proj_weight.chunk(3), a.in_proj_bias.chunk(3)))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
            t = t + F.linear(att.transpose(1, 2).reshape(2, 5, 16), a.out_proj.weight, a.out_proj.bias)
            h = F.layer_norm(t, (16,), blk.ln_2.weight, blk.ln_2.bias, 1e-6)
            t = t + blk.mlp[3](F.gelu(blk.mlp[0](h)))
        t = F.layer_norm(t, (16,), vit.encoder.ln.weight, vit.encoder.ln.bias, 1e-6)
        want = vit.heads.head(t[:, 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a few seconds: left out of the fast target
def test_build_redraws_a_zero_head():
    torch.manual_seed(0)
    model = bm.build("vit_b_16", prefer_torchvision=False)
    assert model.heads.head.weight.abs().sum() > 0
    bare = bm.build("vit_b_16", prefer_torchvision=False, random_head=False)  # torchvision's init
    assert bare.heads.head.weight.abs().sum() == 0


def test_census_totals_match_the_cost_census(r50, vit_meta):
    c = bm.census(r50)
    assert len(c) == 54 and len(c.distinct()) == 54
    assert c.gram_flops(1000) / 1e12 == pytest.approx(40.78, rel=1e-3)
    assert c.gram_flops(1000, symmetric=True) / 1e12 == pytest.approx(20.41, rel=1e-3)
    assert c.fwd_flops(1000) / 1e12 == pytest.approx(8.17, rel=1e-3)
    assert c.summary()["sum_d"] == 54_931
    for name, d, rows in (("conv1", 147, 12544), ("layer1.0.conv2", 576, 3136), ("layer4.0.conv2", 4608, 49),
                          ("layer2.0.downsample.0", 256, 784), ("fc", 2048, 1)):
        assert (c[name].d, c[name].rows_per_sample) == (d, rows)
    assert c["layer1.0.conv2"].gram_macs == 1_040_449_536 and c["layer1.0.conv2"].sym_macs == 521_127_936

    v = bm.census(vit_meta)
    assert len(v) == 74 and len(v.distinct()) == 50          # q/k/v of a self-attention share one Gram
    assert v.gram_flops(1000) / 1e12 == pytest.approx(53.22, rel=1e-3)
    assert v.gram_flops(1000, symmetric=True) / 1e12 == pytest.approx(26.62, rel=1e-3)
    assert v.fwd_flops(1000) / 1e12 == pytest.approx(33.70, rel=1e-3)
    assert v.summary()["sum_d"] == 66_048
    assert v[f"{VIT}0.self_attention.k"].gram_of == f"{VIT}0.self_attention.q"
    assert v[f"{VIT}0.self_attention.out_proj"].rows_per_sample == 197  # its hooks never fire
    assert (v[f"{VIT}5.mlp.3"].d, v["conv_proj"].rows_per_sample, v["heads.head"].rows_per_sample) == (3072, 196, 1)
    assert v.gram_flops(1000, distinct=False) > v.gram_flops(1000)
    assert next(r50.parameters()).device.type == "cpu"  # the caller's model stays where it was


@pytest.mark.parametrize("which", ["resnet50", "tiny_vit"])
def test_census_rows_equal_the_reference_representations(which, r50):
    model, size = (r50, 32) if which == "resnet50" else (tiny_vit(), 32)
    n = 2
    c = bm.census(model, image_size=size)
    reps = reference.representations(model, torch.randn(n, 3, size, size))
    assert [l.name for l in c] == list(reps)
    for layer in c:
        assert [tuple(R.shape) for R in reps[layer.name]] == [(n * layer.rows_per_sample, layer.d)] * layer.groups


def test_shift_macs_count_distinct_offsets():
    """3×3 stride-1: 13 C×C correlations per position instead of d(d+1)/2 products; strided and
    1×1 convs and linear layers keep the triangle."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2), nn.Conv2d(8, 8, 1),
                          nn.Conv2d(8, 8, (1, 3)), nn.Flatten(), nn.Linear(8, 4))

    def layer(name, d, rows):
        return bm.LayerCensus(name, "conv", d, 1, rows, 8)
    assert bm.shift_macs(model, layer("0", 72, 10)) == 13 * 64 * 10
    assert bm.shift_macs(model, layer("1", 72, 10)) == 10 * 72 * 73 // 2
    assert bm.shift_macs(model, layer("2", 8, 10)) == 10 * 8 * 9 // 2
    assert bm.shift_macs(model, layer("3", 24, 10)) == 3 * 64 * 10  # (1·5 + 1)/2 offsets
    assert bm.shift_macs(model, layer("5", 8, 1)) == 8 * 9 // 2     # a linear layer
