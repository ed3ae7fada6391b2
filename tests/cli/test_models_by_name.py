"""Models by name for ``sap-fast correct --model``: ``torchvision:NAME``, ``timm:NAME`` (their
spec parsing and error paths everywhere, the real models where the libraries import) and
``hf:DIR`` (a tiny transformers ViT saved with save_pretrained, for real), plus the corrected
weights written back in a form the original model loads."""
from __future__ import annotations

import copy
import os
import shutil
import sys

import pytest
import torch

from sap_fast.cli.load import LoadError, load_model, load_state_dict, model_kind, save_weights


def _imports(name: str) -> str | None:
    """None when ``name`` imports, else why not."""
    try:
        __import__(name)
    except Exception as err:
        return f"{name} does not import here ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


# ---- parsing and error paths (no library needed) -------------------------------------------------

def test_model_kinds(tmp_path):
    assert model_kind("torchvision:resnet50") == "torchvision"
    assert model_kind("timm:vit_base_patch16_224") == "timm"
    assert model_kind("hf:/models/vit") == "hf"
    assert model_kind("mymodel:make") == "factory"
    saved = tmp_path / "a:b.pt"
    saved.write_bytes(b"")
    assert model_kind(str(saved)) == "file" and model_kind("model.pt") == "file"


@pytest.mark.parametrize("spec", ["torchvision:resnet50", "timm:resnet50"])
def test_by_name_needs_num_classes(spec):
    with pytest.raises(LoadError, match=f"--model {spec} needs --num-classes"):
        load_model(spec)


def test_num_classes_is_refused_where_the_model_has_its_own(tmp_path):
    with pytest.raises(LoadError, match="--num-classes applies to torchvision:NAME, timm:NAME and hf:DIR"):
        load_model("torch.nn:Identity", num_classes=14)
    with pytest.raises(LoadError, match="--num-classes must be at least 1"):
        load_model("torchvision:resnet50", num_classes=0)


def test_a_library_that_does_not_import_is_a_one_line_error(monkeypatch):
    # as on a machine whose torchvision wheel was built for another torch
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(LoadError, match=r"^torchvision does not import in this environment \(ModuleNotFoundError: "
                                        r".*\): install a torchvision that matches your torch$"):
        load_model("torchvision:resnet50", num_classes=14)
    with pytest.raises(LoadError, match=r"^timm does not import in this environment \(.*\): install timm"):
        load_model("timm:resnet50", num_classes=14)


def test_a_library_missing_here_says_so():
    for name in ("torchvision", "timm"):
        why = _imports(name)
        if why is None:
            continue
        with pytest.raises(LoadError, match=f"^{name} does not import in this environment"):
            load_model(f"{name}:resnet18", num_classes=3)


def test_a_py_file_as_module_suggests_the_module_name():
    with pytest.raises(LoadError, match=r"--model mymodel.py:make: give the module's name without .py: "
                                        r"--model mymodel:make \(run from the folder that holds mymodel.py"):
        load_model("mymodel.py:make")
    with pytest.raises(LoadError, match="--model models.net:build"):
        load_model("models/net.py:build")


def test_save_weights_formats(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_weights(model, str(tmp_path / "w.safetensors"))
    save_weights(model, str(tmp_path / "w.pt"), "pt")
    for name in ("w.safetensors", "w.pt"):
        state = load_state_dict(str(tmp_path / name))
        assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], model.weight)
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="--format npz: use safetensors or pt"):
        save_weights(model, str(tmp_path / "w.npz"), "npz")


# ---- the real libraries, where they import ------------------------------------------------------

@pytest.mark.skipif(_imports("torchvision") is not None, reason=str(_imports("torchvision")))
def test_torchvision_model_by_name(tmp_path):
    model = load_model("torchvision:resnet18", num_classes=14).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 14)
    save_weights(model, str(tmp_path / "w.safetensors"))
    again = load_model("torchvision:resnet18", str(tmp_path / "w.safetensors"), num_classes=14).eval()
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(LoadError, match="does not fit the model .*is --num-classes the number it was trained with"):
        load_model("torchvision:resnet18", str(tmp_path / "w.safetensors"), num_classes=10)
    with pytest.raises(LoadError, match="torchvision has no model 'resnet5000'"):
        load_model("torchvision:resnet5000", num_classes=14)


@pytest.mark.skipif(_imports("timm") is not None, reason=str(_imports("timm")))
def test_timm_model_by_name(tmp_path):
    model = load_model("timm:resnet18", num_classes=14).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 14)
    save_weights(model, str(tmp_path / "w.pt"), "pt")
    again = load_model("timm:resnet18", str(tmp_path / "w.pt"), num_classes=14).eval()
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(LoadError, match="timm has no model 'resnet5000'"):
        load_model("timm:resnet5000", num_classes=14)


# ---- Hugging Face transformers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny randomly initialised ViT image classifier (2 layers, hidden 32, 32x32 images, 14
    labels), saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    num_labels=14)
    folder = str(tmp_path_factory.mktemp("hf") / "vit")
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    return folder


def _reference(folder):
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(folder, local_files_only=True).eval()


@pytest.mark.slow  # importing transformers takes seconds
def test_hf_model_returns_logits_and_keeps_its_names(hf_dir):
    model = load_model(f"hf:{hf_dir}")
    reference = _reference(hf_dir)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (3, 14)
        torch.testing.assert_close(out, reference(x).logits)
        torch.testing.assert_close(copy.deepcopy(model)(x), out)  # the hook travels with a copy
    assert type(model) is type(reference) and not model.training
    assert list(model.state_dict()) == list(reference.state_dict())
    assert load_model(f"hf:{hf_dir}", num_classes=14) is not None
    with pytest.raises(LoadError, match=r"has 14 labels \(num_labels in its config.json\), not --num-classes 10"):
        load_model(f"hf:{hf_dir}", num_classes=10)


@pytest.mark.slow  # importing transformers takes seconds
def test_hf_corrected_weights_load_back_into_the_hf_model(hf_dir, tmp_path):
    model = load_model(f"hf:{hf_dir}")
    with torch.no_grad():  # stands for the correction: every weight changes
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = str(tmp_path / "corrected.safetensors")
    save_weights(model, path, "safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expect = model(x)
        # 1. into the model from_pretrained gives
        from safetensors.torch import load_file

        fresh = _reference(hf_dir)
        fresh.load_state_dict(load_file(path))
        torch.testing.assert_close(fresh(x).logits, expect)
        # 2. a copy of the folder whose weights file is the corrected one
        copied = str(tmp_path / "vit-corrected")
        shutil.copytree(hf_dir, copied)
        shutil.copyfile(path, os.path.join(copied, "model.safetensors"))
        torch.testing.assert_close(_reference(copied)(x).logits, expect)
        # 3. back in through --weights
        torch.testing.assert_close(load_model(f"hf:{hf_dir}", path)(x), expect)


@pytest.mark.slow  # importing transformers takes seconds
def test_hf_weights_in_another_naming_say_where_a_folder_goes(hf_dir):
    from safetensors.torch import load_file

    disk = load_file(os.path.join(hf_dir, "model.safetensors"))
    if set(disk) == set(_reference(hf_dir).state_dict()):
        pytest.skip("this transformers keeps the saved names in memory: the file loads as it is")
    with pytest.raises(LoadError, match="keys do not match the model .*a save_pretrained folder goes in "
                                        "--model hf:FOLDER"):
        load_model(f"hf:{hf_dir}", os.path.join(hf_dir, "model.safetensors"))


@pytest.mark.slow  # importing transformers takes seconds
def test_sap_corrects_an_hf_model(hf_dir):
    import sap_fast

    model = load_model(f"hf:{hf_dir}")
    x = torch.randn(12, 3, 32, 32)
    stats = sap_fast.collect_stats(model, x, batch_size=6)
    assert "classifier" in stats
    fixed = copy.deepcopy(model)
    sap_fast.Projector(model, stats, solver="cholesky").apply(fixed, 100.0)
    with torch.no_grad():
        assert not torch.equal(fixed(x), model(x))
    assert list(fixed.state_dict()) == list(model.state_dict())


@pytest.mark.slow  # importing transformers takes seconds
def test_hf_base_model_without_its_head_is_refused(hf_dir, tmp_path):
    import transformers

    base = str(tmp_path / "base")
    reference = _reference(hf_dir)
    reference.vit.save_pretrained(base)  # the backbone alone: no classifier weights
    with pytest.raises(LoadError, match=r"has no trained weights for \['classifier.bias', 'classifier.weight'\]"):
        load_model(f"hf:{base}")
    # unless --weights brings them: the whole classifier's state dict
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    config.save_pretrained(base)  # the classifier's config, the backbone's weights
    save_weights(reference, str(tmp_path / "full.safetensors"))
    model = load_model(f"hf:{base}", str(tmp_path / "full.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits)


def test_hf_errors(tmp_path, monkeypatch):
    with pytest.raises(LoadError, match="--model hf:.*nowhere: no such folder"):
        load_model(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(LoadError, match="has no config.json"):
        load_model(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(LoadError, match=r"^transformers does not import in this environment .*pip install"):
        load_model(f"hf:{tmp_path}")
