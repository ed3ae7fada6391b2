"""benchmarks/official.py: the official SAP algorithm (docs/methods.md#official-sap) as a
baseline. Without subsampling it equals sap_fast.reference; with it, it keeps the official row caps
and draws genuine rows across each batch."""
import pytest
import torch
from torch import nn

from sap_fast import reference
from support import Attention, Tokens, assert_unchanged, benchmark_module, max_weight_rel_err, snapshot, tiny_vit

official_correct = benchmark_module("official").official_correct
per_batch_cap = benchmark_module("official").per_batch_cap

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = "encoder.layers.encoder_layer_"


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
    assert per_batch_cap(1000, 64, 50000) == 3201  # CIFAR: N = 1000, B = 64, 50 000 rows
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


def test_time_limit_stops_early_with_lower_bounds_and_progress():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(12, 3, 8, 8)
    full = official_correct(model, x, [10.0], max_batch_size=4)
    assert not full.capped and full.models
    assert full.progress == {"gather_batches": 3, "gather_batches_total": 3, "svd_records": 2, "svd_records_total": 2}
    capped = official_correct(model, x, [10.0], max_batch_size=4, time_limit=0.0)
    assert capped.capped and not capped.models and capped.stage_times["project"] == {}
    assert capped.progress["gather_batches"] == 0 and capped.progress["gather_batches_total"] == 3
    assert capped.stage_times["total"] == capped.stage_times["gather"] + capped.stage_times["svd"]
