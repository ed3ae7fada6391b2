"""A Clothing1M-shaped tree of synthetic images, for tests and benchmarks of the streamed data path.

Clothing1M (1M web images of 14 clothing classes, about 38% of the labels wrong, 14k clean
validation and 10k clean test images) is distributed as annotation files beside an ``images/``
folder; :func:`write_tree` writes the same files in the same format, with small random JPEGs:

* ``category_names_eng.txt``: the 14 class names, one a line;
* ``noisy_label_kv.txt`` / ``clean_label_kv.txt``: ``images/a/bc/name.jpg LABEL`` a line;
* ``noisy_train_key_list.txt``, ``clean_train_key_list.txt``, ``clean_val_key_list.txt``,
  ``clean_test_key_list.txt``: ``images/a/bc/name.jpg`` a line;
* ``images/a/bc/name.jpg``: one JPEG per image.

The noisy labels of ``noisy_train`` are wrong for a ``noise`` fraction of it (exactly
``round(noise * n)`` images; half of the wrong labels go to one confusable class, as Knitwear and
Sweater are confused in the real data, the rest anywhere else). The clean splits carry true
labels. As in the real set, the two label files overlap only in part: a quarter of
``clean_train`` are ``noisy_train`` images, and ``noisy_label_kv.txt`` also labels half of the
other ``clean_train`` images (the real file labels 37,497 images beyond the 1M list).
``synthetic_true_label_kv.txt``, which the real set does not have, holds every image's true
label, to measure how clean a selection is.

An image of class c is a class-specific colour plus stripes of a class-specific direction and
frequency (random phase), with a random brightness and pixel noise, so that a small model can
learn the classes. Images are written by worker processes, thousands a second for 64x64 ones.

    python -m sap_fast.experiments.clothing1m ROOT --noisy-train 2000 --clean-val 300 --clean-test 300
"""
from __future__ import annotations

import argparse
import colorsys
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .._runtime.io import atomic_write

__all__ = ["CATEGORIES", "main", "write_tree"]

CATEGORIES = ("T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket",
              "Down Coat", "Suit", "Shawl", "Dress", "Vest", "Underwear")
# the class a wrong label most often names (symmetric pairs, as the real confusions mostly are)
CONFUSED = {0: 1, 1: 0, 2: 4, 4: 2, 3: 11, 11: 3, 5: 6, 6: 5, 7: 8, 8: 7, 9: 12, 12: 9, 10: 13, 13: 10}
CHUNK = 256  # images per task; the noise of a chunk is seeded by (seed, chunk), whatever the workers


def _key(uid: int) -> str:
    return f"images/{uid % 10}/{(uid // 10) % 100:02d}/{uid:08d}.jpg"


PHASES = 8  # stripe phases per class, drawn per image
TILES = 32  # pixel-noise tiles per process, drawn per image and shifted by a random number of rows


def _class_patterns(size: int) -> np.ndarray:
    """(14, PHASES, size, size, 3) int16: colour and stripes of each class at each phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((len(CATEGORIES), PHASES, size, size, 3), np.int16)
    for c in range(len(CATEGORIES)):
        colour = np.array(colorsys.hsv_to_rgb(c / len(CATEGORIES), 0.6, 0.75), np.float32) * 255
        angle = np.pi * (c % 4) / 4
        freq = 2 + c // 4
        for p in range(PHASES):
            wave = np.sin(2 * np.pi * (freq * (np.cos(angle) * xx + np.sin(angle) * yy) + p / PHASES))
            out[c, p] = np.rint(colour + 40 * wave[..., None])
    return out


_CACHE: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}


def _patterns_and_noise(size: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    if (size, seed) not in _CACHE:
        rng = np.random.default_rng([seed, size, 1])
        noise = np.rint(rng.normal(0, 18, size=(TILES, size, size, 3))).astype(np.int16)
        _CACHE[(size, seed)] = _class_patterns(size), noise
    return _CACHE[(size, seed)]


def _write_chunk(task: Tuple[str, int, int, int, Sequence[int], Sequence[int]]) -> int:
    """Write one chunk of JPEGs: ``(root, size, seed, chunk, uids, labels)``."""
    import io

    from PIL import Image

    root, size, seed, chunk, uids, labels = task
    patterns, noise = _patterns_and_noise(size, seed)
    rng = np.random.default_rng([seed, chunk])
    n = len(uids)
    phase, tile, rows = rng.integers(0, PHASES, n), rng.integers(0, TILES, n), rng.integers(0, size, n)
    light = rng.integers(-30, 31, n)
    pixels = np.empty((size, size, 3), np.int16)
    for i, (uid, label) in enumerate(zip(uids, labels)):
        np.add(patterns[label, phase[i]], np.roll(noise[tile[i]], int(rows[i]), axis=0), out=pixels)
        pixels += light[i]
        np.clip(pixels, 0, 255, out=pixels)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        with open(os.path.join(root, _key(uid)), "wb") as f:
            f.write(buffer.getbuffer())
    return n


def _flip(true: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Labels with exactly round(rate * n) of them wrong: half to the confusable class, the
    rest uniformly among the other classes."""
    noisy = true.copy()
    wrong = rng.permutation(len(true))[:int(round(rate * len(true)))]
    k = len(CATEGORIES)
    confused = rng.random(len(wrong)) < 0.5
    other = (true[wrong] + rng.integers(1, k, size=len(wrong))) % k
    noisy[wrong] = np.where(confused, np.array([CONFUSED[c] for c in true[wrong]], dtype=true.dtype), other)
    return noisy


def _write_text(path: str, lines: List[str]) -> None:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def write_tree(root: str, *, noisy_train: int, clean_train: int = 0, clean_val: int, clean_test: int,
               image_size: int = 64, noise: float = 0.38, seed: int = 0, workers: int | None = None) -> dict:
    """Write a Clothing1M-shaped tree into ``root`` (a new or empty folder): the annotation
    files in the real format and one ``image_size`` square JPEG per image. Returns a summary:
    the counts, the realised noise rate, the seconds taken and the images written per second.

    ``workers``: processes that encode the images (default: one per core for 2,000 images or
    more, else none); the tree is the same whatever their number.
    """
    for name, n in (("noisy_train", noisy_train), ("clean_train", clean_train), ("clean_val", clean_val),
                    ("clean_test", clean_test)):
        if n < 0:
            raise ValueError(f"{name} must be 0 or more, got {n}")
    if noisy_train < 1:
        raise ValueError(f"noisy_train must be at least 1, got {noisy_train}")
    if not 0 <= noise < 1:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root}: not empty; give a new or empty folder")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    k = len(CATEGORIES)

    # images: noisy_train, then the clean ones that are not noisy_train images
    shared = min(clean_train // 4, noisy_train)
    total = noisy_train + (clean_train - shared) + clean_val + clean_test
    uids = rng.permutation(10 * total)[:total]  # scattered names, as in the real folders
    true = rng.integers(0, k, size=total)
    train_idx = np.arange(noisy_train)
    clean_train_idx = np.concatenate([rng.permutation(noisy_train)[:shared],
                                      noisy_train + np.arange(clean_train - shared)])
    start_val = noisy_train + clean_train - shared
    val_idx = start_val + np.arange(clean_val)
    test_idx = start_val + clean_val + np.arange(clean_test)

    extra_noisy = noisy_train + rng.permutation(clean_train - shared)[:(clean_train - shared) // 2]
    noisy = true.copy()
    noisy[train_idx] = _flip(true[train_idx], noise, rng)
    noisy[extra_noisy] = _flip(true[extra_noisy], noise, rng)
    noisy_keys = np.concatenate([train_idx, extra_noisy])
    clean_keys = np.concatenate([clean_train_idx, val_idx, test_idx])

    for folder in {os.path.dirname(_key(int(u))) for u in uids}:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    tasks = [(root, image_size, seed, c, uids[s:s + CHUNK].tolist(), true[s:s + CHUNK].tolist())
             for c, s in enumerate(range(0, total, CHUNK))]
    if workers is None:
        workers = (os.cpu_count() or 1) if total >= 2000 else 0
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            written = sum(pool.map(_write_chunk, tasks))
    else:
        written = sum(map(_write_chunk, tasks))
    images_done = time.perf_counter()

    def keys(idx) -> List[str]:
        return [_key(int(uids[i])) for i in idx]

    def kv(idx, labels) -> List[str]:
        return [f"{_key(int(uids[i]))} {int(labels[i])}" for i in idx]

    # the order of the real files: a fixed shuffle, not sorted by class
    _write_text(os.path.join(root, "category_names_eng.txt"), list(CATEGORIES))
    _write_text(os.path.join(root, "noisy_label_kv.txt"), kv(rng.permutation(noisy_keys), noisy))
    _write_text(os.path.join(root, "clean_label_kv.txt"), kv(rng.permutation(clean_keys), true))
    _write_text(os.path.join(root, "noisy_train_key_list.txt"), keys(rng.permutation(train_idx)))
    _write_text(os.path.join(root, "clean_train_key_list.txt"), keys(rng.permutation(clean_train_idx)))
    _write_text(os.path.join(root, "clean_val_key_list.txt"), keys(rng.permutation(val_idx)))
    _write_text(os.path.join(root, "clean_test_key_list.txt"), keys(rng.permutation(test_idx)))
    _write_text(os.path.join(root, "synthetic_true_label_kv.txt"), kv(np.arange(total), true))
    seconds = time.perf_counter() - start
    return {"root": root, "images": int(written), "noisy_train": noisy_train, "clean_train": clean_train,
            "clean_val": clean_val, "clean_test": clean_test, "shared": int(shared),
            "noise_rate": float(np.mean(noisy[train_idx] != true[train_idx])), "image_size": image_size,
            "workers": workers, "seconds": seconds,
            "images_per_second": written / max(images_done - start, 1e-9)}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sap_fast.experiments.clothing1m",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a new or empty folder")
    parser.add_argument("--noisy-train", type=int, required=True, help="noisy-labelled training images")
    parser.add_argument("--clean-train", type=int, default=0, help="clean-labelled training images (default 0)")
    parser.add_argument("--clean-val", type=int, required=True, help="clean validation images")
    parser.add_argument("--clean-test", type=int, required=True, help="clean test images")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square JPEGs (default 64)")
    parser.add_argument("--noise", type=float, default=0.38, help="fraction of wrong noisy labels (default 0.38)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="encoding processes (default: one per core)")
    args = parser.parse_args(argv)
    try:
        info = write_tree(args.root, noisy_train=args.noisy_train, clean_train=args.clean_train,
                          clean_val=args.clean_val, clean_test=args.clean_test, image_size=args.image_size,
                          noise=args.noise, seed=args.seed, workers=args.workers)
    except (ValueError, FileExistsError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"wrote {info['images']} images ({info['image_size']}x{info['image_size']}) to {info['root']} in "
          f"{info['seconds']:.1f} s ({info['images_per_second']:.0f} images/s); noisy labels wrong for "
          f"{100 * info['noise_rate']:.1f}% of noisy_train")
    print(f"use: --data clothing1m:{info['root']} --val clothing1m:{info['root']}:clean_val "
          f"--test clothing1m:{info['root']}:clean_test")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
