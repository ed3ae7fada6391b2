"""The embedded data set: 8x8 scikit-learn digits, label noise, a small CNN, and a cache of the
trained models.

Nothing is downloaded: scikit-learn ships the 1797 digit images. ``make_noisy_model`` gives a
CNN that has memorised 25% wrong training labels (100% accuracy on them) and so tests well
below a clean model; a corrector such as SAP is then applied to it. :func:`noisy_model` and
:func:`retrain_model` are the same models, their weights cached on disk (``$SAP_FAST_CACHE``,
else ``~/.cache/sap_fast``), so a second run skips training.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._runtime.evaluate import evaluate
from .._runtime.forward import progress
from .._runtime.io import save_torch
from .noise import label_noise

__all__ = [
    "NUM_CLASSES",
    "load_digits_splits",
    "SmallCNN",
    "train",
    "accuracy",
    "make_noisy_model",
    "retrain_reference",
    "DIGIT_GROUPS",
    "default_cache_dir",
    "noisy_model",
    "retrain_model",
    "retrain_accuracy",
]

# Look-alike digits, the demo's stand-in for CIFAR-100 superclasses in hierarchical noise.
DIGIT_GROUPS = [[1, 7], [3, 5, 8], [0, 6, 9], [2, 4]]

NUM_CLASSES = 10


def _stratified_split(
    labels: torch.Tensor, fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions ``0..N-1`` into (rest, part) with ``part`` ~``fraction`` of every class.

    The per-class sizes are rounded so that the total is ``round(fraction * N)`` (largest
    remainders first), matching what an unstratified split of that size would hold.
    """
    n = labels.numel()
    classes = torch.unique(labels)
    total = round(fraction * n)
    groups = [torch.nonzero(labels == c).flatten() for c in classes.tolist()]
    exact = [fraction * g.numel() for g in groups]
    sizes = [int(e) for e in exact]
    # Hand out the remaining slots to the classes with the largest fractional parts.
    order = sorted(range(len(groups)), key=lambda i: (exact[i] - sizes[i], -i), reverse=True)
    for i in order[: max(0, total - sum(sizes))]:
        sizes[i] += 1
    part, rest = [], []
    for g, k in zip(groups, sizes):
        perm = g[torch.randperm(g.numel(), generator=gen)]
        part.append(perm[:k])
        rest.append(perm[k:])
    part_idx = torch.sort(torch.cat(part)).values
    rest_idx = torch.sort(torch.cat(rest)).values
    return rest_idx, part_idx


def load_digits_splits(
    seed: int, *, test_fraction: float = 0.2, val_fraction: float = 0.1
) -> dict[str, torch.Tensor]:
    """Load the 8x8 digits and split them into train / val / test, stratified by class.

    ``test_fraction`` of all images go to test; ``val_fraction`` of the remaining training part
    is held out as the validation split (as in the SAP paper, which holds out 10% of the training
    set). The split depends only on ``seed``.

    Returns a dict with ``x_train``, ``y_train``, ``x_val``, ``y_val``, ``x_test``, ``y_test``
    (images float32 ``(n, 1, 8, 8)`` scaled to ``[0, 1]``, clean int64 labels) and
    ``idx_train``, ``idx_val``, ``idx_test`` (positions in sklearn's ``load_digits`` order).
    """
    for name, f in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 < f < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {f!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.int64)

    gen = torch.Generator().manual_seed(int(seed))
    trainval, test = _stratified_split(y, test_fraction, gen)
    tr_pos, va_pos = _stratified_split(y[trainval], val_fraction, gen)
    train_idx, val_idx = trainval[tr_pos], trainval[va_pos]
    out = {"idx_train": train_idx, "idx_val": val_idx, "idx_test": test}
    for name, idx in (("train", train_idx), ("val", val_idx), ("test", test)):
        out[f"x_{name}"] = x[idx].contiguous()
        out[f"y_{name}"] = y[idx].contiguous()
    return out


class SmallCNN(nn.Module):
    """A small CNN for 1x8x8 digits: two padded 3x3 convs, a 2x2 max-pool, two linear layers.

    conv(1->c1) -> ReLU -> conv(c1->c2) -> ReLU -> maxpool 2 -> flatten (c2*4*4)
    -> linear(hidden) -> ReLU -> linear(num_classes).

    ``seed`` (optional) makes the initialisation reproducible without touching the global RNG.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        *,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                for m in self.modules():
                    if m is not self and hasattr(m, "reset_parameters"):
                        m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    num_threads: int | None = None,
    desc: str = "training (noisy labels)",
) -> nn.Module:
    """Plain supervised training (Adam, cross-entropy, reshuffled mini-batches) in place.

    The batch order comes from a private generator seeded with ``seed``, so on CPU a fixed seed
    and a fixed thread count give the same weights (a different thread count can change the
    float rounding and hence the weights). ``num_threads``, if given, sets torch's intra-op
    thread count for the duration of the call and restores it afterwards. Returns ``model`` in
    eval mode.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
    if num_threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(int(num_threads))
        try:
            return train(
                model, x, y, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size,
                weight_decay=weight_decay, desc=desc,
            )
        finally:
            torch.set_num_threads(previous)
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    model.train()
    for _ in progress(range(epochs), desc=desc, total=epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            b = perm[start : start + batch_size]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> float:
    """Share of samples whose arg-max prediction equals ``y`` (eval mode, flags restored)."""
    return evaluate(model, (x, y), batch_size=batch_size, show_progress=False).accuracy


def make_noisy_model(
    seed: int,
    *,
    noise_rate: float = 0.25,
    noise_kind: str = "symmetric",
    epochs: int = 100,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    channels: tuple[int, int] = (32, 64),
    hidden: int = 128,
    num_threads: int | None = 1,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Split the digits, corrupt train and val labels, and train a SmallCNN on the noisy labels
    (or, given ``weights`` from an earlier run with the same arguments, load them instead).

    ``noise_kind``: "symmetric" (any other class), "asymmetric" (the CIFAR-10 class map applied
    to digit indices: 9→1, 2→0, 4→7, 3→5, 5→3) or "hierarchical" (within :data:`DIGIT_GROUPS`).

    Defaults: SmallCNN(32, 64, hidden 128), Adam lr 3e-3, no weight decay, batch 64, 100
    epochs: enough to memorise 25% wrong labels (100% noisy-train accuracy) in ~15 s on one CPU
    core. Training runs on ``num_threads=1`` by default: the tensors are tiny, so more threads
    gain little (~1.5x on 2 cores) and stall badly when the cores are shared, and the weights
    then do not depend on the machine's core count. ``None`` keeps torch's current setting.

    The validation labels are noisy too (model selection must not see clean labels). Returns a
    dict with ``model`` (eval mode), the splits of ``load_digits_splits`` (clean ``y_*``),
    ``y_train_noisy``, ``y_val_noisy``, ``corrupted_train``, ``corrupted_val`` (bool masks),
    ``train_acc_noisy``, ``train_acc_clean``, ``val_acc_noisy``, ``test_acc`` and
    ``train_seconds``.
    """
    splits = load_digits_splits(seed)
    y_tr_noisy, corrupted_tr = _noise(splits["y_train"], noise_kind, noise_rate, seed)
    y_va_noisy, corrupted_va = _noise(splits["y_val"], noise_kind, noise_rate, seed + 1_000_003)
    model = SmallCNN(NUM_CLASSES, channels=channels, hidden=hidden, seed=seed)
    t0 = time.perf_counter()
    if weights is not None:
        model.load_state_dict(weights)
        model.eval()
    else:
        train(
            model,
            splits["x_train"],
            y_tr_noisy,
            epochs=epochs,
            lr=lr,
            seed=seed,
            batch_size=batch_size,
            weight_decay=weight_decay,
            num_threads=num_threads,
        )
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = dict(splits)
    out.update(
        seed=seed,
        model=model,
        noise_rate=noise_rate,
        noise_kind=noise_kind,
        y_train_noisy=y_tr_noisy,
        y_val_noisy=y_va_noisy,
        corrupted_train=corrupted_tr,
        corrupted_val=corrupted_va,
        train_acc_noisy=accuracy(model, splits["x_train"], y_tr_noisy),
        train_acc_clean=accuracy(model, splits["x_train"], splits["y_train"]),
        val_acc_noisy=accuracy(model, splits["x_val"], y_va_noisy),
        test_acc=accuracy(model, splits["x_test"], splits["y_test"]),
        train_seconds=seconds,
    )
    return out


def _noise(labels: torch.Tensor, kind: str, rate: float, seed: int):
    groups = DIGIT_GROUPS if kind == "hierarchical" else None
    return label_noise(labels, kind, rate, NUM_CLASSES, seed=seed, groups=groups)


def retrain_reference(demo: dict[str, Any], *, epochs: int = 100, lr: float = 3e-3,
                      batch_size: int = 64, num_threads: int | None = 1) -> nn.Module:
    """The "Retrain" reference: the same recipe on the clean subset of the training split (the
    samples whose label was not corrupted), as in the SAP paper's tables."""
    keep = ~demo["corrupted_train"]
    seed = int(demo["seed"])
    model = SmallCNN(NUM_CLASSES, seed=seed)
    return train(model, demo["x_train"][keep], demo["y_train"][keep], epochs=epochs, lr=lr, seed=seed,
                 batch_size=batch_size, num_threads=num_threads, desc="retraining (clean subset)")


# -- the trained-model cache ---------------------------------------------------------------------
CACHE_VERSION = 1  # bump when the training recipe changes


def default_cache_dir() -> str:
    return os.environ.get("SAP_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sap_fast")


def _cached(cache: Optional[str], key: dict, build: Callable[[], dict]) -> dict:
    """``build()`` → state dict, memoised in ``cache`` under a hash of ``key`` (written atomically)."""
    if cache is None:
        return build()
    name = hashlib.sha1(repr(sorted(key.items())).encode()).hexdigest()[:16]
    path = os.path.join(cache, f"digits-{key['what']}-{name}.pt")
    if os.path.isfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            pass  # a damaged cache entry: train again and overwrite it
    state = build()
    os.makedirs(cache, exist_ok=True)
    save_torch(path, state)
    return state


def noisy_model(seed: int, noise: str, rate: float, epochs: int, cache: Optional[str]) -> dict:
    """:func:`make_noisy_model`, with the trained weights cached in ``cache`` (None: no cache;
    splits and noise are deterministic functions of the seed, so only the weights are stored)."""
    key = dict(what="noisy", seed=seed, noise=noise, rate=rate, epochs=epochs, version=CACHE_VERSION)
    trained = {}

    def build():
        trained.update(make_noisy_model(seed, noise_rate=rate, noise_kind=noise, epochs=epochs))
        return {k: v.clone() for k, v in trained["model"].state_dict().items()}

    state = _cached(cache, key, build)
    if trained:
        return trained
    return make_noisy_model(seed, noise_rate=rate, noise_kind=noise, epochs=epochs, weights=state)


def retrain_model(demo: dict, noise: str, rate: float, epochs: int, cache: Optional[str]) -> nn.Module:
    """The Retrain reference (trained on the samples not marked ``corrupted_train``), cached."""
    key = dict(what="retrain", seed=demo["seed"], noise=noise, rate=rate, epochs=epochs, version=CACHE_VERSION)

    def build():
        return retrain_reference(demo, epochs=epochs).state_dict()

    model = SmallCNN(NUM_CLASSES)
    model.load_state_dict(_cached(cache, key, build))
    return model.eval()


def retrain_accuracy(demo: dict, noise: str, rate: float, epochs: int, cache: Optional[str]) -> float:
    model = retrain_model(demo, noise, rate, epochs, cache)
    return accuracy(model, demo["x_test"], demo["y_test"])
