"""benchmarks/models.py (ResNet-50, ViT-B/16, census) and benchmarks/official.py (the official
SAP algorithm as a baseline), checked against ../shared/perf-anchors.md §2 and sap_fast.reference."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import models as bm  # noqa: E402
from official import official_correct, per_batch_cap  # noqa: E402
from sap_fast import reference  # noqa: E402
from sap_fast._runtime.layers import select_targets  # noqa: E402
from support import Attention, Tokens, assert_unchanged, max_weight_rel_err, snapshot  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

R50_PARAMS, VIT_PARAMS = 23_536_718, 85_809_422   # 14 classes (perf-anchors §1)
VIT = "encoder.layers.encoder_layer_"


@pytest.fixture(scope="module")
def r50():
    return bm.build("resnet50", prefer_torchvision=False)


@pytest.fixture(scope="module")
def vit_meta():
    return bm.build("vit_b_16", prefer_torchvision=False, device="meta")


def tiny_vit(classes=3):
    torch.manual_seed(0)
    vit = bm.VisionTransformer(32, 16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                               num_classes=classes)
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head
    return vit


# -- models ----------------------------------------------------------------------------------------
def test_parameter_counts_and_source(r50, vit_meta):
    assert sum(p.numel() for p in r50.parameters()) == R50_PARAMS
    assert sum(p.numel() for p in vit_meta.parameters()) == VIT_PARAMS
    assert r50.bench_source == vit_meta.bench_source == "benchmarks.models"
    try:
        import torchvision  # noqa: F401
        expected = "torchvision"
    except Exception:
        expected = "benchmarks.models"
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


def test_build_redraws_a_zero_head():
    torch.manual_seed(0)
    model = bm.build("vit_b_16", prefer_torchvision=False)
    assert model.heads.head.weight.abs().sum() > 0
    bare = bm.build("vit_b_16", prefer_torchvision=False, random_head=False)  # torchvision's init
    assert bare.heads.head.weight.abs().sum() == 0


def test_census_totals_match_perf_anchors(r50, vit_meta):
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


# -- official ----------------------------------------------------------------------------------------
def conv_linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


@pytest.mark.parametrize("case", ["conv_linear", "attention", "cross_attention_seq_first", "tokens", "tiny_vit"])
def test_official_without_subsampling_equals_the_reference(case):
    torch.manual_seed(1)
    model, x = {
        "conv_linear": lambda: (conv_linear(), torch.randn(40, 3, 8, 8)),
        "attention": lambda: (Attention(), torch.randn(12, 4, 5)),
        "cross_attention_seq_first": lambda: (Attention(batch_first=False, cross=True), torch.randn(12, 4, 5)),
        "tokens": lambda: (Tokens(), torch.randn(12, 5, 6)),
        "tiny_vit": lambda: (tiny_vit(), torch.randn(10, 3, 32, 32)),
    }[case]()
    model = model.float().train()
    snap = snapshot(model)
    res = official_correct(model, x, [10, 1e3], max_samples=10**9, max_batch_size=16)
    assert_unchanged(model, snap)           # weights and train/eval flags
    for alpha in (10, 1e3):
        assert max_weight_rel_err(res.models[alpha], reference.correct(model, x, alpha=alpha)) < 1e-4
        assert res.models[alpha] is not model
    times = res.stage_times
    assert set(times) == {"gather", "svd", "project", "total"} and set(times["project"]) == {10.0, 1e3}
    assert times["total"] == pytest.approx(times["gather"] + times["svd"] + sum(times["project"].values()))


def test_official_self_attention_shares_one_qkv_record():
    res = official_correct(tiny_vit(), torch.randn(3, 3, 32, 32), [1e3], max_samples=None)
    assert f"{VIT}0.self_attention.qkv" in res.rows and f"{VIT}0.self_attention.q" not in res.rows
    assert res.rows[f"{VIT}1.self_attention.out_proj"] == [15] and res.rows["heads.head"] == [3]


def test_official_subsampling():
    assert per_batch_cap(1000, 64, 50000) == 3201  # methods.md §1.3, CIFAR
    model, x = conv_linear(), torch.randn(40, 3, 8, 8)
    res = official_correct(model, x, [1e3], max_samples=300, max_batch_size=16, keep_rows=True)
    assert res.per_batch_cap == int(300 / (40 / 16)) + 1
    assert res.rows == {"0": [300], "2": [300], "6": [40]}  # 2560 and 640 rows cut, 40 kept
    full = reference.representations(model, x)
    for name in ("0", "2"):
        kept = res.R[name][0]
        assert kept.shape == (300, res.widths[name])
        assert torch.unique(kept, dim=0).shape[0] == 300                        # no row twice
        dist, index = torch.cdist(kept.double(), full[name][0]).min(1)
        assert dist.max() < 1e-5                                                 # genuine rows
        per_image = full[name][0].shape[0] // 40
        assert len(set((index // per_image).tolist())) >= 30  # drawn across each batch, not its head
    # same seed → same model; another seed → other rows; on_model sees each α once
    again = official_correct(model, x, [1e3], max_samples=300, max_batch_size=16)
    other = official_correct(model, x, [1e3], max_samples=300, max_batch_size=16, seed=1)
    assert max_weight_rel_err(again.models[1e3], res.models[1e3]) == 0
    assert max_weight_rel_err(other.models[1e3], res.models[1e3]) > 0
    seen = []
    res = official_correct(model, x, [1e4, 3e4], max_samples=300, on_model=lambda a, m: seen.append((a, m)))
    assert [a for a, _ in seen] == [1e4, 3e4] and res.models == {}
    assert max_weight_rel_err(seen[0][1], seen[1][1]) > 0
