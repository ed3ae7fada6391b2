"""Properties of the pipeline: chunking, shards, save/load, bounded memory, selection, sweep."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sap_fast
from sap_fast.stats import LayerStats
from support import Attention, assert_unchanged, conv_case, max_weight_rel_err, rel_err, snapshot


def _grams(stats):
    return {n: s.gram for n, s in stats.items()}


@pytest.mark.parametrize("case", ["2d-depthwise", "3d-stride-groups", "1d-same-even-dil"])
def test_chunk_and_batch_size_do_not_change_result(case):
    model, x = conv_case(case, batch=6, seed=21)
    base = _grams(sap_fast.collect_stats(model, x, batch_size=6))
    for batch_size, chunk_rows in [(1, 1), (4, 7), (6, 3), (2, None)]:
        other = _grams(sap_fast.collect_stats(model, x, batch_size=batch_size, chunk_rows=chunk_rows))
        for name in base:
            assert rel_err(other[name], base[name]) <= 1e-13, (name, batch_size, chunk_rows)


def test_chunks_are_bounded_even_for_one_oversized_sample(monkeypatch):
    """Portable path: peak memory is one chunk: no chunk exceeds chunk_rows, whatever the sample
    count or size. (The native kernels never build rows; see tests/backends/test_native_cpu.py.)"""
    monkeypatch.setenv("SAP_FAST_BACKEND", "portable")
    sizes = []
    original = LayerStats.add

    def spy(self, chunk):
        sizes.append(chunk.shape[1])
        original(self, chunk)

    monkeypatch.setattr(LayerStats, "add", spy)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)).double()
    one_big = torch.randn(1, 2, 40, 30, dtype=torch.float64)   # 1200 rows in one sample
    stats = sap_fast.collect_stats(conv, one_big, chunk_rows=100)
    assert max(sizes) <= 100 and sum(sizes) == 1200 and stats["0"].count == 1200
    whole = torch.nn.functional.unfold(one_big, 3, padding=1)[0].T
    assert rel_err(stats["0"].gram[0], whole.T @ whole) <= 1e-13
    # and the statistics' size does not grow with the number of samples
    many = sap_fast.collect_stats(conv, torch.randn(50, 2, 8, 8, dtype=torch.float64), chunk_rows=100)
    assert many["0"].gram.shape == stats["0"].gram.shape == (1, 18, 18)


@pytest.mark.parametrize("split", [3, 12])  # shard a stays in rows mode / both shards hold Grams
def test_shards_merge_to_the_whole(split, tmp_path):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).double()
    x = torch.randn(30, 3, 8, 8, dtype=torch.float64)
    whole = sap_fast.collect_stats(model, x, batch_size=5)
    a = sap_fast.collect_stats(model, x[:split], batch_size=5)
    b = sap_fast.collect_stats(model, x[split:], batch_size=5)
    merged = a + b
    assert merged.num_samples == 30 and a.merge(b).num_samples == 30
    assert a["3"].mode == "rows" and whole["3"].mode == "rows"  # 144 wide, 30 rows
    for name in whole:
        assert merged[name].count == whole[name].count
        assert merged[name].mode == whole[name].mode
        assert rel_err(merged[name].gram, whole[name].gram) <= 1e-13
    path = tmp_path / "stats.pt"
    merged.save(path)
    loaded = sap_fast.Stats.load(path)
    assert list(loaded) == list(merged) and loaded.num_samples == 30
    for name in merged:
        assert torch.equal(loaded[name].gram, merged[name].gram)
    fast = sap_fast.correct(model, stats=loaded, alpha=1e3)
    assert max_weight_rel_err(fast, sap_fast.correct(model, x, alpha=1e3)) <= 1e-10
    assert [p.name for p in tmp_path.iterdir()] == ["stats.pt"]  # no temporary left behind


def test_merge_rejects_mismatched_stats():
    torch.manual_seed(9)
    a = sap_fast.collect_stats(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4))
    b = sap_fast.collect_stats(nn.Sequential(nn.Linear(5, 2)), torch.randn(3, 5))
    with pytest.raises(ValueError, match="width"):
        a + b


def test_save_is_atomic_old_file_survives_failure(tmp_path, monkeypatch):
    stats = sap_fast.collect_stats(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4))
    path = tmp_path / "stats.pt"
    path.write_bytes(b"old contents")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        stats.save(path)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.pt"]


def test_data_forms_agree():
    """A tensor, an (x, y) pair, a Dataset, a DataLoader and a list of batches give the same stats."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 3)).double()
    x = torch.randn(17, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (17,))
    ds = TensorDataset(x, y)
    forms = [x, (x, y), ds, DataLoader(ds, batch_size=4), [(x[:9], y[:9]), (x[9:], y[9:])]]
    grams = [sap_fast.collect_stats(model, f)["0"].gram for f in forms]
    for g in grams[1:]:
        assert rel_err(g, grams[0]) <= 1e-14
    for f in forms:
        sub = sap_fast.subset(f, [0, 5, 16])
        assert rel_err(sap_fast.collect_stats(model, sub)["0"].gram, sap_fast.collect_stats(model, x[[0, 5, 16]])["0"].gram) <= 1e-14


def _planted_noise(seed, n=400, classes=4, noise=0.2):
    """Separable clusters, a classifier that fits the clean labels, 20% labels flipped."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, 10, generator=g) * 4
    clean = torch.randint(0, classes, (n,), generator=g)
    x = centers[clean] + torch.randn(n, 10, generator=g)
    model = nn.Sequential(nn.Linear(10, classes))
    with torch.no_grad():  # nearest-center classifier: logits = 2 c·x − |c|²
        model[0].weight.copy_(2 * centers)
        model[0].bias.copy_(-(centers ** 2).sum(1))
    flipped = torch.rand(n, generator=g) < noise
    noisy = torch.where(flipped, (clean + torch.randint(1, classes, (n,), generator=g)) % classes, clean)
    return model, x, noisy, flipped


@pytest.mark.parametrize("class_balanced", [True, False])
def test_select_trusted_avoids_planted_wrong_labels(class_balanced):
    model, x, noisy, flipped = _planted_noise(12)
    snap = snapshot(model)
    idx = sap_fast.select_trusted(model, (x, noisy), n=200, class_balanced=class_balanced)
    assert idx.dtype == torch.long and idx.numel() == 200 and idx.unique().numel() == 200
    assert flipped[idx].float().mean() <= 0.02  # 20% of the data is wrong, ≤ 2% of the picks
    if class_balanced:
        assert torch.bincount(noisy[idx], minlength=4).min() >= 50
    assert_unchanged(model, snap)


@pytest.mark.parametrize("class_balanced", [True, False])
def test_select_suspects_finds_planted_wrong_labels(class_balanced):
    model, x, noisy, flipped = _planted_noise(12)
    snap = snapshot(model)
    idx = sap_fast.select_suspects(model, (x, noisy), n=60, class_balanced=class_balanced)
    assert idx.dtype == torch.long and idx.numel() == 60 and idx.unique().numel() == 60
    assert flipped[idx].float().mean() >= 0.95  # 82 of the 400 labels are wrong: nearly every pick
    if class_balanced:
        assert torch.bincount(noisy[idx], minlength=4).min() >= 15
    # the highest scores of the same pass select_trusted ranks, never a trusted sample
    scores, labels, classes = sap_fast.sample_scores(model, (x, noisy))
    assert torch.equal(idx, sap_fast.lowest_per_class(-scores, labels, classes, 60, class_balanced))
    trusted = sap_fast.select_trusted(model, (x, noisy), n=200, class_balanced=class_balanced)
    assert not set(idx.tolist()) & set(trusted.tolist())
    assert_unchanged(model, snap)
    for bad, match in [(dict(n=0), "n must be a positive int"), (dict(n=10, score="entropy"), "score must be")]:
        with pytest.raises(ValueError, match=match):
            sap_fast.select_suspects(model, (x, noisy), **bad)
    with pytest.raises(ValueError, match="score must be"):
        sap_fast.sample_scores(model, (x, noisy), score="entropy")
    for args, match in [((scores, labels, classes, 0), "n must be a positive int"),
                        ((scores, labels[:5], classes, 3), "one length"),
                        ((scores, labels, 0, 3), "classes must be a positive int"),
                        ((scores, labels, classes, 401), "n=401 but data has only 400")]:
        with pytest.raises(ValueError, match=match):
            sap_fast.lowest_per_class(*args)


def test_select_trusted_curvature_prefers_confident_samples():
    """Input curvature is low far from the decision boundary: those samples are picked first."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [-3.0, 0.0]]))
        model[0].bias.zero_()
    far = torch.randn(40, 2) * 0.1 + torch.tensor([3.0, 0.0])
    near = torch.randn(40, 2) * 0.1
    x = torch.cat([far, near])
    y = torch.zeros(80, dtype=torch.long)
    idx = sap_fast.select_trusted(model, (x, y), n=30, score="curvature", class_balanced=False)
    assert (idx < 40).all()
    again = sap_fast.select_trusted(model, (x, y), n=30, score="curvature", class_balanced=False)
    assert torch.equal(idx, again)


def test_select_trusted_indices_follow_loader_order():
    model, x, noisy, flipped = _planted_noise(14, n=100)
    loader = DataLoader(TensorDataset(x, noisy), batch_size=7)
    assert torch.equal(sap_fast.select_trusted(model, loader, n=40),
                       sap_fast.select_trusted(model, (x, noisy), n=40))
    with pytest.raises(ValueError, match="shuffle"):
        sap_fast.select_trusted(model, DataLoader(TensorDataset(x, noisy), shuffle=True), n=10)


def test_correct_never_touches_the_caller_unless_inplace():
    torch.manual_seed(15)
    model = Attention(cross=True).double()
    model.train()
    model.inp.eval()  # a mixed-mode model: every module's flag must come back as it was
    x = torch.randn(5, 4, 5, dtype=torch.float64)
    snap = snapshot(model)
    fixed = sap_fast.correct(model, x, alpha=1e3)
    assert fixed is not model
    assert_unchanged(model, snap)
    assert not torch.equal(fixed.head.weight, model.head.weight)
    assert torch.equal(fixed.head.bias, model.head.bias)
    same = sap_fast.correct(model, x, alpha=1e3, inplace=True)
    assert same is model
    assert max_weight_rel_err(model, fixed) <= 1e-14


def test_layers_selection_forms():
    torch.manual_seed(16)
    model = Attention(cross=True).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    by_name = sap_fast.collect_stats(model, x, layers=["attn", "head"])
    assert list(by_name) == ["attn.q", "attn.k", "attn.v", "attn.out_proj", "head"]
    by_type = sap_fast.collect_stats(model, x, layers=nn.MultiheadAttention)
    assert len(by_type) == 8
    by_pred = sap_fast.collect_stats(model, x, layers=lambda name, m: name.startswith("x"))
    assert set(by_pred) == {"xattn.q", "xattn.k", "xattn.v", "xattn.out_proj"}
    one = sap_fast.correct(model, x, alpha=1e3, layers=["head"])
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(one.named_parameters())[name]) == (name != "head.weight")


def test_self_attention_qkv_share_one_decomposition():
    from sap_fast.spectrum import spectra
    torch.manual_seed(17)
    model = Attention().double()
    stats = sap_fast.collect_stats(model, torch.randn(3, 4, 5, dtype=torch.float64))
    spec = spectra(stats)
    assert spec["attn.q"] is spec["attn.k"] is spec["attn.v"]
    assert spec["attn.out_proj"] is not spec["attn.q"]


def _noisy_task(seed):
    model, x, noisy, flipped = _planted_noise(seed, n=300)
    return model, x, noisy


def test_sweep_picks_the_best_candidate_and_returns_its_model():
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    _, x, noisy = _noisy_task(18)
    trusted = x[:40]
    val = (x[200:], noisy[200:])
    snap = snapshot(model)
    result = sap_fast.sweep(model, trusted, val)
    assert_unchanged(model, snap)
    assert [r.alpha for r in result.table] == [None, *sap_fast.DEFAULT_ALPHAS]
    assert sap_fast.DEFAULT_ALPHAS[0] == 10.0 and sap_fast.DEFAULT_ALPHAS[-1] == pytest.approx(1e6)
    assert len(sap_fast.DEFAULT_ALPHAS) == 11
    keys = [(r.val_accuracy, -r.val_loss) for r in result.table]
    assert (result.best.val_accuracy, -result.best.val_loss) == max(keys)
    if result.best_alpha is None:
        expected = model
    else:
        expected = sap_fast.correct(model, trusted, alpha=result.best_alpha)
    assert max_weight_rel_err(result.model, expected) <= 1e-6
    ev = sap_fast.evaluate(result.model, val)
    assert ev.accuracy == pytest.approx(result.best.val_accuracy)
    assert "no projection" in result.to_markdown()


def test_sweep_auto_refines_and_never_does_worse():
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    _, x, noisy = _noisy_task(19)
    stats = sap_fast.collect_stats(model, x[:30])
    grid = sap_fast.sweep(model, None, (x[200:], noisy[200:]), stats=stats, alphas=[1e1, 1e2, 1e3])
    auto = sap_fast.sweep(model, None, (x[200:], noisy[200:]), stats=stats, alphas="auto", refine_steps=6)
    refined = [r for r in auto.table if r.refined]
    grid_best = max((r.val_accuracy, -r.val_loss) for r in auto.table if not r.refined)
    assert (auto.best.val_accuracy, -auto.best.val_loss) >= grid_best
    if auto.best_alpha is not None:
        assert len(refined) == 6
    assert len(grid.table) == 4
    import numpy as np  # array-valued grids work like lists
    as_array = sap_fast.sweep(model, None, (x[200:], noisy[200:]), stats=stats, alphas=np.array([1e1, 1e2, 1e3]))
    assert [r.val_accuracy for r in as_array.table] == [r.val_accuracy for r in grid.table]


@pytest.mark.slow  # a few seconds: left out of the fast target
def test_wide_layer_update_builds_no_d_by_d_matrix():
    """A 12000-wide layer with 10 rows: a d×d float64 temporary would be 1.15 GB; peak stays far below."""
    code = textwrap.dedent("""
        import resource, torch, sap_fast
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12000, 3)).double()
        x = torch.randn(10, 12000, dtype=torch.float64)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fixed = sap_fast.correct(model, x, alpha=1e4)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown_mb = float(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 300, f"peak memory grew by {grown_mb:.0f} MB"


def test_input_rounding_emulates_tf32_and_bf16():
    from sap_fast.backends.precision import round_inputs as _round_inputs
    g = torch.Generator().manual_seed(20)
    x = torch.randn(4096, generator=g) * torch.logspace(-3, 3, 4096)
    tf32 = _round_inputs(x, "tf32")
    bits = tf32.view(torch.int32)
    assert int((bits & 0x1FFF).abs().max()) == 0                       # 10 mantissa bits left
    assert float(((tf32 - x).abs() / x.abs()).max()) <= 2.0 ** -11      # round to nearest
    one = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -10])  # ties go to even
    assert _round_inputs(one, "tf32").tolist() == [1.0, 1 + 2 ** -9, 1 + 2 ** -10]
    bf16 = _round_inputs(x, "bf16")
    assert torch.equal(bf16, x.to(torch.bfloat16).float())
    assert torch.equal(_round_inputs(x, "fp32"), x)
    # and collect_stats applies it: the Gram is exactly that of the rounded inputs
    model = nn.Sequential(nn.Linear(8, 2))
    inputs = torch.randn(50, 8, generator=g)
    got = sap_fast.collect_stats(model, inputs, input_precision="tf32")["0"].gram[0]
    r = _round_inputs(inputs, "tf32").double()
    assert rel_err(got, r.T @ r) <= 1e-15
    with pytest.raises(ValueError, match="input_precision must be one of"):
        sap_fast.collect_stats(model, inputs, input_precision="fp8")


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a sap_fast stats file"):
        sap_fast.Stats.load(path)


def test_self_attention_rows_are_accumulated_once(monkeypatch):
    calls = []
    original = LayerStats.add
    monkeypatch.setattr(LayerStats, "add", lambda self, chunk: (calls.append(id(self)), original(self, chunk)))
    torch.manual_seed(22)
    model = Attention().double()  # inp, attn (self), head
    stats = sap_fast.collect_stats(model, torch.randn(3, 4, 5, dtype=torch.float64))
    assert stats["attn.q"] is stats["attn.k"] is stats["attn.v"]
    assert calls.count(id(stats["attn.q"])) == 1  # one batch, one chunk, added once for q/k/v
    assert stats["attn.q"].count == 3 * 4


class SelfThenCross(nn.Module):
    """One MultiheadAttention used for self-attention, then cross-attention (k = v = memory)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mem = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = x + self.attn(x, x, x)[0]
        m = self.mem(x)
        h = h + self.attn(h, m, m)[0]
        return self.head(h.mean(1))


def test_shared_records_split_when_inputs_differ(tmp_path):
    from sap_fast import reference
    torch.manual_seed(23)
    model = SelfThenCross().double()
    x = torch.randn(5, 4, 8, dtype=torch.float64)
    stats = sap_fast.collect_stats(model, x, batch_size=2)
    assert stats["attn.q"] is not stats["attn.k"] and stats["attn.k"] is stats["attn.v"]
    reps = reference.representations(model, x)
    for name in ("attn.q", "attn.k", "attn.v", "attn.out_proj"):
        r = reps[name][0]
        assert stats[name].count == r.shape[0] == 2 * 5 * 4
        assert rel_err(stats[name].gram[0], r.T @ r) <= 1e-13
    fast = sap_fast.correct(model, stats=stats, alpha=1e3)
    assert max_weight_rel_err(fast, reference.correct(model, x, alpha=1e3)) <= 1e-8
    # shared records merge and round-trip like any other
    halves = sap_fast.collect_stats(model, x[:2]) + sap_fast.collect_stats(model, x[2:])
    halves.save(tmp_path / "s.pt")
    loaded = sap_fast.Stats.load(tmp_path / "s.pt")
    for name in stats:
        assert rel_err(loaded[name].gram, stats[name].gram) <= 1e-13
