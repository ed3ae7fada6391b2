"""The validation and test splits decoded once (sap_fast.cli.decoded): pixels scaled per batch
equal the decoding path's tensors bit for bit, every pass of a decoded loader yields the streaming
loader's batches exactly, in memory or in a mapped file that leaves nothing behind, within the
memory budget, and data that is not decoded goes through as it is."""
import os

import pytest
import torch
from torch.utils.data import Subset

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from sap_fast.cli import data as data_module  # noqa: E402
from sap_fast.cli.data import LoadError, Preprocess, StreamLoader, loader, open_data  # noqa: E402
from sap_fast.cli.decoded import DecodedLoader, EvalCache  # noqa: E402


def _folder(root, sizes=((40, 30),), per_class=5, suffix=".jpg"):
    """An image folder, two classes, images of the given (width, height) sizes in turn."""
    gen = torch.Generator().manual_seed(0)
    for c in ("ant", "bee"):
        os.makedirs(root / c)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}{suffix}")
    return root


PREPROCESS = [Preprocess(size=(24, 20)), Preprocess(channels=1, size=(16, 16)),
              Preprocess(shorter=32, crop=(24, 24), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
              Preprocess(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.3, 0.2))]


@pytest.mark.parametrize("preprocess", PREPROCESS, ids=lambda p: p.describe())
@pytest.mark.parametrize("torchvision", [True, False], ids=["as-installed", "pil-only"])
def test_scaled_pixels_are_the_decoded_tensor_bit_for_bit(tmp_path, preprocess, torchvision, monkeypatch):
    if not torchvision:
        monkeypatch.setattr(data_module, "_TORCHVISION", False)
    root = _folder(tmp_path / "f", sizes=((40, 30), (31, 45)))
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    batch = torch.stack([preprocess.pixels(f) for f in files])
    assert batch.dtype == torch.uint8
    want = torch.stack([preprocess.decode(f) for f in files])
    assert torch.equal(preprocess.scale(batch), want)


def _batches(data):
    return [(x.clone(), y.clone()) for x, y in data]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


@pytest.mark.parametrize("mode", ["memory", "disk", "auto"])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_pass_yields_the_streaming_batches_bit_for_bit(tmp_path, mode, workers):
    root = _folder(tmp_path / "f", per_class=7)
    dataset = open_data(str(root), Preprocess(size=(20, 20), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
    want = _batches(loader(dataset, batch_size=4))
    staging = tmp_path / "staging"
    staging.mkdir()
    cache = EvalCache(mode, budget_gib=0 if mode == "auto" else None, folder=str(staging))
    cached = cache.loader(dataset, what="--val", batch_size=4, workers=workers)
    assert isinstance(cached, DecodedLoader) and len(cached.dataset) == 14
    first = _batches(cached)  # decodes and keeps
    assert cached.complete and cached.where == ("memory" if mode == "memory" else "disk")
    assert cached.nbytes == 14 * 3 * 20 * 20
    calls = []
    real = type(dataset).pixels
    dataset.pixels = lambda i: calls.append(i) or real(dataset, i)  # the later passes decode nothing
    assert _same(first, want) and _same(_batches(cached), want) and _same(_batches(cached), want)
    assert calls == []
    assert os.listdir(staging) == []  # the mapped file has no name: nothing to leave behind
    assert cache.summary() == {"--val": {"where": cached.where, "bytes": 14 * 1200}}


def test_a_subset_of_the_data_is_decoded_at_its_positions(tmp_path):
    dataset = open_data(str(_folder(tmp_path / "f", per_class=6)), Preprocess(size=(12, 12)))
    part = Subset(dataset, [9, 0, 4, 11, 2])
    part.targets = dataset.targets[[9, 0, 4, 11, 2]]
    want = _batches(loader(part, batch_size=2))
    cached = EvalCache("memory").loader(part, what="--val", batch_size=2)
    assert _same(_batches(cached), want) and _same(_batches(cached), want)


def test_the_budget_is_shared_by_the_splits_in_turn(tmp_path):
    dataset = open_data(str(_folder(tmp_path / "f", per_class=4)), Preprocess(size=(16, 16)))
    per_split = 8 * 3 * 16 * 16
    cache = EvalCache("auto", budget_gib=1.5 * per_split / 2 ** 30, folder=str(tmp_path))
    val, test = (cache.loader(dataset, what=w, batch_size=3) for w in ("--val", "--test"))
    _batches(val), _batches(test)
    assert (val.where, test.where) == ("memory", "disk")  # the second does not fit what is left
    assert EvalCache("auto").budget > 0  # the default: a share of the machine's memory


def test_a_pass_that_stops_early_keeps_nothing_and_the_next_one_decodes_again(tmp_path):
    dataset = open_data(str(_folder(tmp_path / "f", per_class=5)), Preprocess(size=(12, 12)))
    want = _batches(loader(dataset, batch_size=3))
    cached = EvalCache("memory").loader(dataset, what="--val", batch_size=3)
    for i, _ in enumerate(cached):
        if i == 1:
            break
    assert not cached.complete
    assert _same(_batches(cached), want) and cached.complete and _same(_batches(cached), want)


def test_images_of_several_sizes_stream_every_pass(tmp_path):
    """Without a resize, batches of one image can differ in size: nothing is kept, every pass
    decodes, as the streaming loader does."""
    dataset = open_data(str(_folder(tmp_path / "f", sizes=((20, 20), (24, 18)), per_class=2)), Preprocess())
    want = _batches(loader(dataset, batch_size=1))
    cached = EvalCache("memory").loader(dataset, what="--val", batch_size=1)
    assert _same(_batches(cached), want) and _same(_batches(cached), want)
    assert not cached.complete and cached.where.startswith("not kept")
    with pytest.raises(LoadError, match="images in one batch differ in size"):  # as the streaming loader
        _batches(EvalCache("memory").loader(dataset, what="--val", batch_size=2))


def test_data_that_is_not_decoded_and_the_off_switch_stream(tmp_path):
    x, y = torch.randn(10, 3, 4, 4), torch.arange(10) % 2
    torch.save((x, y), tmp_path / "t.pt")
    tensors = open_data(str(tmp_path / "t.pt"))
    assert not isinstance(EvalCache("memory").loader(tensors, what="--val", batch_size=4), DecodedLoader)
    images = open_data(str(_folder(tmp_path / "f", per_class=2)), Preprocess(size=(8, 8)))
    off = EvalCache("off").loader(images, what="--val", batch_size=4)
    assert isinstance(off, StreamLoader) and not isinstance(off, DecodedLoader)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="--eval-cache-gib must be >= 0"):
        EvalCache("auto", budget_gib=-1)
    with pytest.raises(ValueError, match="--eval-cache sometimes: use one of auto, memory, disk, off"):
        EvalCache("sometimes")
