"""Label noise and the embedded digits demo: fast checks (no full training)."""

import math

import pytest
import torch

from sap_fast.experiments.digits import (
    NUM_CLASSES,
    SmallCNN,
    accuracy,
    load_digits_splits,
    train,
)
from sap_fast.experiments.noise import symmetric_noise


def _labels(n=1000, k=10, seed=0):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- symmetric_noise


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.333, 0.9])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_exact_count_and_all_wrong(rate, n):
    y = _labels(n)
    noisy, mask = symmetric_noise(y, rate, 10, seed=3)
    assert noisy.dtype == torch.int64 and mask.dtype == torch.bool
    assert noisy.shape == y.shape == mask.shape
    assert int(mask.sum()) == math.floor(rate * n)
    assert torch.equal(noisy != y, mask)  # every picked label changed, nothing else did
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10


def test_new_labels_cover_the_other_classes():
    y = torch.zeros(5000, dtype=torch.long)  # all class 0: new labels must be 1..9, ~uniform
    noisy, mask = symmetric_noise(y, 0.5, 10, seed=0)
    counts = torch.bincount(noisy[mask], minlength=10)
    assert counts[0] == 0
    expected = 2500 / 9
    assert bool((counts[1:] > 0.75 * expected).all()) and bool((counts[1:] < 1.25 * expected).all())


def test_reproducible_and_seed_dependent():
    y = _labels()
    a = symmetric_noise(y, 0.25, 10, seed=7)
    b = symmetric_noise(y, 0.25, 10, seed=7)
    c = symmetric_noise(y, 0.25, 10, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_does_not_touch_input_or_global_rng():
    y = _labels()
    y_copy = y.clone()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    noisy, _ = symmetric_noise(y, 0.25, 10, seed=1)
    after = torch.rand(3)
    assert torch.equal(y, y_copy)
    assert noisy.data_ptr() != y.data_ptr()
    assert torch.equal(before, after)


def test_accepts_other_integer_dtypes():
    y = _labels().to(torch.int32)
    noisy, mask = symmetric_noise(y, 0.25, 10, seed=0)
    assert int(mask.sum()) == 250 and torch.equal(noisy != y.long(), mask)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.25"])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        symmetric_noise(_labels(), rate, 10, seed=0)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.zeros(4, 2, dtype=torch.long), "1-D"),
        (torch.zeros(4), "integer"),
        (torch.tensor([0, 1, 10]), r"\[0, 10\)"),
        (torch.tensor([-1, 1, 2]), r"\[0, 10\)"),
        ([0, 1, 2], "torch.Tensor"),
    ],
)
def test_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        symmetric_noise(labels, 0.25, 10, seed=0)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        symmetric_noise(_labels(), 0.25, 1, seed=0)


# ---------------------------------------------------------------- digits splits


@pytest.fixture(scope="module")
def splits():
    return load_digits_splits(0)


def test_splits_disjoint_and_cover(splits):
    tr, va, te = (set(splits[f"idx_{k}"].tolist()) for k in ("train", "val", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == set(range(1797))
    assert len(te) == round(0.2 * 1797)
    assert len(va) == round(0.1 * (1797 - len(te)))


def test_splits_shapes_ranges_and_stratified(splits):
    for k in ("train", "val", "test"):
        x, y = splits[f"x_{k}"], splits[f"y_{k}"]
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0]
        assert y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert set(y.tolist()) == set(range(NUM_CLASSES))
    share = torch.bincount(splits["y_test"], minlength=10).float() / splits["y_test"].numel()
    full = torch.bincount(torch.cat([splits[f"y_{k}"] for k in ("train", "val", "test")])).float() / 1797
    assert float((share - full).abs().max()) < 0.01


def test_splits_deterministic(splits):
    again = load_digits_splits(0)
    other = load_digits_splits(1)
    for k in ("idx_train", "idx_val", "idx_test", "x_train", "y_val"):
        assert torch.equal(splits[k], again[k])
    assert not torch.equal(splits["idx_test"], other["idx_test"])


def test_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_splits(0, test_fraction=1.0)


# ---------------------------------------------------------------- model


def test_small_cnn_shape_and_seeded_init():
    x = torch.rand(5, 1, 8, 8)
    a, b = SmallCNN(seed=4), SmallCNN(seed=4)
    assert a(x).shape == (5, NUM_CLASSES)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(SmallCNN(seed=5).conv1.weight, a.conv1.weight)


def test_train_few_steps_deterministic(splits):
    x, y = splits["x_train"][:128], splits["y_train"][:128]
    m1 = train(SmallCNN(seed=0), x, y, epochs=2, lr=3e-3, seed=0)
    m2 = train(SmallCNN(seed=0), x, y, epochs=2, lr=3e-3, seed=0)
    assert not m1.training
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    acc = accuracy(m1, x, y)
    assert 0.0 <= acc <= 1.0


def test_train_num_threads_restored(splits):
    x, y = splits["x_train"][:64], splits["y_train"][:64]
    before = torch.get_num_threads()
    train(SmallCNN(seed=0), x, y, epochs=1, lr=3e-3, seed=0, num_threads=1)
    assert torch.get_num_threads() == before
