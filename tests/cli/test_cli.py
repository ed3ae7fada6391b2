"""The ``sap-fast`` command end to end on tiny real files: a folder of PNGs, a safetensors
checkpoint, .pt tensors, whole-module and TorchScript files; and its one-line errors.

Three tests start ``python -m sap_fast`` in a fresh process, as a user would (a full correction,
an error's exit status reaching the shell, and the benchmark command); the others call the same
``main`` in this process, which reads the same arguments and runs the same code without another
interpreter start."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("safetensors")
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sap_fast.cli import main  # noqa: E402
from support import benchmark_module, model_factory, run_command  # noqa: E402

CLASSES = ("cat", "dog", "fox")
FACTORY = model_factory("def make_two():\n    return make(2)\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """images/<class>/*.png (10 per class, 8×8 RGB, class-coloured), tinynet.py, weights."""
    root = tmp_path_factory.mktemp("cli")
    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / "images" / name)
        for i in range(10):
            pixels = torch.rand(8, 8, 3, generator=gen) * 120
            pixels[..., c] += 120
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / "images" / name / f"{i}.png")
    (root / "tinynet.py").write_text(FACTORY)
    sys.path.insert(0, str(root))
    import tinynet
    save_file(tinynet.make().state_dict(), str(root / "weights.safetensors"))
    sys.path.remove(str(root))
    return root


def sap_fast(*args, cwd):
    """Run ``python -m sap_fast ...`` in a fresh process, as a user would."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "sap_fast", *args, "--quiet"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def here(workspace, capsys, monkeypatch, keep_threads):
    """``here(*args)``: ``sap-fast *args --quiet`` in this process, from the workspace folder;
    returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(workspace)
    monkeypatch.syspath_prepend(str(workspace))

    def run(*args):
        code = main([*args, "--quiet"])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.mark.slow  # a fresh process, as a user starts it
def test_correct_from_an_image_folder_and_a_safetensors_checkpoint(workspace):
    out = workspace / "out-sweep"
    run = sap_fast("correct", "--model", "tinynet:make", "--weights", "weights.safetensors",
                   "--data", "images", "--val-fraction", "0.2", "--trusted", "12", "--alphas", "10,1e3",
                   "--out", str(out), cwd=workspace)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert [row["alpha"] for row in report["sweep"]["rows"]] == [None, 10.0, 1000.0]
    assert report["extra"]["classes"] == list(CLASSES) and report["alpha"] == report["sweep"]["best_alpha"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    corrected = load_file(str(out / "corrected.safetensors"))
    assert set(corrected) == set(load_file(str(workspace / "weights.safetensors")))
    assert "validation accuracy" in run.stdout


def test_saved_statistics_make_a_second_run_need_no_training_data(workspace, here):
    first, second = workspace / "out-a", workspace / "out-b"
    code, _, err = here("correct", "--model", "tinynet:make", "--weights", "weights.safetensors",
                        "--data", "images", "--trusted", "15", "--alpha", "30", "--stats-out",
                        str(workspace / "stats.pt"), "--out", str(first))
    assert code == 0, err
    # no --data at all: the statistics are reused, only the validation split is read
    code, _, err = here("correct", "--model", "tinynet:make", "--weights", "weights.safetensors",
                        "--stats-in", str(workspace / "stats.pt"), "--val", "images", "--alpha", "30",
                        "--out", str(second))
    assert code == 0, err
    a, b = load_file(str(first / "corrected.safetensors")), load_file(str(second / "corrected.safetensors"))
    original = load_file(str(workspace / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], original["0.weight"])   # α = 30 did change the conv
    assert torch.equal(a["0.bias"], original["0.bias"])           # biases are never changed
    # the eigen route gives the same weights to round-off (a fixed --alpha defaults to cholesky)
    code, _, err = here("correct", "--model", "tinynet:make", "--weights", "weights.safetensors",
                        "--stats-in", str(workspace / "stats.pt"), "--val", "images", "--alpha", "30",
                        "--solver", "eigh", "--out", str(workspace / "out-c"))
    assert code == 0, err
    c = load_file(str(workspace / "out-c" / "corrected.safetensors"))
    assert all(torch.allclose(a[k], c[k], rtol=1e-5, atol=1e-7) for k in a)


def test_a_fixed_alpha_on_the_cholesky_route_runs_no_eigendecomposition(workspace, here, monkeypatch):
    """The solve route exists to avoid the eigendecomposition; the report does not bring it back
    unless the spectra are asked for (--spectra), and then it runs once per layer."""
    from sap_fast import spectrum
    calls = []
    real = spectrum.layer_spectrum
    monkeypatch.setattr(spectrum, "layer_spectrum", lambda record: calls.append(1) or real(record))
    base = ["correct", "--model", "tinynet:make", "--weights", "weights.safetensors", "--data", "images",
            "--trusted", "15", "--alpha", "30"]
    code, out, err = here(*base, "--out", str(workspace / "out-solve"))
    assert code == 0, err
    assert calls == [] and "no report.png" in out
    assert json.loads((workspace / "out-solve" / "report.json").read_text())["layers"] is None
    code, out, err = here(*base, "--spectra", "--out", str(workspace / "out-solve-spectra"))
    assert code == 0, err
    assert len(calls) == 2 and (workspace / "out-solve-spectra" / "report.png").is_file()


def test_solver_auto_takes_one_route_per_fixed_alpha_run(workspace, here, monkeypatch):
    """--solver auto (the default): a fixed --alpha solves by Cholesky; with --spectra the
    eigendecomposition serves both the weights and the report, and no Cholesky runs."""
    from sap_fast import solve
    prepared = []
    real = solve.prepare
    monkeypatch.setattr(solve, "prepare", lambda *a: prepared.append(1) or real(*a))
    base = ["correct", "--model", "tinynet:make", "--weights", "weights.safetensors", "--data", "images",
            "--trusted", "15", "--alpha", "30"]
    code, out, err = here(*base, "--spectra", "--out", str(workspace / "out-auto-spectra"))
    assert code == 0, err
    assert prepared == [] and (workspace / "out-auto-spectra" / "report.png").is_file()
    code, out, err = here(*base, "--out", str(workspace / "out-auto"))
    assert code == 0, err
    assert len(prepared) == 2 and "no report.png" in out


def _tinynet(workspace):
    sys.path.insert(0, str(workspace))
    import tinynet
    sys.path.remove(str(workspace))
    return tinynet.make()


def test_correct_from_tensor_files_and_a_pickled_module(workspace, here):
    model = _tinynet(workspace)
    torch.save(model, workspace / "whole.pt")
    gen = torch.Generator().manual_seed(1)
    torch.save((torch.randn(40, 3, 8, 8, generator=gen), torch.randint(0, 3, (40,), generator=gen)),
               workspace / "data.pt")
    out = workspace / "out-pickled"
    code, _, err = here("correct", "--model", "whole.pt", "--data", "data.pt", "--trusted", "20", "--alpha", "100",
                        "--format", "pt", "--out", str(out))
    assert code == 0, err
    state = torch.load(out / "corrected.pt", weights_only=True)
    assert set(state) == set(model.state_dict())
    assert not torch.equal(state["4.weight"], model.state_dict()["4.weight"])


def test_torchscript_gives_its_weights_but_is_not_itself_corrected(workspace, here):
    model = _tinynet(workspace)
    with torch.no_grad():
        model[4].bias.add_(5)     # weights that differ from the factory's (biases are never corrected)
    torch.jit.trace(model, torch.randn(1, 3, 8, 8)).save(str(workspace / "scripted.pt"))
    code, _, err = here("correct", "--model", "scripted.pt", "--data", "images", "--val", "images")
    assert code == 2 and "TorchScript model cannot be corrected" in err
    out = workspace / "out-scripted"
    code, _, err = here("correct", "--model", "tinynet:make", "--weights", "scripted.pt", "--data", "images",
                        "--trusted", "15", "--alpha", "1e6", "--out", str(out))
    assert code == 0, err
    corrected = torch.load(out / "corrected.pt", weights_only=True)   # the format of --weights
    assert torch.equal(corrected["4.bias"], model.state_dict()["4.bias"])  # loaded from the script


VAL = ["--val", "images"]  # these runs fail before α is chosen, whatever the validation data


@pytest.mark.parametrize("args, message", [
    (["--model", "tinynet:make", "--random-init", "--data", "no/such/folder", *VAL], "no such file or folder"),
    (["--model", "tinynet:make", "--weights", "garbage.safetensors", "--data", "images", *VAL],
     "unreadable checkpoint"),
    (["--model", "tinynet:make_two", "--random-init", "--data", "images", *VAL],
     "the model has 2 outputs but --val has 3 classes"),
    (["--model", "tinynet:make", "--random-init", "--data", "images", "--channels", "1", *VAL],
     "the model does not accept its inputs"),
    (["--model", "tinynet:nope", "--random-init", "--data", "images", *VAL], "has no attribute 'nope'"),
    (["--model", "tinynet:make", "--random-init", "--data", "images", "--alphas", "lots", *VAL], "--alphas 'lots'"),
    (["--model", "tinynet:make"], "--data is needed"),
    (["--model", "tinynet:make", "--data", "images", *VAL], "no --weights: the model would be randomly initialised"),
    (["--model", "tinynet:make", "--random-init", "--data", "images"], "no validation data"),
])
def test_bad_inputs_give_one_line_and_status_2(workspace, args, message, capsys, monkeypatch):
    (workspace / "garbage.safetensors").write_bytes(b"not a checkpoint at all")
    monkeypatch.chdir(workspace)
    monkeypatch.syspath_prepend(str(workspace))
    code = main(["correct", *args, "--quiet", "--out", str(workspace / "out-bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err
    assert not (workspace / "out-bad").exists()  # a failed run leaves nothing behind


@pytest.mark.slow  # a fresh process, as a user starts it
def test_errors_reach_the_shell_as_an_exit_status(workspace):
    run = sap_fast("correct", "--model", "tinynet:make", "--data", "missing", cwd=workspace)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("sap-fast correct: error:") and run.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.xdist_group("digits-models")
def test_demo_command_writes_its_table_and_report(tmp_path, capsys, monkeypatch, model_cache, keep_threads):
    """The demo keeps its model in the default cache ($SAP_FAST_CACHE: this run's folder, shared
    with the compare command's test, which needs the same model); a second run trains nothing and
    shows the same numbers."""
    from sap_fast.experiments import digits

    args = ["demo", "--seeds", "0", "--epochs", "3", "--trusted", "60", "--no-retrain", "--out", str(tmp_path / "demo"),
            "--quiet"]
    before = set(os.listdir(model_cache))
    assert main([*args, "--alphas", "grid"]) == 0
    first = capsys.readouterr().out
    assert "| seed | fits noisy train | vanilla test | SAP test |" in first
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["extra"]["noise"] == "symmetric" and report["extra"]["per_seed"][0]["seed"] == 0
    assert report["layers"] and report["test_accuracy"]
    assert (tmp_path / "demo" / "report.png").stat().st_size > 1000
    cached = set(os.listdir(model_cache))
    assert any(name.startswith("digits-noisy-") for name in cached)
    assert not any(name.startswith("digits-retrain-") for name in cached - before)  # --no-retrain

    def no_training(*a, **k):
        raise AssertionError("the demo trained again instead of reading its cached model")
    monkeypatch.setattr(digits, "train", no_training)  # the trained model is cached ...
    code = main(args)
    again, err = capsys.readouterr()
    assert code == 0, err
    assert again.split("| 0 |")[1].split("|")[:4] == first.split("| 0 |")[1].split("|")[:4]  # ... and reloads


BENCH = [sys.executable, "-m", "sap_fast", "bench", "--tiny", "--out-dir", "{out}", "--quiet"]


@pytest.mark.slow
def test_bench_command_runs_the_suite_that_fits(tmp_path):
    """Ten fresh processes, one per kernel and dtype."""
    run = run_command(BENCH, tmp_path)
    assert run.returncode == 0, run.stderr
    records = benchmark_module("common").read_results(os.path.join(run.out, "cpu-native.jsonl"))
    rows = [r for r in records if "layer" in r["parameters"]]
    assert {r["parameters"]["layer"] for r in rows} == {"tiny.conv3x3", "tiny.conv3x3s2"}
    assert {r["parameters"]["layer"] for r in rows if r["metric"].startswith("portable")} == {"tiny.conv3x3",
                                                                                             "tiny.conv3x3s2"}
    assert all("error" not in r["parameters"] for r in rows if r["metric"].startswith("portable"))


@pytest.mark.slow  # a fresh process, as a user starts it
def test_bench_from_an_installed_package_says_it_needs_the_source_tree(tmp_path):
    """An installed package has no benchmarks/ beside it: one line and exit status 2."""
    import shutil

    import sap_fast as package
    shutil.copytree(os.path.dirname(package.__file__), tmp_path / "site" / "sap_fast",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    run = subprocess.run([sys.executable, "-m", "sap_fast", "bench", "--tiny"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "an installed package does not carry" in run.stderr and "clone of the repository" in run.stderr
