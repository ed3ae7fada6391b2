"""Data for ``sap-fast correct``, streamed: a dataset knows every sample's file and label up
front, and decodes one image per ``__getitem__`` (in DataLoader worker processes), so memory does
not grow with the number of images.

Three sources, all opened by :func:`open_data`:

* an image folder in class sub-folders (``train/<class>/*.jpg``, sub-folders of a class folder
  too): classes sorted by name, samples in the order torchvision's ``ImageFolder`` gives;
* a ``.pt`` file holding ``(inputs, targets)`` tensors (or a dict with ``inputs``/``x``/``images``
  and ``targets``/``labels``/``y``), memory-mapped rather than read whole;
* Clothing1M as distributed, ``clothing1m:ROOT[:SPLIT]`` (see :class:`Clothing1M`).

Every dataset has ``targets`` (int64, one label per sample, read without decoding any image),
``classes`` (names), ``notes`` (at most a line or two of things skipped, for the caller to
print), and the image datasets ``files`` (a compact :class:`PathList`). :class:`Preprocess` is how
a file becomes a float32 ``(C, H, W)`` tensor; :func:`loader` batches a dataset; :func:`check_first`
decodes the first sample so a bad file or option fails before any long pass.

Every failure is a one-line :class:`~sap_fast.cli.load.LoadError` (an image, list or label file)
or ``ValueError`` (options) that names the file, and the list file and line for Clothing1M.
"""
from __future__ import annotations

import os
import re
from array import array
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .._runtime.checks import first_line, torch_load_problem
from .load import IMAGE_SUFFIXES, LoadError

__all__ = ["CLOTHING1M_SPLITS", "IMAGENET_MEAN", "IMAGENET_STD", "Clothing1M", "ImageFolder", "PathList",
           "Preprocess", "StreamLoader", "TensorFile", "check_first", "data_path", "loader", "open_data"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("imagenet",)


# ---- one file → one tensor -----------------------------------------------------------------------

_TORCHVISION = None  # per process: torchvision.transforms.functional, False when it does not import


def _torchvision_functional():
    """torchvision's functional transforms when torchvision imports with this torch, else None."""
    global _TORCHVISION
    if _TORCHVISION is None:
        try:
            from torchvision.transforms import functional
        except Exception:  # not installed, or built for another torch
            functional = False
        _TORCHVISION = functional
    return _TORCHVISION or None


def shorter_side_size(width: int, height: int, shorter: int) -> Tuple[int, int]:
    """``(width, height)`` after resizing the shorter side to ``shorter`` with the aspect kept, the
    longer side truncated as torchvision's ``Resize(int)`` does."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def centre_box(width: int, height: int, crop_h: int, crop_w: int) -> Tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box of a centre crop, rounded as torchvision's
    ``CenterCrop`` rounds (Python's ``round``)."""
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return left, top, left + crop_w, top + crop_h


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a float32 ``(C, H, W)`` tensor: read in PIL mode ``L``
    (``channels=1``) or ``RGB`` (3); resized to ``size`` = (H, W) with bilinear filtering, or its
    shorter side resized to ``shorter`` (aspect kept) and then centre-cropped to ``crop`` = (H, W);
    pixel values scaled to [0, 1]; then ``(x - mean) / std`` per channel when they are given.

    torchvision's functional transforms do it when torchvision imports; otherwise PIL and torch
    do the same steps, with the same numbers (PIL does torchvision's resizing of PIL images too).
    Build it from the command's options with :meth:`from_args`; ``Preprocess()`` reads RGB at the
    file's own size, unnormalised.
    """

    channels: int = 3
    size: Optional[Tuple[int, int]] = None
    shorter: Optional[int] = None
    crop: Optional[Tuple[int, int]] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        for name in ("size", "crop", "mean", "std"):  # lists from the caller: tuples, so it hashes
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.channels not in (1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"the image size must be two positive numbers H W, got {self.size}")
        if self.size is not None and (self.shorter is not None or self.crop is not None):
            raise ValueError("give either a size (H, W) or a shorter side and a centre crop, not both")
        if self.crop is not None and (self.shorter is None or len(self.crop) != 2
                                      or not 1 <= min(self.crop) <= max(self.crop) <= self.shorter):
            raise ValueError(f"a centre crop {self.crop} needs a shorter side at least as large, got "
                             f"{self.shorter}")
        if self.shorter is not None and self.shorter < 1:
            raise ValueError(f"the shorter side must be positive, got {self.shorter}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("--mean and --std go together: give both (one value per channel) or neither")
        if self.mean is not None:
            for flag, values in (("--mean", self.mean), ("--std", self.std)):
                if len(values) != self.channels:
                    raise ValueError(f"{flag} has {len(values)} values for {self.channels} channels; give "
                                     f"{self.channels} (or one for every channel)")
            if any(s == 0 for s in self.std):
                raise ValueError(f"--std must not hold zeros, got {list(self.std)}")

    @classmethod
    def from_args(cls, args=None, *, preset: Optional[str] = None, image_size: Optional[Sequence[int]] = None,
                  channels: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None) -> "Preprocess":
        """From the command's options: an ``argparse.Namespace`` with ``preset``, ``image_size``,
        ``channels``, ``mean`` and ``std`` (those it lacks count as not given), or the keywords.

        ``preset="imagenet"``: shorter side 256, centre crop 224, the ImageNet mean and std; it
        excludes ``image_size``, ``mean`` and ``std``. ``image_size``: ``[N]`` or ``[H, W]``.
        ``mean``/``std``: one value per channel, or one for all. Conflicts are one-line ValueErrors.
        """
        if args is not None:
            preset, image_size, channels, mean, std = (getattr(args, k, None) for k in
                                                       ("preset", "image_size", "channels", "mean", "std"))
        channels = 3 if channels is None else channels
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"--preset {preset}: unknown; the presets are {', '.join(PRESETS)}")
            given = [flag for flag, v in (("--image-size", image_size), ("--mean", mean), ("--std", std))
                     if v is not None]
            if given:
                raise ValueError(f"--preset {preset} sets the size (shorter side 256, centre crop 224) and "
                                 f"the ImageNet mean/std itself; leave out {'/'.join(given)}, or drop --preset")
            if channels != 3:
                raise ValueError(f"--preset {preset} is for 3-channel images; leave out --channels {channels}")
            return cls(channels=3, shorter=256, crop=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
        size = None
        if image_size is not None:
            image_size = [int(v) for v in image_size]
            if len(image_size) not in (1, 2) or min(image_size) < 1:
                raise ValueError(f"--image-size takes N or H W (positive), got {' '.join(map(str, image_size))}")
            size = (image_size[0], image_size[-1])
        if (mean is None) != (std is None):
            raise ValueError("--mean and --std go together: give both (one value per channel) or neither")
        if mean is not None:
            mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
            for flag, values in (("--mean", mean), ("--std", std)):
                if len(values) not in (1, channels):
                    raise ValueError(f"{flag} has {len(values)} values for {channels} channels; give "
                                     f"{channels} (or one for every channel)")
            mean, std = mean * (channels // len(mean)), std * (channels // len(std))
        return cls(channels=channels, size=size, mean=mean, std=std)

    @property
    def resizes(self) -> bool:
        """Whether every image comes out at one size (whatever the files' sizes)."""
        return self.size is not None or self.crop is not None

    @property
    def changes_pixels(self) -> bool:
        """Whether anything beyond reading and scaling happens (resize, crop, normalisation)."""
        return self.resizes or self.shorter is not None or self.mean is not None

    def describe(self) -> str:
        parts = ["grey" if self.channels == 1 else "RGB"]
        if self.size is not None:
            parts.append(f"resized to {self.size[0]}x{self.size[1]}")
        if self.shorter is not None:
            parts.append(f"shorter side {self.shorter}")
        if self.crop is not None:
            parts.append(f"centre crop {self.crop[0]}x{self.crop[1]}")
        parts.append("[0, 1]")
        if self.mean is not None:
            parts.append(f"normalised (mean {list(self.mean)}, std {list(self.std)})")
        return ", ".join(parts)

    def __call__(self, file: str) -> torch.Tensor:
        """The tensor of ``file``; a file that cannot be read is a LoadError naming it."""
        try:
            return self.decode(file)
        except FileNotFoundError:
            raise LoadError(f"{file}: no such file") from None
        except Exception as err:
            raise LoadError(f"{file}: unreadable image ({type(err).__name__}: {first_line(err)})") from None

    def decode(self, file: str) -> torch.Tensor:
        """The tensor of ``file``; lets the reader's own exception through (callers name the file)."""
        img = self._sized(file)
        tf = _torchvision_functional()
        if tf is not None:
            t = tf.to_tensor(img)
            return t if self.mean is None else tf.normalize(t, list(self.mean), list(self.std))
        # numpy for the arithmetic: one thread, as a DataLoader worker has, also in the main
        # process (torch would spread these small operations over its thread pool); float32
        # throughout, so the numbers are torchvision's to_tensor and normalize
        a = np.ascontiguousarray(self._array(img).transpose(2, 0, 1), dtype=np.float32)
        a /= np.float32(255)
        if self.mean is not None:
            a -= np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
            a /= np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        return torch.from_numpy(a)

    def pixels(self, file: str) -> torch.Tensor:
        """The uint8 ``(C, H, W)`` pixels of ``file`` after resizing and cropping, before scaling:
        :meth:`scale` of them is :meth:`decode`, bit for bit. Lets the reader's exception through."""
        a = self._array(self._sized(file)).transpose(2, 0, 1)
        return torch.from_numpy(np.array(a, dtype=np.uint8, order="C"))  # a copy of its own, writable

    def scale(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(..., C, H, W)`` (a batch of :meth:`pixels`) → float32 in [0, 1], then
        normalised: the operations of :meth:`decode`, one correctly rounded float32 operation per
        element each, so the values are the same bit for bit."""
        x = pixels.to(torch.float32).div_(255)
        if self.mean is not None:
            x.sub_(torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1))
            x.div_(torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1))
        return x

    def _sized(self, file: str):
        """The PIL image of ``file`` in the mode of ``channels``, resized and cropped."""
        from PIL import Image

        tf = _torchvision_functional()
        with Image.open(file) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
        if tf is not None:
            bilinear = tf.InterpolationMode.BILINEAR
            if self.size is not None:
                img = tf.resize(img, list(self.size), interpolation=bilinear)
            elif self.shorter is not None:
                img = tf.resize(img, self.shorter, interpolation=bilinear)
                if self.crop is not None:
                    img = tf.center_crop(img, list(self.crop))
            return img
        if self.size is not None:
            target = (self.size[1], self.size[0])
            if img.size != target:
                img = img.resize(target, Image.BILINEAR)
        elif self.shorter is not None:
            target = shorter_side_size(img.size[0], img.size[1], self.shorter)
            if img.size != target:
                img = img.resize(target, Image.BILINEAR)
            if self.crop is not None:
                img = img.crop(centre_box(img.size[0], img.size[1], *self.crop))
        return img

    def _array(self, img) -> np.ndarray:
        """The ``(H, W, C)`` uint8 array of a PIL image (as torchvision's to_tensor reads it)."""
        return np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], self.channels)


# ---- many paths in little memory ------------------------------------------------------------------

class PathList(Sequence):
    """Paths held as one bytes blob and an int64 offset array: about 40 bytes a path plus 8, no
    Python object per path (a list of str costs ~100 bytes a path, and forked DataLoader workers
    copy every page whose objects they touch; these two buffers stay shared). Items are
    ``prefix + key`` as str."""

    def __init__(self, keys: Sequence[bytes] = (), prefix: str = ""):
        lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
        self._offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._blob = b"".join(keys)
        self.prefix = prefix

    @classmethod
    def from_buffers(cls, blob: bytes, ends: Sequence[int], prefix: str = "") -> "PathList":
        """Keys laid end to end in ``blob``, key ``i`` ending at ``ends[i]``."""
        out = cls(prefix=prefix)
        out._blob = bytes(blob)
        out._offsets = np.concatenate([np.zeros(1, np.int64), np.asarray(ends, dtype=np.int64)])
        return out

    def raw(self, i: int) -> bytes:
        """The ``i``-th key (no prefix) as bytes."""
        return self._blob[self._offsets[i]:self._offsets[i + 1]]

    def key(self, i: int) -> str:
        """The ``i``-th path without the prefix."""
        return os.fsdecode(self.raw(i))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"path {i} of {n}")
        return self.prefix + self.key(i % n)

    def __iter__(self):
        for i in range(len(self)):
            yield self.prefix + self.key(i)

    @property
    def nbytes(self) -> int:
        return len(self._blob) + self._offsets.nbytes


# ---- datasets -----------------------------------------------------------------------------------

class _Images(Dataset):
    """Files, labels and the preprocessing; ``__getitem__`` decodes one image."""

    files: PathList
    targets: torch.Tensor
    classes: List[str]
    notes: List[str]
    preprocess: Preprocess

    def __len__(self) -> int:
        return len(self.files)

    def where(self, i: int) -> str:
        """How an error names sample ``i``."""
        return self.files[i]

    def __getitem__(self, i):
        i = int(i)
        return self._read(i, self.preprocess.decode), int(self.targets[i])

    def pixels(self, i: int) -> torch.Tensor:
        """Sample ``i``'s uint8 pixels (:meth:`Preprocess.pixels`); ``preprocess.scale`` of them is
        ``self[i][0]``."""
        return self._read(int(i), self.preprocess.pixels)

    def _read(self, i: int, how):
        try:
            return how(self.files[i])
        except FileNotFoundError:
            raise LoadError(f"{self.where(i)}: no such file") from None
        except Exception as err:
            raise LoadError(f"{self.where(i)}: unreadable image ({type(err).__name__}: "
                            f"{first_line(err)})") from None


def _map_classes(found: List[str], classes: Optional[Sequence[str]], where: str) -> Tuple[List[str], List[int]]:
    """The class names and, per found name, its index among ``classes`` (the training data's)."""
    if classes is None:
        return list(found), list(range(len(found)))
    classes = list(classes)
    extra = [c for c in found if c not in classes]
    if extra:
        shown = ", ".join(classes[:6]) + (", …" if len(classes) > 6 else "")
        raise LoadError(f"{where}: classes {extra[:5]} are not among the training data's classes ({shown}); "
                        "name the class folders like the training data's")
    return classes, [classes.index(c) for c in found]


class ImageFolder(_Images):
    """Images in one sub-folder per class (``root/<class>/**/<image>``), classes in sorted order
    or mapped onto ``classes`` (the training data's); hidden and non-image files are skipped and
    an empty class folder kept, with one note saying so."""

    def __init__(self, root: str, preprocess: Optional[Preprocess] = None, *,
                 classes: Optional[Sequence[str]] = None):
        self.root = root
        self.preprocess = preprocess or Preprocess()
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as err:
            raise LoadError(f"{root}: cannot list it ({first_line(err)})") from None
        found = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        loose = sum(1 for e in entries if not e.is_dir())
        if not found:
            raise LoadError(f"{root}: no class sub-folders (expected {os.path.join(root, '<class>', '<image>')})")
        self.classes, index = _map_classes(found, classes, root)
        keys: List[bytes] = []
        labels: List[int] = []
        skipped, empty = 0, []
        for name, label in zip(found, index):
            before = len(keys)
            top = os.path.join(root, name)
            walk = []
            for folder, dirs, names in os.walk(top, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden folders: not walked
                walk.append((folder, names))
            for folder, names in sorted(walk):  # torchvision's ImageFolder order
                rel = os.path.relpath(folder, root)
                for f in sorted(names):
                    if f.startswith(".") or not f.lower().endswith(IMAGE_SUFFIXES):
                        skipped += 1
                        continue
                    keys.append(os.fsencode(os.path.join(rel, f)))
                    labels.append(label)
            if len(keys) == before:
                empty.append(name)
        if not keys:
            raise LoadError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        self.files = PathList(keys, prefix=os.path.join(root, ""))
        self.targets = torch.tensor(labels, dtype=torch.int64)
        parts = []
        if skipped:
            parts.append(f"skipped {skipped} non-image or hidden file{'s' * (skipped != 1)}")
        if loose:
            parts.append(f"skipped {loose} file{'s' * (loose != 1)} outside the class folders")
        if empty:
            shown = ", ".join(repr(e) for e in empty[:5]) + (", …" if len(empty) > 5 else "")
            parts.append(f"class folder{'s' * (len(empty) != 1)} {shown} {'is' if len(empty) == 1 else 'are'} empty")
        self.notes = ["; ".join(parts)] if parts else []


class TensorFile(Dataset):
    """``(inputs, targets)`` tensors from a ``torch.save`` file, memory-mapped (pages are read as
    samples are taken; an old-format file that cannot be mapped is read whole, with a note)."""

    def __init__(self, path: str, *, classes: Optional[Sequence[str]] = None):
        self.path = path
        self.notes: List[str] = []
        self.mapped = True
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
                self.mapped = False
                self.notes.append(f"{path} is in torch's old file format and was read whole; re-save it "
                                  "with torch.save to have it memory-mapped")
        except Exception as err:
            raise LoadError(f"{path}: unreadable ({torch_load_problem(err)}); expected a "
                            "torch.save'd (inputs, targets) pair or dict") from None
        x, y = self._pair(obj)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise LoadError(f"{path}: expected (inputs, targets) tensors or a dict with 'inputs' and 'targets'")
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or x.dim() == 0 \
                or x.shape[0] != y.shape[0]:
            raise LoadError(f"{path}: targets must be N integer class indices for N inputs, got inputs "
                            f"{tuple(x.shape)} and targets {tuple(y.shape)} {y.dtype}")
        if x.shape[0] == 0:
            raise LoadError(f"{path}: holds no samples")
        self.inputs = x
        self.targets = y.to(torch.int64)
        low, high = int(self.targets.min()), int(self.targets.max())
        if low < 0:
            raise LoadError(f"{path}: holds the negative label {low}; labels are class indices 0, 1, …")
        if classes is not None:
            if high >= len(classes):
                raise LoadError(f"{path}: holds the label {high} but the training data has {len(classes)} classes")
            self.classes = list(classes)
        else:
            self.classes = [str(i) for i in range(high + 1)]

    @staticmethod
    def _pair(obj):
        if isinstance(obj, dict):
            return (next((obj[k] for k in ("inputs", "x", "images") if k in obj), None),
                    next((obj[k] for k in ("targets", "labels", "y") if k in obj), None))
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            return tuple(obj)
        return None, None

    def __getstate__(self):
        """A mapped file travels to worker processes as its path (spawned workers map it again),
        not as its contents."""
        state = dict(self.__dict__)
        if self.mapped:
            state["inputs"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.inputs is None:
            self.inputs = self._pair(torch.load(self.path, map_location="cpu", weights_only=True, mmap=True))[0]

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i):
        return self.inputs[i], int(self.targets[i])


# ---- Clothing1M ---------------------------------------------------------------------------------

CLOTHING1M_SPLITS = {  # split: (key list, label file)
    "noisy_train": ("noisy_train_key_list.txt", "noisy_label_kv.txt"),
    "clean_train": ("clean_train_key_list.txt", "clean_label_kv.txt"),
    "clean_val": ("clean_val_key_list.txt", "clean_label_kv.txt"),
    "clean_test": ("clean_test_key_list.txt", "clean_label_kv.txt"),
}
CATEGORY_FILE = "category_names_eng.txt"


def _open(path: str, what: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file ({what})") from None
    except OSError as err:
        raise LoadError(f"{path}: unreadable ({first_line(err)})") from None


def _read_bytes(path: str, what: str) -> bytes:
    with _open(path, what) as f:
        return f.read()


def _read_names(path: str) -> List[str]:
    data = _read_bytes(path, "Clothing1M's class names, one a line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LoadError(f"{path}: not UTF-8 text ({first_line(err)})") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    for n, name in enumerate(names, 1):
        if not name:
            raise LoadError(f"{path} line {n}: empty; one class name a line")
    if not names:
        raise LoadError(f"{path}: holds no class names")
    return names


def _read_labels(path: str, num_classes: int) -> dict:
    """``key → label`` from a ``key label`` file; any bad line is an error naming it."""
    table: dict = {}
    with _open(path, "Clothing1M's labels, 'images/… LABEL' a line") as f:
        for n, line in enumerate(f, 1):  # line by line: no list of a million lines at once
            parts = line.split()
            if len(parts) != 2:
                if not parts:
                    continue
                raise LoadError(f"{path} line {n}: malformed {_show(line)}; expected 'images/….jpg LABEL'")
            key, label = parts
            try:
                value = int(label)
            except ValueError:
                raise LoadError(f"{path} line {n}: the label {_show(label)} is not a number") from None
            if not 0 <= value < num_classes:
                raise LoadError(f"{path} line {n}: the label {value} is outside 0..{num_classes - 1} "
                                f"({num_classes} classes in {CATEGORY_FILE})")
            if table.setdefault(key, value) != value:
                raise LoadError(f"{path} line {n}: {_show(key)} is labelled {value} here and "
                                f"{table[key]} on an earlier line")
    return table


def _show(raw: bytes, limit: int = 60) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _leaves_root(key: bytes) -> bool:
    """Whether a key list's ``key`` names a path outside its root: absolute, or led out by
    ``..`` (resolved lexically; a symbolic link inside the root, e.g. ``images/`` on another disk,
    is the user's own choice and is followed)."""
    path = os.fsdecode(key)
    if os.path.isabs(path):
        return True
    norm = os.path.normpath(path)
    return norm == os.pardir or norm.startswith(os.pardir + os.sep)


def _first_line_of(path: str, key: bytes, before: int) -> Optional[int]:
    """The first line before line ``before`` of a key list that names ``key`` (read again: only
    an error asks)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if n >= before:
                return None
            if line.split() == [key]:
                return n
    return None


class Clothing1M(_Images):
    """Clothing1M in the layout it is distributed in, one split of it.

    ``root`` holds ``noisy_label_kv.txt`` and ``clean_label_kv.txt`` (``images/a/bc/name.jpg LABEL``
    a line), the key lists ``noisy_train_key_list.txt``, ``clean_train_key_list.txt``,
    ``clean_val_key_list.txt`` and ``clean_test_key_list.txt`` (``images/a/bc/name.jpg`` a line),
    ``category_names_eng.txt`` (the 14 class names) and the images under ``images/``.
    ``split``: ``noisy_train`` (labels from the noisy file) or ``clean_train``/``clean_val``/
    ``clean_test`` (labels from the clean file).

    Reading checks every line: a malformed line, a label outside the classes, a listed key
    without a label, a key listed twice, a key that leads outside ``root`` (absolute, or out by
    ``..``), and (``check_files``) a listed image that is not there, each an error naming the
    file and line. The existence check lists each image folder once instead of asking for
    each file. ``classes``: the training data's class names, which the labels are mapped onto.
    """

    def __init__(self, root: str, split: str = "noisy_train", preprocess: Optional[Preprocess] = None, *,
                 classes: Optional[Sequence[str]] = None, check_files: bool = True):
        if split not in CLOTHING1M_SPLITS:
            raise LoadError(f"clothing1m:{root}:{split}: unknown split; use one of {', '.join(CLOTHING1M_SPLITS)}")
        if not os.path.isdir(root):
            raise LoadError(f"clothing1m:{root}: no such folder")
        self.root, self.split = root, split
        self.preprocess = preprocess or Preprocess()
        self.notes = []
        list_name, label_name = CLOTHING1M_SPLITS[split]
        names = _read_names(os.path.join(root, CATEGORY_FILE))
        self.list_file = os.path.join(root, list_name)
        self.label_file = os.path.join(root, label_name)
        table = _read_labels(self.label_file, len(names))
        blob, ends, labels = bytearray(), array("q"), array("b")  # no Python object per key
        with _open(self.list_file, f"the {split} split's images, one a line") as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if len(parts) != 1:
                    if not parts:
                        continue
                    raise LoadError(f"{self.list_file} line {n}: malformed {_show(line)}; expected one "
                                    "'images/….jpg' a line")
                key = parts[0]
                if (key.startswith(b"/") or b".." in key) and _leaves_root(key):
                    raise LoadError(f"{self.list_file} line {n}: the key {_show(key, 500)} leads outside {root}; "
                                    "keys are paths inside the root, such as images/0/00/name.jpg")
                label = table.pop(key, None)  # taken: a key listed twice finds no label the second time
                if label is None:
                    first = _first_line_of(self.list_file, key, n)
                    if first is not None:
                        raise LoadError(f"{self.list_file} line {n}: {_show(key)} is listed again (first "
                                        f"on line {first}); list each image once")
                    raise LoadError(f"{self.list_file} line {n}: {_show(key)} has no label in "
                                    f"{self.label_file}")
                blob += key
                ends.append(len(blob))
                labels.append(label)
        del table
        if not ends:
            raise LoadError(f"{self.list_file}: lists no images")
        self.classes, index = _map_classes(names, classes, os.path.join(root, CATEGORY_FILE))
        targets = np.frombuffer(labels, dtype=np.int8).astype(np.int64)
        if index != list(range(len(names))):
            targets = np.asarray(index, dtype=np.int64)[targets]
        self.targets = torch.from_numpy(targets)
        self.files = PathList.from_buffers(blob, np.frombuffer(ends, dtype=np.int64), os.path.join(root, ""))
        del blob, ends
        if check_files:
            self._check_files()

    def where(self, i: int) -> str:
        return f"{self.list_file} line {self.line_of(i)}: {self.files[i]}"

    def line_of(self, i: int) -> int:
        """The line of the key list that names sample ``i`` (counted again from the file: only
        errors ask, so no line numbers are held)."""
        with open(self.list_file, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    if i == 0:
                        return n
                    i -= 1
        return -1

    def _check_files(self) -> None:
        """The first listed image that is not there, from one listing per image folder."""
        root = os.fsencode(os.path.join(self.root, ""))
        listings: dict = {}
        blob, offsets = self.files._blob, self.files._offsets.tolist()
        for i in range(len(offsets) - 1):
            folder, _, name = blob[offsets[i]:offsets[i + 1]].rpartition(b"/")
            present = listings.get(folder)
            if present is None:
                try:
                    present = listings[folder] = frozenset(os.listdir(root + folder))
                except OSError:
                    present = listings[folder] = frozenset()
            if name not in present:
                raise LoadError(f"{self.where(i)}: no such file (the list names an image that is not there)")


# ---- opening, batching, checking ----------------------------------------------------------------

def _clothing1m_spec(rest: str) -> Tuple[str, str]:
    head, sep, tail = rest.rpartition(":")
    if sep and tail in CLOTHING1M_SPLITS:
        return head, tail
    if sep and not os.path.isdir(rest) and os.path.isdir(head):
        raise LoadError(f"clothing1m:{rest}: unknown split {tail!r}; use one of {', '.join(CLOTHING1M_SPLITS)}")
    return rest, "noisy_train"


def data_path(spec: str) -> str:
    """The file or folder a data ``spec`` reads (a Clothing1M root for ``clothing1m:ROOT[:SPLIT]``)."""
    if spec.startswith("clothing1m:"):
        rest = spec[len("clothing1m:"):]
        head, sep, tail = rest.rpartition(":")
        return head if sep and tail in CLOTHING1M_SPLITS else rest
    return spec


def open_data(spec: str, preprocess: Optional[Preprocess] = None, *, classes: Optional[Sequence[str]] = None,
              what: str = "--data", check_files: bool = True) -> Dataset:
    """The dataset ``spec`` names: an image folder in class sub-folders, a ``.pt`` file, or
    ``clothing1m:ROOT[:SPLIT]`` (default split ``noisy_train``). ``classes``: the training data's
    class names, which this data's classes are mapped onto. ``what``: the option, for errors.
    Reads labels and lists files only; no image is decoded."""
    preprocess = preprocess or Preprocess()
    try:
        if spec.startswith("clothing1m:"):
            root, split = _clothing1m_spec(spec[len("clothing1m:"):])
            return Clothing1M(root, split, preprocess, classes=classes, check_files=check_files)
        if os.path.isdir(spec):
            return ImageFolder(spec, preprocess, classes=classes)
        if os.path.isfile(spec):
            if preprocess.changes_pixels:
                raise LoadError(f"{spec}: holds tensors, which --preset/--image-size/--mean/--std do not "
                                "change; prepare them before saving, or leave those options out")
            return TensorFile(spec, classes=classes)
    except LoadError as err:
        raise LoadError(f"{what} {err}") from None
    raise LoadError(f"{what} {spec}: no such file or folder (give a folder of class sub-folders, a .pt "
                    "file, or clothing1m:ROOT[:SPLIT])")


def collate(batch):
    """Stack samples into ``[inputs, targets]``; images of different sizes are a one-line error."""
    shapes = {tuple(x.shape) for x, _ in batch}
    if len(shapes) > 1:
        shown = " and ".join("x".join(map(str, s)) for s in sorted(shapes)[:2])
        raise LoadError(f"images in one batch differ in size ({shown}); pass --image-size H W or --preset "
                        "imagenet to bring them to one size")
    return default_collate(batch)


_REWRAPPED = re.compile(r"Caught (\w+) in (DataLoader worker process \d+|pin memory thread[^.]*)\.")


def _original_message(err: BaseException) -> Optional[str]:
    """The message of an exception a DataLoader worker raised, from the traceback text that
    PyTorch re-raises in its place (whose first line names only the worker)."""
    text = str(err)
    found = _REWRAPPED.match(text)
    if not found:
        return None
    name = found.group(1)
    for line in reversed(text.splitlines()):
        head, sep, rest = line.partition(": ")
        if sep and (head == name or head.endswith("." + name)):
            return rest.strip()
    return None


class StreamLoader(DataLoader):
    """A DataLoader whose errors from worker processes read as the worker's own one-line error
    (PyTorch's re-raised error starts with "Caught … in DataLoader worker process N")."""

    def __iter__(self):
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:
                message = _original_message(err)
                if message is None:
                    raise
                try:
                    again = type(err)(message)
                except Exception:
                    raise err from None
                raise again from err
            yield batch


def loader(dataset: Dataset, *, batch_size: int, workers: int = 0, device="cpu",
           prefetch_factor: int = 4) -> DataLoader:
    """An unshuffled loader of ``[inputs, targets]`` batches: ``workers`` processes decode images
    (0: in this process), each ``prefetch_factor`` batches ahead and kept alive between passes;
    batches go to pinned memory when ``device`` is CUDA."""
    if int(batch_size) < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if int(workers) < 0:
        raise ValueError(f"--workers must be 0 or more, got {workers}")
    extra = dict(prefetch_factor=prefetch_factor, persistent_workers=True) if workers > 0 else {}
    return StreamLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(workers),
                        collate_fn=collate, pin_memory=torch.device(device).type == "cuda", **extra)


def check_first(dataset: Dataset, what: str = "--data") -> Tuple[torch.Tensor, int]:
    """Decode the first sample, so a file or option that does not work fails before any pass
    starts, naming the file, rather than in the middle of a long pass. Returns ``(input, label)``."""
    if len(dataset) == 0:
        raise LoadError(f"{what}: holds no samples")
    try:
        return dataset[0]
    except LoadError as err:
        raise LoadError(f"{what} {err}") from None

