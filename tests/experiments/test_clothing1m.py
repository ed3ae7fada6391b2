"""The Clothing1M-shaped tree generator (sap_fast.experiments.clothing1m): the real annotation
format, read back by the streamed reader of ``sap-fast correct``, the noise rate, partial overlap
of the clean and noisy sets, learnable classes, determinism, its command, and its speed."""
from __future__ import annotations

import os
import re

import pytest
import torch

from sap_fast.cli.data import Preprocess, open_data
from sap_fast.experiments import clothing1m
from sap_fast.experiments.clothing1m import CATEGORIES, write_tree

pytest.importorskip("PIL")

KEY = re.compile(r"^images/\d/\d\d/\d+\.jpg$")
LISTS = ("noisy_train_key_list.txt", "clean_train_key_list.txt", "clean_val_key_list.txt",
         "clean_test_key_list.txt")


def _lines(root, name):
    with open(os.path.join(root, name), encoding="utf-8") as f:
        return f.read().splitlines()


def _kv(root, name):
    out = {}
    for line in _lines(root, name):
        key, label = line.split(" ")
        out[key] = int(label)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("c1m") / "clothing1m")
    info = write_tree(root, noisy_train=280, clean_train=40, clean_val=70, clean_test=30, image_size=32, seed=0)
    return root, info


def test_the_tree_has_the_real_format(tree):
    root, info = tree
    assert sorted(os.listdir(root)) == sorted(["category_names_eng.txt", "noisy_label_kv.txt", "clean_label_kv.txt",
                                               *LISTS, "synthetic_true_label_kv.txt", "images"])
    assert _lines(root, "category_names_eng.txt") == list(CATEGORIES) and len(CATEGORIES) == 14
    lists = {name: _lines(root, name) for name in LISTS}
    assert [len(lists[n]) for n in LISTS] == [280, 40, 70, 30]
    for name, keys in lists.items():
        assert all(KEY.match(k) for k in keys), name
        assert len(set(keys)) == len(keys), name
    noisy, clean = _kv(root, "noisy_label_kv.txt"), _kv(root, "clean_label_kv.txt")
    assert all(KEY.match(k) and 0 <= v < 14 for k, v in {**noisy, **clean}.items())
    assert set(lists["noisy_train_key_list.txt"]) <= set(noisy)
    assert set(noisy) - set(lists["noisy_train_key_list.txt"])  # labels beyond the list, as in the real file
    assert set(clean) == set(lists["clean_train_key_list.txt"]) | set(lists["clean_val_key_list.txt"]) \
        | set(lists["clean_test_key_list.txt"])
    # the clean and noisy sets overlap in part: some clean_train images are noisy_train ones
    shared = set(lists["clean_train_key_list.txt"]) & set(lists["noisy_train_key_list.txt"])
    assert 0 < len(shared) < 40 and len(shared) == info["shared"]
    for split in ("clean_val_key_list.txt", "clean_test_key_list.txt"):
        assert not set(lists[split]) & set(lists["noisy_train_key_list.txt"])
    # every listed image is a JPEG of the asked size
    from PIL import Image

    every = set().union(*lists.values())
    assert info["images"] == len(every) == 280 + 30 + 70 + 30
    with Image.open(os.path.join(root, min(every))) as img:
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    assert all(os.path.isfile(os.path.join(root, k)) for k in every)


def test_the_noisy_labels_are_wrong_at_the_asked_rate(tree):
    root, info = tree
    noisy, truth = _kv(root, "noisy_label_kv.txt"), _kv(root, "synthetic_true_label_kv.txt")
    train = _lines(root, "noisy_train_key_list.txt")
    wrong = [k for k in train if noisy[k] != truth[k]]
    assert len(wrong) == round(0.38 * 280) and info["noise_rate"] == pytest.approx(len(wrong) / 280)
    confused = sum(noisy[k] == clothing1m.CONFUSED[truth[k]] for k in wrong)
    assert 0.3 < confused / len(wrong) < 0.7  # about half go to the confusable class
    clean = _kv(root, "clean_label_kv.txt")
    assert all(clean[k] == truth[k] for k in clean)


def test_the_reader_reads_it_back_and_the_classes_can_be_learnt(tree):
    root, _ = tree
    train = open_data(f"clothing1m:{root}", Preprocess())
    val = open_data(f"clothing1m:{root}:clean_val", Preprocess(), classes=train.classes, what="--val")
    test = open_data(f"clothing1m:{root}:clean_test", Preprocess(), classes=train.classes, what="--test")
    assert train.classes == list(CATEGORIES) and (len(train), len(val), len(test)) == (280, 70, 30)
    noisy = _kv(root, "noisy_label_kv.txt")
    assert [noisy[os.path.relpath(f, root)] for f in train.files] == train.targets.tolist()
    # a nearest-class-mean rule on the mean colour, fitted to the noisy labels, beats chance (1/14)
    # by far on the clean validation images
    def colour(ds):
        return torch.stack([ds[i][0].mean((1, 2)) for i in range(len(ds))])
    seen = colour(train)
    centres = torch.stack([seen[train.targets == c].mean(0) for c in range(14)])
    accuracy = (torch.cdist(colour(val), centres).argmin(1) == val.targets).float().mean().item()
    assert accuracy > 0.35


def test_the_tree_depends_on_the_seed_only(tmp_path, monkeypatch):
    monkeypatch.setattr(clothing1m, "CHUNK", 8)  # four chunks: the two worker processes share them
    a = write_tree(str(tmp_path / "a"), noisy_train=20, clean_val=5, clean_test=5, image_size=16, seed=3, workers=0)
    b = write_tree(str(tmp_path / "b"), noisy_train=20, clean_val=5, clean_test=5, image_size=16, seed=3, workers=2)
    assert a["images"] == b["images"] == 30
    for name in ("noisy_label_kv.txt", "clean_label_kv.txt", *LISTS):
        assert _lines(tmp_path / "a", name) == _lines(tmp_path / "b", name)
    key = _lines(tmp_path / "a", "clean_val_key_list.txt")[0]
    assert (tmp_path / "a" / key).read_bytes() == (tmp_path / "b" / key).read_bytes()


def test_the_command_and_its_errors(tmp_path, capsys):
    root = str(tmp_path / "c")
    assert clothing1m.main([root, "--noisy-train", "30", "--clean-val", "5", "--clean-test", "5",
                            "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "wrote 40 images (16x16)" in out and f"--val clothing1m:{root}:clean_val" in out
    with pytest.raises(SystemExit) as exit_:
        clothing1m.main([root, "--noisy-train", "30", "--clean-val", "5", "--clean-test", "5"])
    assert exit_.value.code == 2 and "not empty; give a new or empty folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="noise must be in"):
        write_tree(str(tmp_path / "d"), noisy_train=5, clean_val=1, clean_test=1, noise=1.0)


def test_speed(tree):
    # thousands a second on two free cores in memory; file creation on slow or shared disks
    # costs more, so the bound here is loose
    assert tree[1]["images_per_second"] > 100
