"""Asymmetric / hierarchical label noise, the noise dispatch, and the label-noise metrics."""

import json
import math
import re

import pytest
import torch
from torch import nn

from sap_fast.experiments.metrics import noise_metrics, trusted_set_quality
from sap_fast.experiments.noise import (
    CIFAR10_ASYMMETRIC_MAP,
    CIFAR10_CLASS_NAMES,
    CIFAR100_COARSE_NAMES,
    CIFAR100_FINE_NAMES,
    CIFAR100_FINE_TO_COARSE,
    NOISE_KINDS,
    asymmetric_noise,
    cifar100_superclasses,
    hierarchical_noise,
    label_noise,
    symmetric_noise,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _labels_with_counts(counts, seed=0):
    """Labels with exactly ``counts[c]`` samples of class ``c``, in a shuffled order."""
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    return y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))]


def _one_line_error(fn, pattern):
    """``fn()`` raises a one-line ValueError whose message matches ``pattern``."""
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert re.search(pattern, msg), msg
    return msg


# Class sizes with a 1-sample class (3) and an empty one (6); 9 (truck) is large.
CIFAR10_COUNTS = [12, 9, 17, 1, 23, 20, 0, 5, 8, 31]
RATES = [0.0, 0.04, 0.1, 0.25, 0.4, 0.9]


# ---------------------------------------------------------------- asymmetric


@pytest.mark.parametrize("rate", RATES)
def test_asymmetric_exact_count_per_source_class(rate):
    y = _labels_with_counts(CIFAR10_COUNTS)
    noisy, mask = asymmetric_noise(y, rate, 10, seed=1)
    assert noisy.dtype == torch.int64 and mask.dtype == torch.bool
    assert noisy.shape == y.shape == mask.shape
    assert torch.equal(noisy != y, mask)
    for c in range(10):
        flipped = int(mask[y == c].sum())
        if c in CIFAR10_ASYMMETRIC_MAP:
            assert flipped == math.floor(rate * CIFAR10_COUNTS[c]), (c, rate)
            assert bool((noisy[mask & (y == c)] == CIFAR10_ASYMMETRIC_MAP[c]).all())
        else:
            assert flipped == 0  # untouched classes stay untouched
    assert int(mask.sum()) == sum(math.floor(rate * CIFAR10_COUNTS[c]) for c in CIFAR10_ASYMMETRIC_MAP)


def test_asymmetric_rate_zero_and_floors_to_zero():
    y = _labels_with_counts(CIFAR10_COUNTS)
    for rate in (0.0, 0.03):  # 0.03 * 31 < 1: every source class floors to 0
        noisy, mask = asymmetric_noise(y, rate, 10, seed=0)
        assert not bool(mask.any()) and torch.equal(noisy, y)
    # the 1-sample class (cat) is never flipped below rate 1; deer (23) is
    noisy, mask = asymmetric_noise(y, 0.9, 10, seed=0)
    assert int(mask[y == 3].sum()) == 0 and int(mask[y == 4].sum()) == 20


def test_asymmetric_cifar10_map_is_the_standard_one():
    n = dict(zip(CIFAR10_CLASS_NAMES, range(10)))
    assert CIFAR10_ASYMMETRIC_MAP == {
        n["truck"]: n["automobile"], n["bird"]: n["airplane"], n["deer"]: n["horse"],
        n["cat"]: n["dog"], n["dog"]: n["cat"],
    }
    assert CIFAR10_ASYMMETRIC_MAP == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def test_asymmetric_flips_decided_from_clean_labels():
    y = _labels_with_counts([0, 0, 0, 40, 0, 30, 0, 0, 0, 0])  # cats and dogs only
    noisy, mask = asymmetric_noise(y, 0.5, 10, seed=3)
    assert int(mask[y == 3].sum()) == 20 and int(mask[y == 5].sum()) == 15
    assert bool((noisy[mask & (y == 3)] == 5).all()) and bool((noisy[mask & (y == 5)] == 3).all())
    # noisy "cat" = unflipped cats + flipped dogs; nothing flips twice
    assert int((noisy == 3).sum()) == 20 + 15 and int((noisy == 5).sum()) == 15 + 20


def test_asymmetric_user_mapping():
    y = _labels_with_counts([10, 10, 10, 10])
    noisy, mask = asymmetric_noise(y, 0.3, 4, seed=0, mapping={0: 2, 3: 2})
    assert int(mask[y == 0].sum()) == 3 and int(mask[y == 3].sum()) == 3
    assert bool((noisy[mask] == 2).all())
    assert not bool(mask[(y == 1) | (y == 2)].any())
    # numpy-style / tensor integers are accepted as class indices
    a = asymmetric_noise(y, 0.3, 4, seed=0, mapping={torch.tensor(0): 2, 3: torch.tensor(2)})
    assert torch.equal(a[0], noisy)


def test_asymmetric_independent_of_mapping_order():
    y = _labels_with_counts([10, 10, 10, 10])
    a = asymmetric_noise(y, 0.5, 4, seed=4, mapping={0: 1, 2: 3})
    b = asymmetric_noise(y, 0.5, 4, seed=4, mapping={2: 3, 0: 1})
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- hierarchical

GROUPS = [[0, 1, 2], [3, 4], [5], [7, 8, 9, 6]]  # 5: singleton; 10, 11: unlisted
GROUP_OF = {c: i for i, g in enumerate(GROUPS) for c in g}
H_COUNTS = [5, 1, 9, 4, 0, 30, 7, 3, 6, 11, 13, 2]
ELIGIBLE = sum(H_COUNTS[c] for g in GROUPS if len(g) >= 2 for c in g)


@pytest.mark.parametrize("rate", RATES)
def test_hierarchical_exact_count_and_within_group(rate):
    y = _labels_with_counts(H_COUNTS)
    noisy, mask = hierarchical_noise(y, rate, 12, seed=2, groups=GROUPS)
    assert noisy.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(noisy != y, mask)
    assert int(mask.sum()) == math.floor(rate * ELIGIBLE)
    for old, new in zip(y[mask].tolist(), noisy[mask].tolist()):
        assert old != new and GROUP_OF[old] == GROUP_OF[new]
    # singleton and unlisted classes are never flipped, and nothing is flipped into them
    for c in (5, 10, 11):
        assert not bool(mask[y == c].any()) and not bool((noisy[mask] == c).any())


def test_hierarchical_rate_zero_floor_zero_and_single_sample():
    y = _labels_with_counts(H_COUNTS)
    for rate in (0.0, 0.9 / ELIGIBLE):
        noisy, mask = hierarchical_noise(y, rate, 12, seed=0, groups=GROUPS)
        assert not bool(mask.any()) and torch.equal(noisy, y)
    one = torch.tensor([4])  # a single eligible sample
    assert not bool(hierarchical_noise(one, 0.9, 12, seed=0, groups=GROUPS)[1].any())
    noisy, mask = hierarchical_noise(torch.tensor([4, 3]), 0.5, 12, seed=0, groups=GROUPS)
    assert int(mask.sum()) == 1 and sorted(noisy.tolist()) in ([3, 3], [4, 4])


def test_hierarchical_targets_uniform_over_the_other_group_members():
    y = torch.full((4000,), 7, dtype=torch.long)  # group {6, 7, 8, 9}
    noisy, mask = hierarchical_noise(y, 0.75, 12, seed=0, groups=GROUPS)
    counts = torch.bincount(noisy[mask], minlength=12)
    assert int(counts.sum()) == 3000 and int(counts[7]) == 0
    assert set(torch.nonzero(counts).flatten().tolist()) == {6, 8, 9}
    assert bool((counts[[6, 8, 9]] > 900).all()) and bool((counts[[6, 8, 9]] < 1100).all())


def test_hierarchical_independent_of_group_order():
    y = _labels_with_counts(H_COUNTS)
    a = hierarchical_noise(y, 0.4, 12, seed=5, groups=GROUPS)
    shuffled = [[9, 6, 8, 7], [4, 3], [2, 0, 1], [5]]
    b = hierarchical_noise(y, 0.4, 12, seed=5, groups=shuffled)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hierarchical_cifar100_default():
    y = torch.arange(100).repeat(10)
    noisy, mask = hierarchical_noise(y, 0.2, 100, seed=0)
    assert int(mask.sum()) == 200
    for old, new in zip(y[mask].tolist(), noisy[mask].tolist()):
        assert old != new and CIFAR100_FINE_TO_COARSE[old] == CIFAR100_FINE_TO_COARSE[new]
    # against the name table, independently of the index table
    superclass_of = {f: s for s, fines in CIFAR100_SUPERCLASSES_BY_NAME.items() for f in fines}
    for old, new in zip(y[mask].tolist(), noisy[mask].tolist()):
        assert superclass_of[CIFAR100_FINE_NAMES[old]] == superclass_of[CIFAR100_FINE_NAMES[new]]


# ---------------------------------------------------------------- CIFAR-100 table

# The superclass table of the CIFAR-100 page (cs.toronto.edu/~kriz/cifar.html), by name, with
# the pickle's spellings (keyboard, maple_tree, ...) and coarse names.
CIFAR100_SUPERCLASSES_BY_NAME = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def _members(superclass):
    s = CIFAR100_COARSE_NAMES.index(superclass)
    return sorted(CIFAR100_FINE_NAMES[f] for f, c in enumerate(CIFAR100_FINE_TO_COARSE) if c == s)


def test_cifar100_names_in_pickle_order():
    assert len(CIFAR100_FINE_NAMES) == 100 and len(set(CIFAR100_FINE_NAMES)) == 100
    assert list(CIFAR100_FINE_NAMES) == sorted(CIFAR100_FINE_NAMES)  # alphabetical, as the pickle
    assert CIFAR100_FINE_NAMES[:3] == ("apple", "aquarium_fish", "baby")
    assert CIFAR100_FINE_NAMES[-1] == "worm"
    assert len(CIFAR100_COARSE_NAMES) == 20 and list(CIFAR100_COARSE_NAMES) == sorted(CIFAR100_COARSE_NAMES)
    assert CIFAR100_FINE_TO_COARSE[:20] == (4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11)


def test_cifar100_every_superclass_has_five_classes():
    assert len(CIFAR100_FINE_TO_COARSE) == 100
    assert set(CIFAR100_FINE_TO_COARSE) == set(range(20))
    assert all(CIFAR100_FINE_TO_COARSE.count(s) == 5 for s in range(20))
    groups = cifar100_superclasses()
    assert len(groups) == 20 and all(len(g) == 5 for g in groups)
    assert sorted(f for g in groups for f in g) == list(range(100))


def test_cifar100_known_memberships():
    assert _members("fish") == ["aquarium_fish", "flatfish", "ray", "shark", "trout"]
    assert _members("people") == ["baby", "boy", "girl", "man", "woman"]
    assert _members("vehicles_1") == ["bicycle", "bus", "motorcycle", "pickup_truck", "train"]


def test_cifar100_table_matches_the_named_superclasses():
    assert set(CIFAR100_SUPERCLASSES_BY_NAME) == set(CIFAR100_COARSE_NAMES)
    for superclass, fines in CIFAR100_SUPERCLASSES_BY_NAME.items():
        assert _members(superclass) == sorted(fines), superclass


# ---------------------------------------------------------------- shared properties

PROTOCOLS = {
    "symmetric": (lambda y, seed: symmetric_noise(y, 0.3, 10, seed=seed), 10),
    "asymmetric": (lambda y, seed: asymmetric_noise(y, 0.3, 10, seed=seed), 10),
    "hierarchical": (lambda y, seed: hierarchical_noise(y, 0.3, 100, seed=seed), 100),
}


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_deterministic_by_seed_and_seed_dependent(name):
    fn, k = PROTOCOLS[name]
    y = torch.arange(k).repeat(400 // k * 2)
    a, b, c = fn(y, 7), fn(y, 7), fn(y, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_input_and_global_rng_untouched(name):
    fn, k = PROTOCOLS[name]
    y = torch.arange(k).repeat(400 // k)
    y_copy = y.clone()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    noisy, mask = fn(y, 1)
    after = torch.rand(3)
    assert torch.equal(y, y_copy) and torch.equal(before, after)
    assert noisy.data_ptr() != y.data_ptr() and bool(mask.any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_device_preserved_and_int32_accepted(name, device):
    fn, k = PROTOCOLS[name]
    y = torch.arange(k).repeat(400 // k)
    ref = fn(y, 3)
    y_dev = y.to(device=device, dtype=torch.int32)
    noisy, mask = fn(y_dev, 3)
    assert noisy.device == mask.device == y_dev.device
    assert noisy.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(noisy.cpu(), ref[0]) and torch.equal(mask.cpu(), ref[1])


def test_empty_labels():
    for kind, k in (("symmetric", 10), ("asymmetric", 10), ("hierarchical", 100)):
        noisy, mask = label_noise(torch.zeros(0, dtype=torch.long), kind, 0.5, k, seed=0)
        assert noisy.numel() == 0 and mask.numel() == 0


# ---------------------------------------------------------------- validation

Y10 = torch.arange(10).repeat(3)


@pytest.mark.parametrize("fn", [
    lambda **kw: asymmetric_noise(**{"labels": Y10, "rate": 0.2, "num_classes": 10, "seed": 0, **kw}),
    lambda **kw: hierarchical_noise(**{"labels": Y10, "rate": 0.2, "num_classes": 10, "seed": 0,
                                       "groups": [[0, 1]], **kw}),
    lambda **kw: symmetric_noise(**{"labels": Y10, "rate": 0.2, "num_classes": 10, "seed": 0, **kw}),
], ids=["asymmetric", "hierarchical", "symmetric"])
@pytest.mark.parametrize("kw, pattern", [
    ({"rate": -0.1}, r"rate must be in \[0, 1\).*e\.g\. 0\.25"),
    ({"rate": 1.0}, r"rate must be in \[0, 1\)"),
    ({"rate": float("nan")}, r"rate must be a finite number"),
    ({"rate": "0.2"}, r"rate must be a finite number"),
    ({"num_classes": 1}, r"num_classes must be an int >= 2"),
    ({"num_classes": 10.0}, r"num_classes must be an int >= 2"),
    ({"seed": 1.5}, r"seed must be an int.*seed=0"),
    ({"seed": None}, r"seed must be an int"),
    ({"labels": [0, 1]}, r"torch\.as_tensor"),
    ({"labels": torch.zeros(3, 2, dtype=torch.long)}, r"1-D.*argmax"),
    ({"labels": torch.zeros(3)}, r"integer dtype.*labels\.long\(\)"),
    ({"labels": torch.tensor([0, 10])}, r"\[0, 10\).*fix num_classes or remap"),
])
def test_common_validation(fn, kw, pattern):
    _one_line_error(lambda: fn(**kw), pattern)


@pytest.mark.parametrize("mapping, k, pattern", [
    ("cifar10", 12, r"mapping='cifar10' needs num_classes=10.*\{source: target\} dict"),
    ("cifar100", 10, r"unknown mapping 'cifar100'.*mapping='cifar10'"),
    ([(3, 5)], 10, r"mapping must be 'cifar10' or a \{source: target\} dict.*list"),
    ({}, 10, r"mapping is empty.*at least one"),
    ({1.0: 2}, 10, r"not a pair of class indices.*use ints"),
    ({"a": 2}, 10, r"not a pair of class indices"),
    ({True: 2}, 10, r"not a pair of class indices"),
    ({3: 10}, 10, r"outside \[0, 10\).*fix the mapping"),
    ({-1: 2}, 10, r"outside \[0, 10\)"),
    ({3: 3}, 10, r"maps a class to itself.*drop it"),
])
def test_asymmetric_mapping_validation(mapping, k, pattern):
    y = torch.zeros(5, dtype=torch.long)
    _one_line_error(lambda: asymmetric_noise(y, 0.2, k, seed=0, mapping=mapping), pattern)


@pytest.mark.parametrize("groups, k, pattern", [
    ("cifar100", 10, r"groups='cifar100' needs num_classes=100.*list of lists"),
    ("cifar10", 10, r"unknown groups 'cifar10'.*groups='cifar100'"),
    ({0: [1, 2]}, 10, r"groups must be 'cifar100' or a list of lists.*dict"),
    (torch.tensor([[0, 1]]), 10, r"groups must be 'cifar100' or a list of lists"),
    (3, 10, r"groups must be 'cifar100' or a list of lists.*int"),
    ([0, 1], 10, r"groups\[0\] is a int; each group must be a list.*e\.g\."),
    (["01"], 10, r"groups\[0\] is a str"),
    ([[0, 1], []], 10, r"groups\[1\] is empty; drop it"),
    ([[0, 1.0]], 10, r"groups\[0\] holds 1\.0, not a class index; use ints"),
    ([[0, 10]], 10, r"groups\[0\] holds class 10, outside \[0, 10\).*fix the groups"),
    ([[0, 1, 0]], 10, r"class 0 of groups\[0\] is twice in that group; groups must be disjoint"),
    ([[0, 1], [2, 1]], 10, r"class 1 of groups\[1\] is also in groups\[0\]; groups must be disjoint"),
    ([[0], [1]], 10, r"no group of >= 2 classes.*put at least two classes"),
])
def test_hierarchical_groups_validation(groups, k, pattern):
    y = torch.zeros(5, dtype=torch.long)
    _one_line_error(lambda: hierarchical_noise(y, 0.2, k, seed=0, groups=groups), pattern)


# ---------------------------------------------------------------- label_noise


def test_label_noise_dispatch():
    y10 = _labels_with_counts(CIFAR10_COUNTS)
    y100 = torch.arange(100).repeat(3)
    cases = [
        (label_noise(y10, "symmetric", 0.3, 10, seed=4), symmetric_noise(y10, 0.3, 10, seed=4)),
        (label_noise(y10, "asymmetric", 0.3, 10, seed=4), asymmetric_noise(y10, 0.3, 10, seed=4)),
        (label_noise(y10, "asymmetric", 0.5, 10, seed=4, mapping={0: 1}),
         asymmetric_noise(y10, 0.5, 10, seed=4, mapping={0: 1})),
        (label_noise(y100, "hierarchical", 0.3, 100, seed=4), hierarchical_noise(y100, 0.3, 100, seed=4)),
        (label_noise(y10, "hierarchical", 0.3, 10, seed=4, groups=[[0, 1, 2]]),
         hierarchical_noise(y10, 0.3, 10, seed=4, groups=[[0, 1, 2]])),
    ]
    for (a_noisy, a_mask), (b_noisy, b_mask) in cases:
        assert torch.equal(a_noisy, b_noisy) and torch.equal(a_mask, b_mask)
    assert NOISE_KINDS == ("symmetric", "asymmetric", "hierarchical")


@pytest.mark.parametrize("kind, kw, pattern", [
    ("pairflip", {}, r"unknown noise kind 'pairflip'; use one of 'symmetric', 'asymmetric', 'hierarchical'"),
    ("Symmetric", {}, r"unknown noise kind"),
    (None, {}, r"unknown noise kind None"),
    ("symmetric", {"mapping": {0: 1}}, r"mapping is only used by kind='asymmetric'.*drop it"),
    ("hierarchical", {"mapping": "cifar10"}, r"mapping is only used by kind='asymmetric'"),
    ("asymmetric", {"groups": [[0, 1]]}, r"groups is only used by kind='hierarchical'.*drop it"),
])
def test_label_noise_errors(kind, kw, pattern):
    _one_line_error(lambda: label_noise(Y10, kind, 0.2, 10, seed=0, **kw), pattern)


# ---------------------------------------------------------------- noise_metrics


class FixedPredictions(nn.Module):
    """Predicts the class stored in ``x[:, 0]``; records mode, grad state and calls."""

    def __init__(self, classes=4, tuple_output=False):
        super().__init__()
        self.classes, self.tuple_output = classes, tuple_output
        self.bias = nn.Parameter(torch.zeros(classes))
        self.calls, self.seen_training, self.seen_grad = 0, [], []

    def forward(self, x):
        self.calls += 1
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        logits = 10.0 * nn.functional.one_hot(x[:, 0].long(), self.classes).float() + self.bias
        return (logits, x) if self.tuple_output else logits


#              clean part (6)      | corrupted part (4)
CLEAN = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
NOISY = torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 3, 2])
CORRUPTED = NOISY != CLEAN
PRED = torch.tensor([0, 1, 2, 0, 3, 1, 0, 2, 0, 3])
# clean part: 4 of 6 right; corrupted: #6 memorised, #7 and #9 neither, #8 recovered
EXPECTED = {
    "samples": 10,
    "clean_samples": 6,
    "corrupted_samples": 4,
    "clean_correct": 4,
    "memorised_count": 1,
    "recovered_count": 1,
    "clean_accuracy": 4 / 6,
    "memorised": 0.25,
    "recovered": 0.25,
    "noisy_label_accuracy": 0.5,
    "clean_label_accuracy": 0.5,
}
X = PRED.float().unsqueeze(1)


def test_noise_metrics_exact_numbers():
    model = FixedPredictions()
    model.train()
    out = noise_metrics(model, X, NOISY, CLEAN, CORRUPTED)
    assert out == EXPECTED
    assert model.calls == 1  # one forward pass for all numbers
    assert model.seen_training == [False] and model.seen_grad == [False]
    assert model.training  # flags restored
    assert json.loads(json.dumps(out)) == out


def test_noise_metrics_batches_and_input_forms():
    model = FixedPredictions(tuple_output=True)
    assert noise_metrics(model, X, NOISY, CLEAN, CORRUPTED, batch_size=3) == EXPECTED
    assert model.calls == 4
    assert noise_metrics(model, (X, NOISY), NOISY, CLEAN, CORRUPTED) == EXPECTED
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, NOISY), batch_size=4)
    assert noise_metrics(model, loader, NOISY.int(), CLEAN.tolist(), CORRUPTED.tolist()) == EXPECTED


def test_noise_metrics_without_corruption():
    out = noise_metrics(FixedPredictions(), X, CLEAN, CLEAN, torch.zeros(10, dtype=torch.bool))
    assert out["corrupted_samples"] == 0 and out["memorised"] is None and out["recovered"] is None
    assert out["memorised_count"] == out["recovered_count"] == 0 and out["clean_accuracy"] == 0.5
    assert json.loads(json.dumps(out)) == out


@pytest.mark.parametrize("args, kw, pattern", [
    ((X, NOISY[:9], CLEAN, CORRUPTED), {}, r"noisy_labels has 9 entries but clean_labels has 10"),
    ((X, NOISY, CLEAN, CORRUPTED[:9]), {}, r"corrupted has 9 entries but there are 10 samples"),
    ((X, NOISY, CLEAN, CORRUPTED.long()), {}, r"corrupted must be a 1-D bool mask.*noise function"),
    ((X, NOISY, CLEAN, ~CORRUPTED), {}, r"True exactly where noisy_labels != clean_labels.*10 entries"),
    ((X, NOISY.float(), CLEAN, CORRUPTED), {}, r"noisy_labels must be a 1-D tensor of integers"),
    ((X, NOISY, "abc", CORRUPTED), {}, r"clean_labels must be a 1-D tensor of integers"),
    ((X[:8], NOISY, CLEAN, CORRUPTED), {}, r"inputs holds 8 samples but there are 10 labels"),
    ((X, NOISY + 4, CLEAN + 4, CORRUPTED), {}, r"noisy_labels: targets must lie in \[0, 4\)"),
    ((X, NOISY, CLEAN, CORRUPTED), {"batch_size": 0}, r"batch_size must be a positive int"),
    ((X, NOISY, CLEAN, CORRUPTED), {"device": "meta"}, r"device='meta' but the model is on cpu"),
])
def test_noise_metrics_validation(args, kw, pattern):
    _one_line_error(lambda: noise_metrics(FixedPredictions(), *args, **kw), pattern)


def test_noise_metrics_rejects_shuffled_loader_and_non_classifier():
    loader = torch.utils.data.DataLoader(X, batch_size=4, shuffle=True)
    _one_line_error(lambda: noise_metrics(FixedPredictions(), loader, NOISY, CLEAN, CORRUPTED),
                    r"shuffling DataLoader.*shuffle=False")

    class Flat(nn.Module):
        def forward(self, x):
            return x[:, 0]

    _one_line_error(lambda: noise_metrics(Flat(), X, NOISY, CLEAN, CORRUPTED),
                    r"\(batch, classes\) logits is needed")


# ---------------------------------------------------------------- trusted_set_quality


def test_trusted_set_quality_counts():
    corrupted = torch.tensor([False, True, False, True, True, False, False, False])
    out = trusted_set_quality(torch.tensor([0, 1, 2, 3]), corrupted)
    assert out == {"selected": 4, "corrupted": 2, "corrupted_fraction": 0.5, "clean": 2,
                   "base_corrupted_fraction": 3 / 8}
    assert json.loads(json.dumps(out)) == out
    assert trusted_set_quality([7, 5, 0], corrupted.tolist())["corrupted"] == 0
    assert trusted_set_quality(torch.tensor([4], dtype=torch.int32), corrupted)["corrupted_fraction"] == 1.0


Z4 = torch.zeros(4, dtype=torch.bool)


@pytest.mark.parametrize("indices, corrupted, pattern", [
    (torch.tensor([], dtype=torch.long), Z4, r"indices is empty"),
    (torch.tensor([0, 4]), Z4, r"indices must lie in \[0, 4\).*same training set"),
    (torch.tensor([-1, 2]), Z4, r"indices must lie in \[0, 4\)"),
    (torch.tensor([1, 2, 1]), Z4, r"1 duplicate.*torch\.unique"),
    (torch.tensor([0.0, 1.0]), Z4, r"indices must be a 1-D tensor of integers"),
    (torch.tensor([[0, 1]]), Z4, r"indices must be a 1-D tensor of integers"),
    (torch.tensor([0, 1]), torch.zeros(4), r"corrupted must be a 1-D bool mask"),
    (torch.tensor([0, 1]), torch.zeros(0, dtype=torch.bool), r"corrupted is empty"),
])
def test_trusted_set_quality_validation(indices, corrupted, pattern):
    _one_line_error(lambda: trusted_set_quality(indices, corrupted), pattern)
