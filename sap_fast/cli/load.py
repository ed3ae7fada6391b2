"""Loading a user's model and data for the command line (``sap-fast correct``).

Models (``--model``):

* ``module:factory``: the module is imported (the working folder is on the path, like
  ``python -m``), then ``factory`` is called with no arguments (or used as is, if a module);
* ``torchvision:NAME`` (e.g. ``torchvision:resnet50``): ``torchvision.models.get_model(NAME,
  weights=None, num_classes=N)``; ``timm:NAME`` (e.g. ``timm:vit_base_patch16_224``):
  ``timm.create_model(NAME, pretrained=False, num_classes=N)``. ``N`` is ``--num-classes``, which
  these need. Nothing is downloaded: the weights come from ``--weights`` only;
* ``hf:DIR``: a Hugging Face transformers image classifier saved with ``save_pretrained``
  (``AutoModelForImageClassification.from_pretrained(DIR, local_files_only=True)``), in float32.
  It stays the transformers model, with its own class and parameter names; a forward hook
  (:func:`hf_logits`) makes its output the logits tensor instead of the output object;
* a module saved whole with ``torch.save`` (a pickle: only files you trust). A TorchScript model
  cannot be corrected (no hooks on ScriptModules), but its weights can: ``--model
  module:factory --weights scripted.pt``.

Weights (``--weights``): a state dict in ``.pt``/``.pth`` (also under a ``"state_dict"`` or
``"model"`` key), ``.safetensors``, or a TorchScript file. :func:`save_weights` writes the
corrected model's ``state_dict()``, under the names the model (and ``--weights``) uses. For
``hf:DIR`` those are the transformers model's own names, as the installed transformers holds
them: ``model.load_state_dict(safetensors.torch.load_file(FILE))`` loads the file into the model
``from_pretrained(DIR)`` gives; and a copy of DIR whose weights (``model.safetensors``, or the
shards and their index) are replaced by the file, named ``model.safetensors``, loads with
``from_pretrained`` as the corrected model.

Data: :mod:`.data` (image folders, ``.pt`` files and Clothing1M, streamed one sample at a time).

Every failure is a :class:`LoadError` with one line that names the file and says what to do.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, Optional

import torch
from torch import nn

from .._runtime import io
from .._runtime.checks import first_line, torch_load_problem

__all__ = ["IMAGE_SUFFIXES", "LoadError", "BY_NAME", "model_kind", "model_path", "load_model",
           "hf_logits", "save_weights", "load_state_dict"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class LoadError(ValueError):
    """A model, checkpoint or data file that cannot be used, with what to do about it."""


BY_NAME = ("torchvision", "timm")  # built from a name and --num-classes


def model_kind(spec: str) -> str:
    """How ``--model spec`` is read: ``torchvision``, ``timm``, ``hf``, ``factory`` or ``file``."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in (*BY_NAME, "hf") and rest:
        return prefix
    if ":" in spec and not os.path.exists(spec):
        return "factory"
    return "file"


def model_path(spec: str) -> Optional[str]:
    """The file or folder ``--model spec`` reads, if any (a saved module's file, an ``hf:`` folder)."""
    kind = model_kind(spec)
    return spec if kind == "file" else spec.partition(":")[2] if kind == "hf" else None


def load_model(spec: str, weights: Optional[str] = None, *, num_classes: Optional[int] = None) -> nn.Module:
    """The model named by ``spec``, with ``weights`` (a state dict file) loaded into it if given.

    ``num_classes`` builds ``torchvision:``/``timm:`` models (which need it) and is checked
    against an ``hf:`` model's labels; other models have their own, so there it is an error.
    """
    kind = model_kind(spec)
    if num_classes is not None and kind in ("factory", "file"):
        raise LoadError(f"--num-classes applies to torchvision:NAME, timm:NAME and hf:DIR models; --model "
                        f"{spec} builds its own classifier, so leave --num-classes out")
    if num_classes is not None and num_classes < 1:
        raise LoadError(f"--num-classes must be at least 1, got {num_classes}")
    if kind in BY_NAME:
        model = _by_name(kind, spec.partition(":")[2], num_classes, spec)
    elif kind == "hf":
        model = _from_hf(spec.partition(":")[2], num_classes, spec, weights is not None)
    elif kind == "factory":
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
            hint = "; is --num-classes the number it was trained with?" if kind in BY_NAME else ""
            raise LoadError(f"{weights}: does not fit the model ({detail}){hint}") from None
        if missing or unexpected:
            hint = ("; for hf:DIR, --weights takes the model's own state_dict() (such as the corrected "
                    "file sap-fast writes), while a save_pretrained folder goes in --model hf:FOLDER"
                    if kind == "hf" else "; is it this model's checkpoint?")
            raise LoadError(f"{weights}: keys do not match the model (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]}){hint}")
    return model


def _import_failure(package: str, err: BaseException, fix: str) -> LoadError:
    return LoadError(f"{package} does not import in this environment ({type(err).__name__}: "
                     f"{first_line(err)}): {fix}")


def _by_name(library: str, name: str, num_classes: Optional[int], spec: str) -> nn.Module:
    """``torchvision:NAME`` or ``timm:NAME`` with ``num_classes`` outputs, randomly initialised."""
    if num_classes is None:
        raise LoadError(f"--model {spec} needs --num-classes (the number of classes it was trained on; "
                        "the library's default would be ImageNet's 1000)")
    if library == "torchvision":
        try:
            from torchvision import models
        except Exception as err:  # not installed, or built for another torch
            raise _import_failure("torchvision", err, "install a torchvision that matches your torch") from None
        try:
            build = models.get_model_builder(name)
        except Exception:
            near = [m for m in models.list_models() if name.lower() in m]
            raise LoadError(f"--model {spec}: torchvision has no model {name!r}; "
                            + (f"did you mean {', '.join(near[:5])}?" if near else
                               "torchvision.models.list_models() names them")) from None

        def make():
            return build(weights=None, num_classes=num_classes)
    else:
        try:
            import timm
        except Exception as err:
            raise _import_failure("timm", err, "install timm (pip install timm) and a torchvision that "
                                  "matches your torch") from None
        if not timm.is_model(name):
            near = timm.list_models(f"*{name}*")
            raise LoadError(f"--model {spec}: timm has no model {name!r}; "
                            + (f"did you mean {', '.join(near[:5])}?" if near else
                               "timm.list_models() names them"))

        def make():
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
    try:
        return make()
    except Exception as err:
        raise LoadError(f"--model {spec}: building it failed ({type(err).__name__}: {first_line(err)})") from None


def hf_logits(module: nn.Module, args, output):
    """Forward hook of an ``hf:`` model: the output's logits tensor (``output.logits``, or the
    first item of an output tuple, with ``return_dict=False``) takes the output's place."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


def _from_hf(folder: str, num_classes: Optional[int], spec: str, weights_given: bool) -> nn.Module:
    """A transformers image classifier from its ``save_pretrained`` folder, in float32, in eval
    mode, with the :func:`hf_logits` hook; nothing is downloaded. Parameters the folder lacks
    (a base model without its classification head) are an error unless ``--weights`` brings them."""
    if not os.path.isdir(folder):
        raise LoadError(f"--model {spec}: no such folder (hf:DIR takes a folder written by save_pretrained)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise LoadError(f"--model {spec}: {folder} has no config.json (hf:DIR takes a folder written by "
                        "save_pretrained)")
    try:
        from transformers import AutoModelForImageClassification
        from transformers.utils import logging as hf_logging
    except Exception as err:
        raise _import_failure("transformers", err, "install it (pip install transformers)") from None
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report: what it says is checked below
    try:
        model, info = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True,
                                                                      output_loading_info=True)
    except Exception as err:
        raise LoadError(f"--model {spec}: transformers cannot load it as an image classifier "
                        f"({type(err).__name__}: {first_line(err)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    fresh = sorted(info.get("missing_keys") or ()) + sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                                            for k in info.get("mismatched_keys") or ())
    if fresh and not weights_given:
        raise LoadError(f"--model {spec}: the folder has no trained weights for {fresh[:3]} (transformers would "
                        "initialise them at random): save_pretrained the trained classifier, or pass its "
                        "state dict as --weights")
    labels = getattr(model.config, "num_labels", None)
    if num_classes is not None and labels != num_classes:
        raise LoadError(f"--model {spec} has {labels} labels (num_labels in its config.json), not "
                        f"--num-classes {num_classes}; leave --num-classes out")
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # the statistics are accumulated in float32 (--amp covers the rest)
    model.register_forward_hook(hf_logits)
    return model.eval()


def save_weights(model: nn.Module, path: str, fmt: Optional[str] = None) -> None:
    """Write ``model.state_dict()`` (on the CPU, each tensor its own copy) to ``path``, atomically:
    ``fmt`` ``"safetensors"`` (with the ``format: pt`` metadata transformers looks for) or ``"pt"``
    (``torch.save``); by default, from the file's suffix."""
    fmt = fmt or ("safetensors" if str(path).endswith(".safetensors") else "pt")
    if fmt not in ("safetensors", "pt"):
        raise ValueError(f"--format {fmt}: use safetensors or pt")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        io.save_safetensors(path, state, metadata={"format": "pt"})
    else:
        io.save_torch(path, state)


def _from_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the working folder import
    if module_name.endswith(".py"):
        dotted = module_name[:-3].replace(os.sep, ".").replace("/", ".").strip(".")
        raise LoadError(f"--model {spec}: give the module's name without .py: --model {dotted}:{attr} "
                        f"(run from the folder that holds {os.path.basename(module_name)}, or put that "
                        "folder on PYTHONPATH)")
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
        raise LoadError(f"--model {path}: unreadable ({type(err).__name__}: {first_line(err)}); "
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
        raise LoadError(f"--weights {path}: unreadable checkpoint ({torch_load_problem(err)}); expected "
                        "a state dict saved with torch.save or safetensors") from None
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
