"""``sap-fast correct`` as it runs at Clothing1M scale, on a small tree in Clothing1M's own layout:
streamed data, the usual call, no silent no-ops, nothing left behind by a failed run, resumable
scoring, --candidates, --amp, --workers, --val-indices, and the report's test curve."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

import sap_fast  # noqa: E402
from sap_fast.cli import correct as correct_command  # noqa: E402
from sap_fast.cli import main  # noqa: E402
from sap_fast.cli.data import Preprocess, loader, open_data  # noqa: E402
from sap_fast.experiments.clothing1m import write_tree  # noqa: E402

pytestmark = pytest.mark.xdist_group("clothing1m-tree")  # one worker trains the tree's model, once

NET = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(12, 14))
'''
SIZE = 16
REAL_SAMPLE_SCORES = sap_fast.sample_scores


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A Clothing1M-shaped tree (240 noisy training images, 42 val, 42 test, 16×16), a model
    factory module ``c1mnet`` and its weights after a short training on the noisy labels."""
    root = tmp_path_factory.mktemp("c1m")
    write_tree(root / "data", noisy_train=240, clean_val=42, clean_test=42, image_size=SIZE, seed=3)
    (root / "c1mnet.py").write_text(NET)
    namespace = {}
    exec(NET, namespace)
    model = namespace["make"]()
    data = open_data(f"clothing1m:{root / 'data'}", Preprocess(size=(SIZE, SIZE)))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(5):
        for x, y in loader(data, batch_size=48):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_file(model.state_dict(), str(root / "w.safetensors"))
    return root


@pytest.fixture
def run(tree, capsys, monkeypatch, keep_threads):
    """``run(*args)``: ``sap-fast correct`` with the usual Clothing1M call plus ``args``, in this
    process, from the tree's folder; returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(tree)
    monkeypatch.syspath_prepend(str(tree))

    def call(*args, usual=True, quiet=True):
        base = ["correct", "--model", "c1mnet:make", "--image-size", str(SIZE), "--batch-size", "16"]
        if usual:
            base += ["--weights", "w.safetensors", "--data", "clothing1m:data",
                     "--val", "clothing1m:data:clean_val"]
        code = main([*base, *args] + (["--quiet"] if quiet else []))
        out, err = capsys.readouterr()
        return code, out, err
    return call


def _state(folder):
    return load_file(os.path.join(folder, "corrected.safetensors"))


def test_the_usual_clothing1m_call_writes_weights_trusted_set_and_a_report_with_the_test_curve(run, tree):
    out = tree / "out-usual"
    code, stdout, err = run("--test", "clothing1m:data:clean_test", "--trusted", "56", "--alphas", "1e2,1e3,1e4",
                            "--out", str(out), quiet=False)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["corrected.safetensors", "report.json", "report.png", "trusted.pt"]
    report = json.loads((out / "report.json").read_text())
    assert [row["alpha"] for row in report["test_accuracy"]] == [None, 100.0, 1000.0, 10000.0]
    assert all(0 <= row["accuracy"] <= 1 for row in report["test_accuracy"])
    extra = report["extra"]
    assert extra["test_before"] == report["test_accuracy"][0]["accuracy"]
    assert set(extra["seconds"]) >= {"scan", "scoring", "statistics", "decomposition", "validation", "test"}
    assert len(extra["seconds"]["validation"]) == 4 and extra["samples"]["scoring"] == 240
    assert extra["samples"]["test"] == 4 * 42 and extra["images_per_second"]["scoring"] > 0
    trusted = torch.load(out / "trusted.pt", weights_only=True)
    assert trusted["trusted"].numel() == 56 and trusted["scores"].numel() == 240
    assert "validation accuracy" in stdout and "test" in stdout
    # progress bars are on by default, with images/s, on every pass over data
    for stage in ("scoring", "statistics", "validation", "test α=100"):
        assert stage in err, stage
    assert "img/s" in err


def test_the_trusted_set_and_weights_equal_the_python_api(run, tree):
    """The command is the library's pipeline: same trusted samples, same corrected weights."""
    out = tree / "out-api"
    assert run("--trusted", "42", "--alpha", "300", "--out", str(out))[0] == 0
    namespace = {}
    exec(NET, namespace)
    model = namespace["make"]()
    model.load_state_dict(load_file(str(tree / "w.safetensors")))
    data = open_data(f"clothing1m:{tree / 'data'}", Preprocess(size=(SIZE, SIZE)))
    idx = sap_fast.select_trusted(model, loader(data, batch_size=16), n=42)
    assert torch.equal(torch.load(out / "trusted.pt", weights_only=True)["trusted"], idx)
    fixed = sap_fast.correct(model, loader(torch.utils.data.Subset(data, idx.tolist()), batch_size=16),
                             alpha=300.0)
    got = _state(out)
    for name, value in fixed.state_dict().items():
        assert torch.equal(got[name], value), name


def test_candidates_score_only_k_samples_as_the_api_does(run, tree):
    out = tree / "out-candidates"
    assert run("--trusted", "28", "--candidates", "120", "--seed", "5", "--alpha", "300", "--out", str(out))[0] == 0
    saved = torch.load(out / "trusted.pt", weights_only=True)
    assert saved["scores"].numel() == 120 and saved["positions"].numel() == 120
    namespace = {}
    exec(NET, namespace)
    model = namespace["make"]()
    model.load_state_dict(load_file(str(tree / "w.safetensors")))
    data = open_data(f"clothing1m:{tree / 'data'}", Preprocess(size=(SIZE, SIZE)))
    want = sap_fast.select_trusted(model, loader(data, batch_size=16), n=28, candidates=120, seed=5)
    assert torch.equal(saved["trusted"], want)


@pytest.mark.parametrize("args, message", [
    ([], "no validation data: α must be chosen on samples the model was not trained on"),
    (["--val", "clothing1m:data:clean_val", "--val-indices", "v.txt"], "--val and --val-indices both name"),
    (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
    (["--val", "clothing1m:data:clean_val", "--candidates", "10"], "--candidates 10 is less than --trusted 1000"),
])
def test_validation_is_data_the_model_was_not_trained_on(run, args, message):
    code, _, err = run("--weights", "w.safetensors", "--data", "clothing1m:data", *args, usual=False)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_no_weights_is_an_error_unless_random_init_is_asked_for(run, tree):
    code, _, err = run("--data", "clothing1m:data", "--val", "clothing1m:data:clean_val", usual=False)
    assert code == 2 and "no --weights: the model would be randomly initialised" in err
    out = tree / "out-random"
    code, _, err = run("--data", "clothing1m:data", "--val", "clothing1m:data:clean_val", "--random-init",
                       "--trusted", "28", "--alphas", "1e3", "--out", str(out), usual=False)
    assert code == 0, err


def test_held_out_positions_of_the_data_are_the_validation_split(run, tree):
    data = open_data(f"clothing1m:{tree / 'data'}", Preprocess(size=(SIZE, SIZE)))
    held = torch.arange(0, len(data), 5)  # every fifth training image was held out of training
    np.save(tree / "held.npy", held.numpy())
    out = tree / "out-held"
    code, _, err = run("--weights", "w.safetensors", "--data", "clothing1m:data", "--val-indices", "held.npy",
                       "--trusted", "28", "--alphas", "1e2,1e4", "--out", str(out), usual=False)
    assert code == 0, err
    saved = torch.load(out / "trusted.pt", weights_only=True)
    assert not set(saved["positions"].tolist()) & set(held.tolist())  # never trusted, never scored
    assert saved["positions"].numel() == len(data) - held.numel()
    report = json.loads((out / "report.json").read_text())
    assert report["extra"]["samples"]["validation"] == 3 * held.numel()  # three passes: none, 1e2, 1e4
    (tree / "bad.txt").write_text(f"0 {len(data) + 3}")
    code, _, err = run("--weights", "w.safetensors", "--data", "clothing1m:data", "--val-indices", "bad.txt",
                       usual=False)
    assert code == 2 and f"--val-indices bad.txt: positions must lie in [0, {len(data)})" in err


def test_held_out_positions_read_from_every_file_form(tmp_path):
    held = torch.tensor([7, 2, 40])
    np.save(tmp_path / "h.npy", held.numpy())
    torch.save(held, tmp_path / "h.pt")
    torch.save(held.tolist(), tmp_path / "run.corrupt_val_index")  # the official scripts' file: a list
    (tmp_path / "h.txt").write_text("7\n2, 40\n")
    for name in ("h.npy", "h.pt", "run.corrupt_val_index", "h.txt"):
        assert correct_command._read_indices(str(tmp_path / name), 50).tolist() == [2, 7, 40]
    (tmp_path / "float.npy").write_bytes(b"")
    np.save(tmp_path / "float.npy", np.array([1.5]))
    (tmp_path / "twice.txt").write_text("3 3")
    (tmp_path / "words.txt").write_text("three")
    for name, message in [("float.npy", "holds torch.float64 values"), ("twice.txt", "duplicate positions"),
                          ("words.txt", "unreadable"), ("nothing.txt", "no such file")]:
        with pytest.raises(ValueError, match=message):
            correct_command._read_indices(str(tmp_path / name), 50)


def test_an_explicit_val_fraction_warns_what_it_assumes(run, tree):
    code, _, err = run("--weights", "w.safetensors", "--data", "clothing1m:data", "--val-fraction", "0.2",
                       "--trusted", "28", "--alphas", "1e3", "--out", str(tree / "out-fraction"), usual=False)
    assert code == 0, err
    assert "assumes the model was NOT trained on them" in err


@pytest.mark.parametrize("case", ["bad-path", "unreadable-image", "wrong-channels", "bad-label"])
def test_a_failed_run_leaves_nothing_behind(run, tree, case, tmp_path):
    out = tmp_path / "out"
    if case == "bad-path":
        args = ["--data", "clothing1m:nowhere"]
    elif case == "wrong-channels":
        args = ["--channels", "1"]
    else:
        import shutil
        shutil.copytree(tree / "data", tmp_path / "copy")
        if case == "unreadable-image":
            first = (tmp_path / "copy" / "noisy_train_key_list.txt").read_text().split()[0]
            (tmp_path / "copy" / first).write_bytes(b"not a jpeg")
        else:
            kv = tmp_path / "copy" / "clean_label_kv.txt"
            lines = kv.read_text().splitlines()
            lines[2] = lines[2].rsplit(" ", 1)[0] + " 14"
            kv.write_text("\n".join(lines) + "\n")
        args = ["--data", f"clothing1m:{tmp_path / 'copy'}", "--val", f"clothing1m:{tmp_path / 'copy'}:clean_val"]
    code, _, err = run("--weights", "w.safetensors", "--val", "clothing1m:data:clean_val", *args,
                       "--out", str(out), usual=False)
    assert code == 2 and err.count("\n") == 1, err
    assert not out.exists() and os.listdir(tmp_path) in ([], ["copy"])


def test_outputs_appear_together_and_replace_a_previous_run(run, tree, monkeypatch):
    out = tree / "out-twice"
    assert run("--trusted", "28", "--alpha", "100", "--out", str(out))[0] == 0
    first = _state(out)
    real = correct_command.report.write_report

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(correct_command.report, "write_report", broken)
    code, _, err = run("--trusted", "28", "--alpha", "1e4", "--out", str(out), "--overwrite")
    assert code == 1 and "disk full" in err
    monkeypatch.setattr(correct_command.report, "write_report", real)
    fresh = tree / "out-new"
    monkeypatch.setattr(correct_command.report, "write_report", broken)
    assert run("--trusted", "28", "--alpha", "1e4", "--out", str(fresh))[0] == 1
    assert not fresh.exists() and not [p for p in os.listdir(tree) if p.startswith(".out-new")]
    # a fixed α on the Cholesky route: no sweep, no spectra, so no report.png
    assert sorted(os.listdir(out)) == ["corrected.safetensors", "report.json", "trusted.pt"]
    second = _state(out)  # the failed run's weights were staged, never put in place
    assert second.keys() == first.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


class Interrupt:
    """Stands in for Ctrl-C in the middle of scoring: lets ``after`` scoring chunks through."""

    def __init__(self, after):
        self.after, self.calls = after, 0
        self.real = REAL_SAMPLE_SCORES

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_an_interrupted_scoring_resumes_to_the_same_result_bit_for_bit(run, tree, monkeypatch):
    common = ["--trusted", "28", "--candidates", "150", "--alphas", "1e3", "--checkpoint-every", "32",
              "--stats-out"]
    whole = tree / "out-whole"
    assert run(*common, str(whole / "stats.pt"), "--out", str(whole))[0] == 0

    parts = tree / "out-parts"
    monkeypatch.setattr(sap_fast, "sample_scores", Interrupt(after=2))
    code, _, err = run(*common, str(parts / "stats.pt"), "--out", str(parts))
    assert code == 130 and "scores of 64 of 150 samples are saved" in err and "--resume" in err
    assert os.listdir(parts) == [correct_command.PARTIAL]
    monkeypatch.setattr(sap_fast, "sample_scores", Interrupt(after=100))
    code, _, err = run(*common, str(parts / "stats.pt"), "--out", str(parts))
    assert code == 2 and "holds an interrupted run's scores" in err  # nothing is silently redone
    monkeypatch.setattr(sap_fast, "sample_scores", Interrupt(after=1))  # and interrupted again
    assert run(*common, str(parts / "stats.pt"), "--out", str(parts), "--resume")[0] == 130
    monkeypatch.setattr(sap_fast, "sample_scores", Interrupt(after=100))
    code, _, err = run(*common, str(parts / "stats.pt"), "--out", str(parts), "--resume")
    assert code == 0, err
    assert sorted(os.listdir(parts)) == sorted(os.listdir(whole))  # the checkpoint is gone
    for name in ("trusted", "positions", "scores", "labels"):
        a, b = (torch.load(f / "trusted.pt", weights_only=True)[name] for f in (whole, parts))
        assert torch.equal(a, b), name
    a, b = _state(whole), _state(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "stats.pt").read_bytes() == (parts / "stats.pt").read_bytes()


def test_resume_refuses_a_checkpoint_made_with_other_options(run, tree, monkeypatch):
    out = tree / "out-other"
    monkeypatch.setattr(sap_fast, "sample_scores", Interrupt(after=1))
    assert run("--trusted", "28", "--alphas", "1e3", "--checkpoint-every", "32", "--out", str(out))[0] == 130
    monkeypatch.undo()
    monkeypatch.chdir(tree)
    monkeypatch.syspath_prepend(str(tree))
    code, _, err = run("--trusted", "28", "--alphas", "1e3", "--checkpoint-every", "32", "--seed", "1",
                       "--candidates", "200", "--out", str(out), "--resume")
    assert code == 2 and "--resume: the saved scoring was made with another" in err


def test_amp_ranks_and_evaluates_in_bf16_but_the_statistics_stay_full_precision(run, tree):
    """With every sample trusted, the trusted set cannot depend on the ranking: the statistics
    must then be the same bit for bit with and without --amp."""
    outs = {}
    for amp in (None, "bf16"):
        out = tree / f"out-amp-{amp}"
        args = ["--trusted", "240", "--alpha", "1e3", "--stats-out", str(out / "stats.pt"), "--out", str(out)]
        code, _, err = run(*args, *(["--amp", amp] if amp else []))
        assert code == 0, err
        outs[amp] = out
    a, b = (torch.load(outs[k] / "trusted.pt", weights_only=True)["scores"] for k in (None, "bf16"))
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=0.1, atol=0.05)  # bf16 ranked them
    assert (outs[None] / "stats.pt").read_bytes() == (outs["bf16"] / "stats.pt").read_bytes()


def test_worker_processes_give_the_same_result(run, tree):
    outs = []
    for workers in ("0", "2"):
        out = tree / f"out-workers-{workers}"
        code, _, err = run("--weights", "w.safetensors", "--data", "clothing1m:data", "--trusted", "28",
                           "--alpha", "300", "--workers", workers, "--out", str(out), usual=False)
        assert code == 0, err
        outs.append(out)
    a, b = _state(outs[0]), _state(outs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_sweep_from_decoded_splits_equals_the_sweep_that_decodes_every_pass(run, tree):
    """--eval-cache (memory, a mapped file, the default) against off: the same validation table,
    test curve, α and weights, bit for bit; no cache file is left beside --out."""
    reports, states = {}, {}
    before = sorted(os.listdir(tree))
    for mode in ("off", "memory", "disk", "auto"):
        out = tree / f"out-cache-{mode}"
        args = ["--test", "clothing1m:data:clean_test", "--trusted", "56", "--alphas", "1e2,1e3,1e4,1e5",
                "--out", str(out)] + ([] if mode == "auto" else ["--eval-cache", mode])
        code, _, err = run(*args)
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        reports[mode] = (report["sweep"], report["test_accuracy"], report["alpha"], report["extra"]["val_after"])
        states[mode] = _state(out)
        where = {"off": {}, "memory": "memory", "disk": "disk", "auto": "memory"}[mode]
        cached = report["extra"]["eval_cache"]
        if mode == "off":
            assert cached == {}
        else:
            assert cached == {s: {"where": where, "bytes": 42 * 3 * SIZE * SIZE} for s in ("--val", "--test")}
    assert sorted(os.listdir(tree)) == sorted(before + [f"out-cache-{m}" for m in reports])
    for mode in ("memory", "disk", "auto"):
        assert reports[mode] == reports["off"], mode
        assert all(torch.equal(states[mode][k], states["off"][k]) for k in states["off"]), mode


def test_eval_cache_options_are_checked_first(run, tree):
    code, _, err = run("--eval-cache-gib", "-1", "--out", str(tree / "out-bad-cache"))
    assert code == 2 and "--eval-cache-gib must be >= 0" in err and err.count("\n") == 1
    assert not (tree / "out-bad-cache").exists()


PEAK = r"""
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak RSS of a whole ``sap-fast correct`` run (a fresh process, as a user starts it) at 300
    and at 2400 images of 64×64: holding the images would add 100 MB; streaming adds almost
    nothing (the paths, one score per image)."""
    import subprocess
    import sys
    (tmp_path / "c1mnet.py").write_text(NET)
    namespace = {}
    exec(NET, namespace)
    save_file(namespace["make"]().state_dict(), str(tmp_path / "w.safetensors"))
    peaks = {}
    for n in (300, 2400):
        write_tree(tmp_path / f"d{n}", noisy_train=n, clean_val=60, clean_test=0, image_size=64, seed=1)
        command = [sys.executable, "-m", "sap_fast", "correct", "--model", "c1mnet:make", "--weights",
                   "w.safetensors", "--data", f"clothing1m:d{n}", "--val", f"clothing1m:d{n}:clean_val",
                   "--image-size", "64", "--trusted", "42", "--alpha", "1e3", "--out", f"out{n}", "--quiet"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, "-c", PEAK, *command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        peaks[n] = int(done.stdout.split()[-1]) / 1024  # kB → MB
    assert peaks[2400] - peaks[300] < 40, peaks
