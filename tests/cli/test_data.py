"""The streamed data layer of ``sap-fast correct`` (sap_fast.cli.data): how a file becomes a
tensor (checked against a hand computation), the three kinds of dataset, every one-line error
(naming the file, and for Clothing1M the list file and line), the loader's settings and the
first-image check."""
from __future__ import annotations

import argparse
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler, Subset

from sap_fast.cli import data as D
from sap_fast.cli.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Clothing1M,
    ImageFolder,
    Preprocess,
    TensorFile,
    check_first,
    loader,
    open_data,
)
from sap_fast.cli.load import LoadError

Image = pytest.importorskip("PIL.Image")


def _save(path, pixels: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _pixels(h, w, seed=0, channels=3) -> np.ndarray:
    shape = (h, w, channels) if channels == 3 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def pil_only(monkeypatch):
    """The PIL + torch path, whether or not torchvision imports here."""
    monkeypatch.setattr(D, "_torchvision_functional", lambda: None)


# ---- Preprocess ---------------------------------------------------------------------------------

def test_preprocess_from_arguments():
    assert Preprocess.from_args() == Preprocess(channels=3)
    assert Preprocess.from_args(image_size=[32]).size == (32, 32)
    assert Preprocess.from_args(image_size=[24, 32]).size == (24, 32)
    p = Preprocess.from_args(preset="imagenet")
    assert (p.shorter, p.crop, p.mean, p.std) == (256, (224, 224), IMAGENET_MEAN, IMAGENET_STD)
    grey = Preprocess.from_args(channels=1, mean=[0.5], std=[0.25])
    assert (grey.channels, grey.mean, grey.std) == (1, (0.5,), (0.25,))
    assert Preprocess.from_args(mean=[0.5], std=[0.2]).mean == (0.5, 0.5, 0.5)  # one value for all
    # from the command's parsed options; absent ones count as not given
    ns = argparse.Namespace(preset=None, image_size=[8], channels=3, mean=[0.1, 0.2, 0.3], std=[1, 2, 3])
    assert Preprocess.from_args(ns) == Preprocess(size=(8, 8), mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    assert Preprocess.from_args(argparse.Namespace(preset="imagenet")) == p
    # frozen, hashable and picklable (it travels to DataLoader worker processes)
    assert pickle.loads(pickle.dumps(p)) == p and hash(p) == hash(Preprocess.from_args(preset="imagenet"))
    assert "centre crop 224x224" in p.describe()


@pytest.mark.parametrize("kwargs, words", [
    (dict(preset="imagenet", image_size=[64]), "leave out --image-size"),
    (dict(preset="imagenet", mean=[0.5], std=[0.5]), "leave out --mean/--std"),
    (dict(preset="imagenet", channels=1), "3-channel"),
    (dict(preset="cifar"), "unknown"),
    (dict(mean=[0.5, 0.5, 0.5]), "go together"),
    (dict(std=[0.5, 0.5, 0.5]), "go together"),
    (dict(mean=[0.5, 0.5], std=[0.5, 0.5]), "--mean has 2 values for 3 channels"),
    (dict(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5]), "--std has 2 values for 3 channels"),
    (dict(mean=[0.5], std=[0.0]), "zeros"),
    (dict(image_size=[1, 2, 3]), "--image-size takes N or H W"),
    (dict(image_size=[0]), "--image-size takes N or H W"),
    (dict(channels=2), "--channels must be 1 or 3"),
])
def test_preprocess_conflicts_are_one_line_errors(kwargs, words):
    with pytest.raises(ValueError, match=words) as err:
        Preprocess.from_args(**kwargs)
    assert "\n" not in str(err.value)


def test_pil_path_reads_pixels_scaled_to_one(tmp_path, pil_only):
    rgb = _pixels(5, 7)
    x = Preprocess()(_save(str(tmp_path / "a.png"), rgb))
    assert x.dtype == torch.float32 and x.shape == (3, 5, 7)
    assert torch.equal(x, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    # grey from colour: PIL's L = (19595 R + 38470 G + 7471 B + 2^15) >> 16
    grey = (rgb.astype(np.int64) @ np.array([19595, 38470, 7471]) + (1 << 15)) >> 16
    x = Preprocess(channels=1)(str(tmp_path / "a.png"))
    assert x.shape == (1, 5, 7) and torch.equal(x[0], torch.from_numpy(grey).float() / 255)


def test_pil_path_normalises_like_the_formula(tmp_path, pil_only):
    rgb = _pixels(6, 4, seed=1)
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 2.0)
    x = Preprocess(mean=mean, std=std)(_save(str(tmp_path / "a.png"), rgb))
    expect = (rgb.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expect, rtol=0, atol=1e-6)


def test_pil_path_imagenet_preset_crops_the_centre(tmp_path, pil_only):
    p = Preprocess.from_args(preset="imagenet")
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    # 256 high: no resize; the crop starts at row 16 and at column round(38) = 38, and for a width
    # of 301 at round(38.5) = 38 too (Python rounds halves to even, as torchvision does)
    for width in (300, 301):
        rgb = _pixels(256, width, seed=width)
        x = p(_save(str(tmp_path / f"w{width}.png"), rgb))
        expect = (rgb[16:240, 38:262].astype(np.float64) / 255 - mean) / std
        assert x.shape == (3, 224, 224)
        np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expect, rtol=0, atol=1e-6)
    # wider than high: the shorter side goes to 256, the longer to int(256 * 400 / 300) = 341
    assert D.shorter_side_size(400, 300, 256) == (341, 256)
    assert D.shorter_side_size(300, 400, 256) == (256, 341)
    assert D.centre_box(341, 256, 224, 224) == (58, 16, 282, 240)
    rgb = _pixels(300, 400, seed=2)
    x = p(_save(str(tmp_path / "wide.png"), rgb))
    resized = np.asarray(Image.fromarray(rgb).resize((341, 256), Image.BILINEAR))
    expect = (resized[16:240, 58:282].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expect, rtol=0, atol=1e-6)


def test_pil_path_resizes_to_a_given_size(tmp_path, pil_only):
    rgb = _pixels(20, 30, seed=3)
    x = Preprocess(size=(10, 12))(_save(str(tmp_path / "a.png"), rgb))
    resized = np.asarray(Image.fromarray(rgb).resize((12, 10), Image.BILINEAR))
    assert x.shape == (3, 10, 12)
    assert torch.equal(x, torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255)


def test_torchvision_path_gives_the_pil_numbers(tmp_path):
    if D._torchvision_functional() is None:
        pytest.skip("torchvision does not import here; its path is checked where it does")
    files = [_save(str(tmp_path / "a.png"), _pixels(300, 400)), _save(str(tmp_path / "b.png"), _pixels(40, 30))]
    for p in (Preprocess.from_args(preset="imagenet"), Preprocess(size=(24, 20), mean=(0.1,) * 3, std=(0.3,) * 3),
              Preprocess(channels=1)):
        with_tv = [p(f) for f in files]
        D._TORCHVISION = False
        try:
            without = [p(f) for f in files]
        finally:
            D._TORCHVISION = None
        for a, b in zip(with_tv, without):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_an_unreadable_image_names_its_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(LoadError, match=f"{bad}: unreadable image"):
        Preprocess()(str(bad))
    with pytest.raises(LoadError, match="no such file"):
        Preprocess()(str(tmp_path / "gone.png"))


# ---- image folders ------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    for c, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _save(str(root / c / f"{i}.png"), _pixels(6, 6, seed=10 * i + len(c)))
    _save(str(root / "dog" / "more" / "deep.jpg"), _pixels(6, 6))  # nested: part of the class
    (root / "cat" / "notes.txt").write_text("x")
    (root / "cat" / ".DS_Store").write_text("x")
    _save(str(root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png"), _pixels(6, 6))  # hidden: not walked
    (root / "dog" / "labels.csv").write_text("x")
    (root / "README").write_text("x")
    os.makedirs(root / "emu")
    return str(root)


def test_image_folder_lists_files_and_labels_without_decoding(folder):
    ds = open_data(folder, Preprocess(), what="--data")
    assert isinstance(ds, ImageFolder)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == [0, 0, 1, 1, 1, 1]
    rel = [os.path.relpath(f, folder) for f in ds.files]
    assert rel == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/2.png", "dog/more/deep.jpg"]
    # one note, with the counts
    assert ds.notes == [("skipped 3 non-image or hidden files; skipped 1 file outside the class folders; "
                         "class folder 'emu' is empty")]
    x, y = ds[3]
    assert x.shape == (3, 6, 6) and y == 1
    assert len(ds) == 6 and len(pickle.loads(pickle.dumps(ds))) == 6


def test_image_folder_maps_onto_the_training_classes(folder, tmp_path):
    val = tmp_path / "val"
    _save(str(val / "dog" / "a.png"), _pixels(6, 6))
    ds = open_data(str(val), Preprocess(), classes=["cat", "dog", "emu"], what="--val")
    assert ds.classes == ["cat", "dog", "emu"] and ds.targets.tolist() == [1] and ds.notes == []
    _save(str(val / "yak" / "b.png"), _pixels(6, 6))
    with pytest.raises(LoadError, match=r"--val .*val: classes \['yak'\] are not among the training data's"):
        open_data(str(val), Preprocess(), classes=["cat", "dog", "emu"], what="--val")


def test_image_folder_errors(tmp_path):
    os.makedirs(tmp_path / "flat")
    _save(str(tmp_path / "flat" / "a.png"), _pixels(4, 4))
    with pytest.raises(LoadError, match=r"--data .*flat: no class sub-folders"):
        open_data(str(tmp_path / "flat"), Preprocess())
    os.makedirs(tmp_path / "none" / "cat")
    (tmp_path / "none" / "cat" / "a.txt").write_text("x")
    with pytest.raises(LoadError, match="no images"):
        open_data(str(tmp_path / "none"), Preprocess())
    with pytest.raises(LoadError, match=r"^--test .*nowhere: no such file or folder"):
        open_data(str(tmp_path / "nowhere"), Preprocess(), what="--test")


# ---- tensor files -------------------------------------------------------------------------------

def test_tensor_file_pair_and_dict(tmp_path):
    x, y = torch.randn(5, 2, 3), torch.tensor([0, 2, 1, 2, 0])
    torch.save((x, y), tmp_path / "pair.pt")
    torch.save({"images": x, "labels": y.int()}, tmp_path / "dict.pt")
    for name in ("pair.pt", "dict.pt"):
        ds = open_data(str(tmp_path / name), Preprocess())
        assert isinstance(ds, TensorFile) and ds.notes == []
        assert ds.targets.dtype == torch.int64 and torch.equal(ds.targets, y)
        assert ds.classes == ["0", "1", "2"] and len(ds) == 5
        assert torch.equal(ds[3][0], x[3]) and ds[3][1] == 2
    assert open_data(str(tmp_path / "pair.pt"), None, classes=list("abcd")).classes == list("abcd")
    # mapped: it travels to a worker process as its path, and maps the file again there
    big = torch.randn(50, 100, 10)
    torch.save((big, torch.zeros(50, dtype=torch.long)), tmp_path / "big.pt")
    ds = open_data(str(tmp_path / "big.pt"), Preprocess())
    assert ds.mapped and len(pickle.dumps(ds)) < big.numel()  # not the 200 kB of inputs
    again = pickle.loads(pickle.dumps(ds))
    assert torch.equal(again.inputs, big) and torch.equal(again.targets, ds.targets)


def test_tensor_file_old_format_is_read_whole_with_a_note(tmp_path):
    torch.save((torch.randn(3, 2), torch.tensor([0, 1, 0])), tmp_path / "old.pt",
               _use_new_zipfile_serialization=False)
    ds = open_data(str(tmp_path / "old.pt"), Preprocess())
    assert len(ds) == 3 and len(ds.notes) == 1 and "old file format" in ds.notes[0] and not ds.mapped
    assert torch.equal(pickle.loads(pickle.dumps(ds)).inputs, ds.inputs)


@pytest.mark.parametrize("content, words", [
    ({"a": 1}, "expected \\(inputs, targets\\)"),
    ((torch.randn(3, 2), torch.tensor([0, 1])), "N integer class indices for N inputs"),
    ((torch.randn(3, 2), torch.tensor([0.0, 1.0, 0.0])), "N integer class indices"),
    ((torch.randn(3, 2), torch.tensor([0, -1, 0])), "negative label -1"),
    ((torch.randn(0, 2), torch.zeros(0, dtype=torch.long)), "holds no samples"),
])
def test_tensor_file_errors(tmp_path, content, words):
    torch.save(content, tmp_path / "d.pt")
    with pytest.raises(LoadError, match=f"^--data .*d.pt: .*{words}"):
        open_data(str(tmp_path / "d.pt"), Preprocess())


def test_tensor_file_checks_labels_against_classes_and_refuses_image_options(tmp_path):
    torch.save((torch.randn(3, 2), torch.tensor([0, 1, 5])), tmp_path / "d.pt")
    with pytest.raises(LoadError, match="holds the label 5 but the training data has 3 classes"):
        open_data(str(tmp_path / "d.pt"), Preprocess(), classes=list("abc"), what="--val")
    with pytest.raises(LoadError, match="holds tensors, which --preset/--image-size/--mean/--std do not change"):
        open_data(str(tmp_path / "d.pt"), Preprocess(size=(4, 4)))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(LoadError, match="junk.pt: unreadable"):
        open_data(str(tmp_path / "junk.pt"), Preprocess())


# ---- Clothing1M ---------------------------------------------------------------------------------

NAMES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket",
         "Down Coat", "Suit", "Shawl", "Dress", "Vest", "Underwear"]


def _c1m(root, *, keys=6, extra_lines=None):
    """A tiny Clothing1M tree: keys 0..2 noisy train, 3..4 clean val, 5 clean test, labels i % 14."""
    key = [f"images/{i % 2}/{i:02d}/{i}.jpg" for i in range(keys)]
    for k in key:
        _save(os.path.join(root, k), _pixels(8, 8, seed=len(k)))
    files = {
        "category_names_eng.txt": "\n".join(NAMES) + "\n",
        "noisy_label_kv.txt": "".join(f"{k} {(i + 1) % 14}\n" for i, k in enumerate(key[:3])),
        "clean_label_kv.txt": "".join(f"{k} {i % 14}\n" for i, k in enumerate(key)),
        "noisy_train_key_list.txt": "".join(f"{k}\n" for k in key[:3]),
        "clean_train_key_list.txt": f"{key[0]}\n{key[1]}\n",
        "clean_val_key_list.txt": f"{key[3]}\n\n{key[4]}\n",
        "clean_test_key_list.txt": f"{key[5]}\n",
    }
    files.update(extra_lines or {})
    for name, text in files.items():
        (root / name).write_text(text)
    return key


def test_clothing1m_splits_and_labels(tmp_path):
    key = _c1m(tmp_path)
    train = open_data(f"clothing1m:{tmp_path}", Preprocess(size=(4, 4)))
    assert isinstance(train, Clothing1M) and train.split == "noisy_train"
    assert train.classes == NAMES and train.targets.tolist() == [1, 2, 3]  # the noisy labels
    assert [os.path.relpath(f, tmp_path) for f in train.files] == key[:3]
    x, y = train[1]
    assert x.shape == (3, 4, 4) and y == 2
    val = open_data(f"clothing1m:{tmp_path}:clean_val", Preprocess(), classes=train.classes, what="--val")
    assert val.targets.tolist() == [3, 4] and len(val) == 2
    assert val.where(1).endswith(f"clean_val_key_list.txt line 3: {tmp_path / key[4]}")  # a blank line 2
    assert open_data(f"clothing1m:{tmp_path}:clean_test", Preprocess()).targets.tolist() == [5]
    assert open_data(f"clothing1m:{tmp_path}:clean_train", Preprocess()).targets.tolist() == [0, 1]
    # mapped onto the training data's class order
    order = NAMES[::-1]
    mapped = open_data(f"clothing1m:{tmp_path}:clean_val", Preprocess(), classes=order)
    assert mapped.classes == order and mapped.targets.tolist() == [13 - 3, 13 - 4]
    with pytest.raises(LoadError, match="classes .*'T-Shirt'.* are not among the training data's"):
        open_data(f"clothing1m:{tmp_path}:clean_val", Preprocess(), classes=NAMES[1:])
    assert len(pickle.loads(pickle.dumps(train))) == 3


def test_clothing1m_path_store_is_compact(tmp_path):
    _c1m(tmp_path)
    ds = open_data(f"clothing1m:{tmp_path}", Preprocess())
    assert isinstance(ds.files, D.PathList) and ds.files.nbytes < 200
    assert ds.files[-1] == ds.files[2] and ds.files[0:2] == [ds.files[0], ds.files[1]]
    with pytest.raises(IndexError):
        ds.files[3]


def test_clothing1m_spec_errors(tmp_path):
    _c1m(tmp_path)
    with pytest.raises(LoadError, match=r"^--val clothing1m:.*:val: unknown split 'val'; use one of noisy_train"):
        open_data(f"clothing1m:{tmp_path}:val", Preprocess(), what="--val")
    with pytest.raises(LoadError, match=r"^--data clothing1m:.*nowhere: no such folder"):
        open_data(f"clothing1m:{tmp_path}/nowhere", Preprocess())


@pytest.mark.parametrize("name, text, words", [
    ("noisy_label_kv.txt", "images/0/00/0.jpg 1\nimages/1/01/1.jpg 2 7\n", "noisy_label_kv.txt line 2: malformed"),
    ("noisy_label_kv.txt", "images/0/00/0.jpg 1\n\nimages/1/01/1.jpg\n", "noisy_label_kv.txt line 3: malformed"),
    ("noisy_label_kv.txt", "images/0/00/0.jpg one\n", "noisy_label_kv.txt line 1: the label 'one' is not a number"),
    ("noisy_label_kv.txt", "images/0/00/0.jpg 1\nimages/1/01/1.jpg 14\n",
     r"noisy_label_kv.txt line 2: the label 14 is outside 0..13 \(14 classes"),
    ("noisy_label_kv.txt", "images/0/00/0.jpg 1\nimages/0/00/0.jpg 2\n",
     "noisy_label_kv.txt line 2: 'images/0/00/0.jpg' is labelled 2 here and 1 on an earlier line"),
    ("noisy_label_kv.txt", "images/0/00/0.jpg 1\nimages/1/01/1.jpg 2\n",
     "noisy_train_key_list.txt line 3: 'images/0/02/2.jpg' has no label in .*noisy_label_kv.txt"),
    ("noisy_train_key_list.txt", "images/0/00/0.jpg\nimages/1/01/1.jpg 3\n",
     "noisy_train_key_list.txt line 2: malformed 'images/1/01/1.jpg 3'; expected one"),
    ("noisy_train_key_list.txt", "images/0/00/0.jpg\nimages/9/99/99.jpg\n",
     "noisy_train_key_list.txt line 2: .*images/9/99/99.jpg: no such file"),
    ("noisy_train_key_list.txt", "\n\n", "noisy_train_key_list.txt: lists no images"),
    ("category_names_eng.txt", "T-Shirt\n\nShirt\n", "category_names_eng.txt line 2: empty"),
])
def test_clothing1m_errors_name_the_file_and_line(tmp_path, name, text, words):
    if "99.jpg" in text:  # a listed image that is not there: a key with a label but no file
        _c1m(tmp_path, extra_lines={"noisy_label_kv.txt": "images/0/00/0.jpg 1\nimages/9/99/99.jpg 2\n"})
    else:
        _c1m(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(LoadError, match=f"^--data {tmp_path}.*{words}") as err:
        open_data(f"clothing1m:{tmp_path}", Preprocess())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, words", [
    ("../outside/secret.jpg", r"line 2: the key '\.\./outside/secret\.jpg' leads outside"),
    ("images/0/../../../outside/secret.jpg", r"line 2: the key 'images/0/\.\./\.\./\.\./outside/secret\.jpg' leads outside"),
    ("ABSOLUTE", r"line 2: the key '.*secret\.jpg' leads outside"),
    ("images/0/00/0.jpg", r"line 2: 'images/0/00/0\.jpg' is listed again \(first on line 1\); list each image once"),
])
def test_clothing1m_keys_outside_the_root_or_listed_twice_are_refused(tmp_path, key, words):
    """A key may not lead out of the root (the image there would be read), and an image listed
    twice would be scored and trusted twice."""
    root = tmp_path / "c1m"
    root.mkdir()
    key_list = _c1m(root)
    _save(str(tmp_path / "outside" / "secret.jpg"), _pixels(8, 8, seed=1))
    key = str(tmp_path / "outside" / "secret.jpg") if key == "ABSOLUTE" else key
    (root / "noisy_train_key_list.txt").write_text(f"{key_list[0]}\n{key}\n{key_list[1]}\n")
    extra = "" if key in key_list else f"{key} 3\n"  # a key listed twice keeps its one label
    (root / "noisy_label_kv.txt").write_text(f"{key_list[0]} 1\n{key_list[1]} 2\n{extra}")
    with pytest.raises(LoadError, match=f"^--data {root}/noisy_train_key_list.txt {words}") as err:
        open_data(f"clothing1m:{root}", Preprocess())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["category_names_eng.txt", "noisy_label_kv.txt", "noisy_train_key_list.txt"])
def test_clothing1m_missing_files(tmp_path, name):
    _c1m(tmp_path)
    os.remove(tmp_path / name)
    with pytest.raises(LoadError, match=f"{name}: no such file"):
        open_data(f"clothing1m:{tmp_path}", Preprocess())


def test_clothing1m_missing_image_found_at_decode_time_names_the_line(tmp_path):
    key = _c1m(tmp_path)
    os.remove(tmp_path / key[4])
    with pytest.raises(LoadError, match="clean_val_key_list.txt line 3: .*no such file"):
        open_data(f"clothing1m:{tmp_path}:clean_val", Preprocess())
    val = open_data(f"clothing1m:{tmp_path}:clean_val", Preprocess(), check_files=False)
    assert val[0][0].shape == (3, 8, 8)
    with pytest.raises(LoadError, match=f"clean_val_key_list.txt line 3: {tmp_path / key[4]}: no such file"):
        val[1]


# ---- loader and first-image check ---------------------------------------------------------------

def test_loader_settings(folder):
    ds = open_data(folder, Preprocess())
    plain = loader(ds, batch_size=4, workers=0, device="cpu")
    assert plain.num_workers == 0 and not plain.pin_memory and not plain.persistent_workers
    assert isinstance(plain.sampler, SequentialSampler) and plain.batch_size == 4
    batches = list(plain)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 6, 6), (2, 3, 6, 6)]
    assert torch.equal(torch.cat([y for _, y in batches]), ds.targets)
    assert torch.equal(batches[0][0][1], ds[1][0])
    busy = loader(ds, batch_size=4, workers=2, device=torch.device("cuda", 0))
    assert busy.num_workers == 2 and busy.pin_memory and busy.persistent_workers and busy.prefetch_factor == 4
    with pytest.raises(ValueError, match="--workers must be 0 or more"):
        loader(ds, batch_size=4, workers=-1, device="cpu")
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        loader(ds, batch_size=0, workers=0, device="cpu")


def test_loader_names_images_of_different_sizes(tmp_path):
    _save(str(tmp_path / "d" / "a" / "0.png"), _pixels(6, 6))
    _save(str(tmp_path / "d" / "a" / "1.png"), _pixels(6, 8))
    ds = open_data(str(tmp_path / "d"), Preprocess())
    with pytest.raises(LoadError, match=r"differ in size \(3x6x6 and 3x6x8\); pass --image-size H W"):
        list(loader(ds, batch_size=2, workers=0, device="cpu"))
    assert [x.shape[-1] for x, _ in loader(open_data(str(tmp_path / "d"), Preprocess(size=(5, 5))),
                                           batch_size=2, workers=0, device="cpu")] == [5]


def test_an_unreadable_image_in_a_worker_is_a_one_line_error_naming_it(folder):
    bad = os.path.join(folder, "dog", "1.png")
    with open(bad, "wb") as f:
        f.write(b"broken")
    ds = open_data(folder, Preprocess())
    with pytest.raises(LoadError) as err:
        list(loader(Subset(ds, [3, 4]), batch_size=2, workers=1, device="cpu"))
    assert str(err.value).startswith(f"{bad}: unreadable image (UnidentifiedImageError")
    assert "\n" not in str(err.value) and "worker" in str(err.value.__cause__)


def test_worker_messages_are_unwrapped():
    text = ("Caught LoadError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nsap_fast.cli.load.LoadError: a.jpg: unreadable image (bad)\n')
    assert D._original_message(RuntimeError(text)) == "a.jpg: unreadable image (bad)"
    assert D._original_message(RuntimeError("something else")) is None


def test_check_first_decodes_the_first_image(folder, tmp_path):
    ds = open_data(folder, Preprocess())
    x, y = check_first(ds, "--data")
    assert x.shape == (3, 6, 6) and y == 0
    with open(ds.files[0], "wb") as f:
        f.write(b"broken")
    with pytest.raises(LoadError, match=f"^--val {ds.files[0]}: unreadable image"):
        check_first(ds, "--val")
    with pytest.raises(LoadError, match="^--val: holds no samples"):
        check_first(Subset(ds, []), "--val")
