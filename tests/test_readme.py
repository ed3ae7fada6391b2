"""The README's quick start runs as written (on a small model), so the docs cannot drift from the API."""
import os
import re

import pytest
import torch
from torch import nn

from support import REPO_ROOT

README = os.path.join(REPO_ROOT, "README.md")


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    x = torch.randn(1200, 1, 6, 6)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.chdir(tmp_path)  # the quick start writes stats.pt
    scope = {"model": model, "train_data": (x[:1100], y[:1100]), "val_data": (x[1100:], y[1100:])}
    exec(compile(code, "README quick start", "exec"), scope)
    assert isinstance(scope["fixed"], nn.Module) and scope["trusted"][0].shape[0] == 1000
    assert (tmp_path / "stats.pt").exists()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.slow
def test_readme_command_line_runs(tmp_path):
    """The command-line section, as written, on a tiny model and image folders."""
    import subprocess
    import sys

    from PIL import Image
    from safetensors.torch import save_file

    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Correct your own model from the command line"):]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    (tmp_path / "mymodel.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, 2))\n")
    torch.manual_seed(0)
    save_file(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 2)).state_dict(), str(tmp_path / "weights.safetensors"))
    for split, count in (("train", 12), ("val", 4)):
        for c, name in enumerate(("ant", "bee")):
            os.makedirs(tmp_path / split / name)
            for i in range(count):
                pixels = (torch.rand(40, 40, 3) * 100 + 100 * c).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    script = script.replace("sap-fast ", f"{sys.executable} -m sap_fast ")
    # mymodel.py, then this checkout's sap_fast (so the test passes whether or not the package is
    # installed), then whatever PYTHONPATH the suite runs under
    path = [str(tmp_path), REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for path in ("fixed/corrected.safetensors", "fixed/report.json", "fixed/report.png", "fixed/stats.pt",
                 "fixed2/corrected.safetensors"):
        assert (tmp_path / path).is_file(), path


def test_readme_baselines_snippet_runs():
    """The "Compare with other correctors" snippet, as written, on a tiny memorising model."""
    from baseline_support import noisy_blobs

    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Compare with other correctors"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model, retain, forget, test = noisy_blobs()
    x = torch.cat([retain[0], forget[0]] * 4)  # 1600 samples, enough for n=1000 and n=200
    y = torch.cat([retain[1], forget[1]] * 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scope = {"model": model, "train_data": (x, y)}
    exec(compile(code, "README baselines", "exec"), scope)
    assert isinstance(scope["fixed"], nn.Module) and scope["fixed"] is not model
    assert len(scope["suspects"]) == 200 and len(scope["trusted"]) == 1000
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_readme_clothing1m_command_parses():
    """The Clothing1M command needs torchvision and a GPU, so here its flags are only parsed by
    the command's own parser: every flag it shows exists and takes what it is given."""
    import shlex

    from sap_fast.cli import build_parser

    text = open(README, encoding="utf-8").read()
    section = text[text.index("**Clothing1M**"):]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    argv = shlex.split(script)
    assert argv[:2] == ["sap-fast", "correct"]
    args = build_parser().parse_args(argv[1:])
    assert args.model == "torchvision:resnet50" and args.data.startswith("clothing1m:")
    assert args.val.endswith(":clean_val") and args.preset == "imagenet" and args.amp == "bf16"
