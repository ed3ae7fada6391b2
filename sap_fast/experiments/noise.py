"""Synthetic label noise, as in the SAP experiments (``docs/methods.md#label-noise``).

Every protocol corrupts an *exact* number of labels, so counts are reproducible, and is a pure
function of its inputs and ``seed`` (a private ``torch.Generator``; the global RNG is untouched).
Each returns ``(noisy_labels, corrupted)`` with ``corrupted`` True exactly where the label changed.

- :func:`symmetric_noise`: exactly ``floor(rate * N)`` samples, picked uniformly without
  replacement, each get a label drawn uniformly from the ``K - 1`` *other* classes, so every
  picked sample is truly wrong.
- :func:`asymmetric_noise`: class-dependent flips ``source -> target`` (default: the standard
  CIFAR-10 map truck->automobile, bird->airplane, deer->horse, cat->dog, dog->cat).
- :func:`hierarchical_noise`: flips to another class of the same group (default: CIFAR-100's
  20 superclasses of 5 fine classes).
- :func:`label_noise`: one entry point for all three, keyed by ``kind``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch

from .._runtime import checks

__all__ = [
    "symmetric_noise",
    "asymmetric_noise",
    "hierarchical_noise",
    "label_noise",
    "NOISE_KINDS",
    "CIFAR10_CLASS_NAMES",
    "CIFAR10_ASYMMETRIC_MAP",
    "CIFAR100_FINE_NAMES",
    "CIFAR100_COARSE_NAMES",
    "CIFAR100_FINE_TO_COARSE",
    "cifar100_superclasses",
]

NOISE_KINDS = ("symmetric", "asymmetric", "hierarchical")

# CIFAR-10 class order of the python pickles / torchvision.
CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# The standard asymmetric CIFAR-10 map (Patrini et al. 2017 and most later work):
# truck->automobile, bird->airplane, deer->horse, cat->dog, dog->cat.
CIFAR10_ASYMMETRIC_MAP = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# CIFAR-100 fine labels 0..99 in the order of the python pickles' meta["fine_label_names"]
# (alphabetical) and torchvision.datasets.CIFAR100.classes.
CIFAR100_FINE_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver",
    "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly",
    "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach",
    "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew",
    "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe",
    "whale", "willow_tree", "wolf", "woman", "worm",
)

# CIFAR-100 coarse labels 0..19 in the order of meta["coarse_label_names"] (alphabetical).
CIFAR100_COARSE_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)

# coarse_label of each fine label 0..99, as stored in the CIFAR-100 python pickles.
CIFAR100_FINE_TO_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3,
    3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
    2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)


def cifar100_superclasses() -> list[list[int]]:
    """The 20 CIFAR-100 superclasses as lists of fine labels (ascending), in coarse-label order."""
    groups: list[list[int]] = [[] for _ in CIFAR100_COARSE_NAMES]
    for fine, coarse in enumerate(CIFAR100_FINE_TO_COARSE):
        groups[coarse].append(fine)
    return groups


# ---------------------------------------------------------------- validation


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"labels must be a torch.Tensor, got {type(labels).__name__}; "
            "wrap them with torch.as_tensor(labels, dtype=torch.long)"
        )
    if labels.dim() != 1:
        raise ValueError(
            f"labels must be 1-D (one class index per sample), got shape {tuple(labels.shape)}; "
            "pass class indices, not one-hot rows (use labels.argmax(1))"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must have an integer dtype, got {labels.dtype}; convert with labels.long()"
        )
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, "
                f"found values in [{lo}, {hi}]; fix num_classes or remap the labels"
            )


def _check_num_classes(num_classes) -> int:
    return checks.positive_int(num_classes, "num_classes", minimum=2)


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise ValueError(f"rate must be a finite number in [0, 1), got {rate!r}")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(
            f"rate must be in [0, 1) (a fraction, e.g. 0.25 for 25%), got {rate!r}"
        )
    return float(rate)


def _as_index(value) -> Optional[int]:
    """``value`` as a Python int if it is an integer (Python, numpy or 0-d integer tensor)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_seed(seed) -> int:
    s = _as_index(seed)
    if s is None:
        raise ValueError(f"seed must be an int, got {seed!r}; pass e.g. seed=0")
    return s


def _count(rate: float, n: int) -> int:
    """``floor(rate * n)``, the exact number of samples a protocol corrupts out of ``n``."""
    return math.floor(rate * n)


def _check_mapping(mapping, num_classes: int) -> dict[int, int]:
    if isinstance(mapping, str):
        if mapping != "cifar10":
            raise ValueError(
                f"unknown mapping {mapping!r}; use mapping='cifar10' or a {{source: target}} dict"
            )
        if num_classes != 10:
            raise ValueError(
                f"mapping='cifar10' needs num_classes=10, got {num_classes}; "
                "pass a {source: target} dict for other label sets"
            )
        return dict(CIFAR10_ASYMMETRIC_MAP)
    if not isinstance(mapping, Mapping):
        raise ValueError(
            f"mapping must be 'cifar10' or a {{source: target}} dict of class indices, "
            f"got {type(mapping).__name__}"
        )
    if not mapping:
        raise ValueError("mapping is empty; give at least one {source: target} pair")
    out: dict[int, int] = {}
    for src, dst in mapping.items():
        s, d = _as_index(src), _as_index(dst)
        if s is None or d is None:
            raise ValueError(
                f"mapping entry {src!r}: {dst!r} is not a pair of class indices; "
                "use ints, e.g. {3: 5}"
            )
        if not (0 <= s < num_classes and 0 <= d < num_classes):
            raise ValueError(
                f"mapping entry {s}: {d} is outside [0, {num_classes}) for "
                f"num_classes={num_classes}; fix the mapping or num_classes"
            )
        if s == d:
            raise ValueError(
                f"mapping entry {s}: {d} maps a class to itself; drop it (unmapped classes "
                "are left untouched)"
            )
        out[s] = d
    return out


def _check_groups(groups, num_classes: int) -> list[list[int]]:
    """Canonical groups: each sorted, ordered by smallest member, singletons dropped."""
    if isinstance(groups, str):
        if groups != "cifar100":
            raise ValueError(
                f"unknown groups {groups!r}; use groups='cifar100' or a list of lists of "
                "class indices"
            )
        if num_classes != 100:
            raise ValueError(
                f"groups='cifar100' needs num_classes=100, got {num_classes}; "
                "pass a list of lists of class indices for other label sets"
            )
        return cifar100_superclasses()
    if isinstance(groups, (torch.Tensor, Mapping)) or not isinstance(groups, Sequence):
        raise ValueError(
            "groups must be 'cifar100' or a list of lists of class indices, "
            f"got {type(groups).__name__}"
        )
    seen: dict[int, int] = {}
    out: list[list[int]] = []
    for gi, group in enumerate(groups):
        if isinstance(group, (str, torch.Tensor)) or not isinstance(group, Sequence):
            raise ValueError(
                f"groups[{gi}] is a {type(group).__name__}; each group must be a list of "
                "class indices, e.g. [[0, 1], [2, 3, 4]]"
            )
        if len(group) == 0:
            raise ValueError(f"groups[{gi}] is empty; drop it or list its classes")
        members = []
        for c in group:
            k = _as_index(c)
            if k is None:
                raise ValueError(
                    f"groups[{gi}] holds {c!r}, not a class index; use ints in [0, {num_classes})"
                )
            if not 0 <= k < num_classes:
                raise ValueError(
                    f"groups[{gi}] holds class {k}, outside [0, {num_classes}) for "
                    f"num_classes={num_classes}; fix the groups or num_classes"
                )
            if k in seen:
                where = "twice in that group" if seen[k] == gi else f"also in groups[{seen[k]}]"
                raise ValueError(
                    f"class {k} of groups[{gi}] is {where}; groups must be disjoint"
                )
            seen[k] = gi
            members.append(k)
        if len(members) >= 2:
            out.append(sorted(members))
    if not out:
        raise ValueError(
            "groups has no group of >= 2 classes, so no label could be flipped; "
            "put at least two classes in one group"
        )
    return sorted(out, key=lambda g: g[0])


# ---------------------------------------------------------------- protocols


def symmetric_noise(
    labels: torch.Tensor, rate: float, num_classes: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt exactly ``floor(rate * N)`` labels, each to a different class.

    Args:
        labels: 1-D integer tensor of clean class indices in ``[0, num_classes)``. Not modified.
        rate: fraction of samples to corrupt, in ``[0, 1)``.
        num_classes: number of classes ``K`` (at least 2).
        seed: seed of the private ``torch.Generator``; the global RNG is not touched.

    Returns:
        ``(noisy_labels, corrupted)``: a new int64 tensor of labels on ``labels``' device and a
        bool mask, ``True`` exactly where the label was changed.
    """
    _check_num_classes(num_classes)
    rate = _check_rate(rate)
    seed = _check_seed(seed)
    _check_labels(labels, num_classes)

    n = labels.numel()
    n_noisy = _count(rate, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:n_noisy]
    # An offset in [1, K-1] added modulo K is uniform over the K-1 other classes.
    offset = torch.randint(1, num_classes, (n_noisy,), generator=gen)

    clean = labels.detach().to("cpu", torch.long)
    noisy = clean.clone()
    noisy[idx] = (clean[idx] + offset) % num_classes
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[idx] = True
    return noisy.to(labels.device), corrupted.to(labels.device)


def asymmetric_noise(
    labels: torch.Tensor,
    rate: float,
    num_classes: int,
    *,
    seed: int,
    mapping: Union[str, Mapping[int, int]] = "cifar10",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent noise: in each source class, flip exactly ``floor(rate * n_class)`` labels
    to that class's target.

    The literature usually flips each sample of a source class independently with probability
    ``rate``; this variant flips an exact count, chosen uniformly without replacement. It is the
    same in expectation and makes the number of corrupted labels per class reproducible.
    Flips are decided from the *clean* labels: with cat->dog and dog->cat, originally-cat
    samples may become dog and originally-dog samples may become cat, never both ways on one.
    Classes that are not a source are untouched.

    Args:
        labels: 1-D integer tensor of clean class indices in ``[0, num_classes)``. Not modified.
        rate: fraction of each source class to flip, in ``[0, 1)``.
        num_classes: number of classes ``K`` (at least 2).
        seed: seed of the private ``torch.Generator``; the global RNG is not touched.
        mapping: ``"cifar10"`` (:data:`CIFAR10_ASYMMETRIC_MAP`: truck(9)->automobile(1),
            bird(2)->airplane(0), deer(4)->horse(7), cat(3)->dog(5), dog(5)->cat(3); needs
            ``num_classes == 10``) or a ``{source: target}`` dict of distinct class indices.

    Returns:
        ``(noisy_labels, corrupted)`` as for :func:`symmetric_noise`.
    """
    _check_num_classes(num_classes)
    rate = _check_rate(rate)
    seed = _check_seed(seed)
    pairs = _check_mapping(mapping, num_classes)
    _check_labels(labels, num_classes)

    clean = labels.detach().to("cpu", torch.long)
    noisy = clean.clone()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for src in sorted(pairs):  # sorted: the result does not depend on the dict's order
        members = torch.nonzero(clean == src).flatten()
        k = _count(rate, members.numel())
        pick = members[torch.randperm(members.numel(), generator=gen)[:k]]
        noisy[pick] = pairs[src]
    corrupted = noisy != clean
    return noisy.to(labels.device), corrupted.to(labels.device)


def hierarchical_noise(
    labels: torch.Tensor,
    rate: float,
    num_classes: int,
    *,
    seed: int,
    groups: Union[str, Sequence[Sequence[int]]] = "cifar100",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``floor(rate * N_eligible)`` labels to another class of the same group.

    A sample is eligible when its (clean) class lies in a group of at least 2 classes. The
    flipped samples are chosen uniformly without replacement among the eligible ones, and each
    gets a class drawn uniformly from the *other* classes of its group, so every flipped label
    is truly wrong but stays within its superclass.

    Args:
        labels: 1-D integer tensor of clean class indices in ``[0, num_classes)``. Not modified.
        rate: fraction of the eligible samples to flip, in ``[0, 1)``.
        num_classes: number of classes ``K`` (at least 2).
        seed: seed of the private ``torch.Generator``; the global RNG is not touched.
        groups: ``"cifar100"`` (the 20 CIFAR-100 superclasses of 5 fine classes,
            :func:`cifar100_superclasses`; needs ``num_classes == 100``) or a list of disjoint
            lists of class indices. Classes in no list form singleton groups and are never
            flipped. The result does not depend on the order of groups or of their members.

    Returns:
        ``(noisy_labels, corrupted)`` as for :func:`symmetric_noise`.
    """
    _check_num_classes(num_classes)
    rate = _check_rate(rate)
    seed = _check_seed(seed)
    group_list = _check_groups(groups, num_classes)
    _check_labels(labels, num_classes)

    # Per class: its group's size (1 = never flipped), position in the group, and a padded
    # table of the group's members.
    width = max(len(g) for g in group_list)
    size = torch.ones(num_classes, dtype=torch.long)
    pos = torch.zeros(num_classes, dtype=torch.long)
    table = torch.zeros(num_classes, width, dtype=torch.long)
    for g in group_list:
        members = torch.tensor(g, dtype=torch.long)
        size[members] = len(g)
        pos[members] = torch.arange(len(g))
        table[members, : len(g)] = members

    clean = labels.detach().to("cpu", torch.long)
    noisy = clean.clone()
    eligible = torch.nonzero(size[clean] >= 2).flatten()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pick = eligible[torch.randperm(eligible.numel(), generator=gen)[: _count(rate, eligible.numel())]]
    cls = clean[pick]
    m = size[cls]
    # An offset in [1, m-1] added modulo m is uniform over the m-1 other group members; one
    # exact draw per distinct group size, in ascending size order.
    offset = torch.zeros_like(cls)
    for s in sorted(set(m.tolist())):
        sel = torch.nonzero(m == s).flatten()
        offset[sel] = torch.randint(1, s, (sel.numel(),), generator=gen)
    noisy[pick] = table[cls, (pos[cls] + offset) % m]
    corrupted = noisy != clean
    return noisy.to(labels.device), corrupted.to(labels.device)


def label_noise(
    labels: torch.Tensor,
    kind: str,
    rate: float,
    num_classes: int,
    *,
    seed: int,
    mapping: Union[str, Mapping[int, int], None] = None,
    groups: Union[str, Sequence[Sequence[int]], None] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the noise protocol named by ``kind`` (one of :data:`NOISE_KINDS`).

    ``mapping`` is used only by ``"asymmetric"`` (default ``"cifar10"``) and ``groups`` only by
    ``"hierarchical"`` (default ``"cifar100"``); passing either to another kind is an error.
    Returns ``(noisy_labels, corrupted)`` as the protocol does.
    """
    if not isinstance(kind, str) or kind not in NOISE_KINDS:
        raise ValueError(
            f"unknown noise kind {kind!r}; use one of {', '.join(map(repr, NOISE_KINDS))}"
        )
    if mapping is not None and kind != "asymmetric":
        raise ValueError(
            f"mapping is only used by kind='asymmetric', not kind={kind!r}; drop it"
        )
    if groups is not None and kind != "hierarchical":
        raise ValueError(
            f"groups is only used by kind='hierarchical', not kind={kind!r}; drop it"
        )
    if kind == "symmetric":
        return symmetric_noise(labels, rate, num_classes, seed=seed)
    if kind == "asymmetric":
        return asymmetric_noise(
            labels, rate, num_classes, seed=seed, mapping="cifar10" if mapping is None else mapping
        )
    return hierarchical_noise(
        labels, rate, num_classes, seed=seed, groups="cifar100" if groups is None else groups
    )
