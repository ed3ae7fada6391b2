"""Loading a user's model and data for the command line (``sap-fast correct``).

Models: ``module:factory`` (imported, then called with no arguments) or a module saved whole
with ``torch.save``. A TorchScript model cannot be corrected (no hooks on ScriptModules), but its
weights can: ``--model module:factory --weights scripted.pt``. Weights: a state dict in
``.pt``/``.pth`` (also under a ``"state_dict"`` or ``"model"`` key), ``.safetensors``, or a
TorchScript file. Data: a folder of images in one
sub-folder per class (sorted names → class indices, like torchvision's ``ImageFolder``), or a
``.pt`` file holding ``(inputs, targets)`` or a dict with ``inputs``/``x`` and
``targets``/``labels``/``y``.

Every failure is a :class:`LoadError` with one line that names the file and says what to do.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._runtime.forward import progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class LoadError(ValueError):
    """A model, checkpoint or data file that cannot be used, with what to do about it."""


def load_model(spec: str, weights: Optional[str] = None) -> nn.Module:
    """The model named by ``spec``, with ``weights`` (a state dict file) loaded into it if given."""
    if ":" in spec and not os.path.exists(spec):
        model = _from_factory(spec)
    else:
        model = _from_file(spec)
    if weights is not None:
        state = load_state_dict(weights)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            first = str(err).strip().splitlines()
            detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
            raise LoadError(f"{weights}: does not fit the model ({detail})") from None
        if missing or unexpected:
            raise LoadError(f"{weights}: keys do not match the model (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]}); is it this model's checkpoint?")
    return model


def _from_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the working folder import
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise LoadError(f"--model {spec}: cannot import {module_name!r} ({type(err).__name__}: {err}); "
                        "is it on PYTHONPATH?") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise LoadError(f"--model {spec}: {module_name!r} has no attribute {attr!r}")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise LoadError(f"--model {spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _from_file(path: str) -> nn.Module:
    if not os.path.isfile(path):
        raise LoadError(f"--model {path}: no such file (use module:factory or a saved model file)")
    try:
        torch.jit.load(path, map_location="cpu")
    except Exception:
        pass  # not TorchScript: try a whole pickled module
    else:
        raise LoadError(f"--model {path}: a TorchScript model cannot be corrected (PyTorch allows no "
                        "hooks on ScriptModules, and SAP reads each layer's input through hooks); pass "
                        f"the eager model as --model module:factory and --weights {path}")
    try:
        # a whole module is a pickle: it can run code, so only load files you trust
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise LoadError(f"--model {path}: unreadable ({type(err).__name__}: {_first_line(err)}); "
                        "expected TorchScript or a module saved with torch.save(model)") from None
    if not isinstance(model, nn.Module):
        raise LoadError(f"--model {path}: holds a {type(model).__name__}, not a module; for a state "
                        "dict pass --model module:factory --weights " + path)
    return model


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``state_dict``/``model`` keys too)."""
    if not os.path.isfile(path):
        raise LoadError(f"--weights {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = _torch_state(path)
    except ImportError:
        raise LoadError(f"--weights {path}: reading .safetensors needs `pip install safetensors`") from None
    except Exception as err:
        raise LoadError(f"--weights {path}: unreadable checkpoint ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"--weights {path}: not a state dict of tensors")
    return state


def _torch_state(path: str):
    """A ``torch.save``d state dict, or a TorchScript model's weights."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        try:
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
        except Exception:
            raise err from None


def load_data(path: str, *, image_size: Optional[Sequence[int]] = None, channels: int = 3,
              mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
              classes: Optional[List[str]] = None) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """``(inputs, targets, class names)`` from an image folder or a ``.pt`` file.

    ``classes`` fixes the class order (so a validation folder maps names like the training one).
    """
    if os.path.isdir(path):
        return _image_folder(path, image_size, channels, mean, std, classes)
    if os.path.isfile(path):
        return _tensor_file(path)
    raise LoadError(f"{path}: no such file or folder")


def _tensor_file(path: str) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LoadError(f"{path}: unreadable ({type(err).__name__}: {_first_line(err)}); expected a "
                        "torch.save'd (inputs, targets) pair or dict") from None
    if isinstance(obj, dict):
        x = next((obj[k] for k in ("inputs", "x", "images") if k in obj), None)
        y = next((obj[k] for k in ("targets", "labels", "y") if k in obj), None)
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        x = y = None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise LoadError(f"{path}: expected (inputs, targets) tensors or a dict with 'inputs' and 'targets'")
    if y.dim() != 1 or y.dtype.is_floating_point or x.shape[0] != y.shape[0]:
        raise LoadError(f"{path}: targets must be N integer class indices for N inputs, got inputs "
                        f"{tuple(x.shape)} and targets {tuple(y.shape)} {y.dtype}")
    if x.shape[0] == 0:
        raise LoadError(f"{path}: holds no samples")
    y = y.long()
    names = [str(i) for i in range(int(y.max()) + 1)]
    return x, y, names


def _image_folder(path, image_size, channels, mean, std, classes):
    found = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not found:
        raise LoadError(f"{path}: no class sub-folders (expected {path}/<class>/<image>.png)")
    if classes is not None and set(found) - set(classes):
        raise LoadError(f"{path}: classes {sorted(set(found) - set(classes))} are not among the "
                        f"training classes {classes}")
    names = list(classes) if classes is not None else found
    files = [(os.path.join(path, c, f), names.index(c)) for c in found
             for f in sorted(os.listdir(os.path.join(path, c))) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise LoadError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    convert = _image_transform(image_size, channels, mean, std)
    images = []
    for file, _ in progress(files, desc="images", unit="img"):
        images.append(convert(file))
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise LoadError(f"{path}: images differ in size {sorted(shapes)[:3]}; pass --image-size H W")
    return torch.stack(images), torch.tensor([label for _, label in files]), names


def _image_transform(image_size, channels, mean, std):
    """file → float tensor (C, H, W) in [0, 1], resized and normalised; torchvision when it
    imports, otherwise the same steps with PIL and torch."""
    try:
        from PIL import Image
    except ImportError:
        raise LoadError("reading image folders needs Pillow: pip install pillow") from None
    if channels not in (1, 3):
        raise LoadError(f"--channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    size = None if image_size is None else (tuple(image_size) * 2 if len(image_size) == 1 else tuple(image_size))
    mean_t = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    try:
        from torchvision.transforms import functional as TF
    except Exception:  # not installed, or does not import with this torch
        TF = None

    def convert(file):
        try:
            with Image.open(file) as img:
                img = img.convert(mode)
                if size is not None and img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                if TF is not None:
                    t = TF.to_tensor(img)
                else:
                    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
                    t = t.view(img.size[1], img.size[0], channels).permute(2, 0, 1).float() / 255
        except OSError as err:
            raise LoadError(f"{file}: unreadable image ({_first_line(err)})") from None
        if mean_t is not None:
            t = (t - mean_t) / std_t
        return t

    return convert


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
