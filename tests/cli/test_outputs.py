"""What ``sap-fast correct`` may write, and what it refuses: no output replaces or lands among
the inputs, an earlier result is replaced only with --overwrite (and then only its files), the
result appears as one step (SIGKILLs at every point of the final write), non-finite weights and
samples, Clothing1M keys outside the root, unreadable --stats-in/--resume files, a missing
device and options that cannot both apply are each one line and exit status 2, with every file
watched left byte for byte as it was."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("safetensors")
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import sap_fast  # noqa: E402
from sap_fast._runtime import io  # noqa: E402
from sap_fast.cli import main  # noqa: E402
from sap_fast.experiments.clothing1m import write_tree  # noqa: E402
from support import model_factory  # noqa: E402

FACTORY = model_factory("def make14():\n    return make(14)\n")
KILLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "final_write_kills.py")
RESULT = {"corrected.safetensors", "report.json", "trusted.pt"}
REAL_SAMPLE_SCORES = sap_fast.sample_scores


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """train.pt (60 samples, 3×8×8, 3 classes), val.pt (18), images/<class>/*.png (2 each),
    outnet.py and its weights w.safetensors."""
    root = tmp_path_factory.mktemp("outputs")
    (root / "outnet.py").write_text(FACTORY)
    namespace = {}
    exec(FACTORY, namespace)
    save_file(namespace["make"]().state_dict(), str(root / "w.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name, n in (("train", 60), ("val", 18)):
        torch.save((torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)),
                   root / f"{name}.pt")
    for c, name in enumerate(("cat", "dog", "fox")):
        os.makedirs(root / "images" / name)
        for i in range(2):
            pixels = (torch.rand(8, 8, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def earlier(space):
    """A finished sweep's result in ``earlier/`` (weights, trusted.pt, report.json, its plot
    report.png and stats.pt), for tests to copy as the result an earlier run left."""
    cwd, threads = os.getcwd(), torch.get_num_threads()
    sys.path.insert(0, str(space))
    os.chdir(space)
    try:
        code = main(["correct", "--model", "outnet:make", "--weights", "w.safetensors", "--data", "train.pt",
                     "--val", "val.pt", "--trusted", "9", "--alphas", "10,1e3", "--stats-out", "earlier/stats.pt",
                     "--out", "earlier", "--quiet"])
    finally:
        os.chdir(cwd)
        sys.path.remove(str(space))
        torch.set_num_threads(threads)
    assert code == 0
    assert sorted(os.listdir(space / "earlier")) == sorted(RESULT | {"report.png", "stats.pt"})
    return space / "earlier"


@pytest.fixture
def here(space, capsys, monkeypatch, keep_threads):
    """``here(*args)``: ``sap-fast correct --model outnet:make *args --quiet`` in this process,
    from the workspace; returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(space)
    monkeypatch.syspath_prepend(str(space))

    def run(*args, model="outnet:make"):
        code = main(["correct", "--model", model, *args, "--quiet"])
        out, err = capsys.readouterr()
        return code, out, err
    run.capsys = capsys
    return run


BASE = ["--weights", "w.safetensors", "--data", "train.pt", "--trusted", "12", "--alpha", "30"]


def files(*paths):
    """Every file under ``paths`` (files or folders) → its bytes; a folder's own listing too."""
    found = {}
    for path in map(str, paths):
        if os.path.isdir(path):
            found[path] = sorted(os.listdir(path))
            for root, dirs, names in os.walk(path):
                for name in names:
                    with open(os.path.join(root, name), "rb") as f:
                        found[os.path.join(root, name)] = f.read()
        elif os.path.exists(path):
            with open(path, "rb") as f:
                found[path] = f.read()
    return found


def refused(result, words):
    code, _, err = result
    assert code == 2 and words in err and err.count("\n") == 1, err


# ---- no output replaces or lands among the inputs ----------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--stats-out", "w.safetensors"], "--stats-out w.safetensors is --weights w.safetensors"),
    (["--stats-out", "train.pt"], "--stats-out train.pt is --data train.pt"),
    (["--val", "val.pt", "--stats-out", "val.pt"], "--stats-out val.pt is --val val.pt"),
    (["--data", "images", "--out", "images"], "--out images is --data images"),
    (["--data", "images", "--out", "images/cat/out"], "--out images/cat/out lies inside --data images"),
    (["--data", "images", "--stats-out", "images/stats.pt"], "--stats-out images/stats.pt lies inside --data images"),
    (["--stats-out", "out-refused/report.json"], "--stats-out out-refused/report.json is a name sap-fast uses in --out"),
    (["--stats-out", "out-refused/corrected.safetensors"], "is a name sap-fast uses in --out itself"),
])
def test_an_output_that_would_replace_or_land_among_the_inputs_is_refused(space, here, args, words):
    before = files(space)
    refused(here(*BASE, "--out", "out-refused", *args), words)
    assert files(space) == before


def test_correcting_a_corrected_model_again_into_its_own_folder_is_refused(space, here):
    assert here(*BASE, "--out", "again")[0] == 0
    before = files(space)
    for extra in ([], ["--overwrite"]):
        refused(here("--weights", "again/corrected.safetensors", *BASE[2:], "--out", "again", *extra),
                "--weights again/corrected.safetensors is part of the result in --out again")
    assert files(space) == before


def test_an_earlier_result_is_replaced_only_with_overwrite_and_only_its_files(space, here, earlier):
    out = space / "twice"
    shutil.copytree(earlier, out)  # a sweep's result: with its plot
    (out / "notes.txt").write_text("the user's own file")
    (space / "stats-elsewhere.pt").write_bytes(b"the user's statistics")
    before = files(space)
    refused(here(*BASE, "--out", "twice"), "--out twice already holds a result (corrected.safetensors, trusted.pt, "
                                            "report.json, report.png)")
    refused(here(*BASE, "--out", "fresh", "--stats-out", "stats-elsewhere.pt"),
            "--stats-out stats-elsewhere.pt already exists; pass --overwrite")
    assert files(space) == before
    notes = os.stat(out / "notes.txt").st_ino
    code, _, err = here(*BASE, "--out", "twice", "--overwrite")
    assert code == 0, err
    # the earlier result's files are replaced (its plot, which a fixed α does not draw, is gone);
    # the other files are kept, the very same files
    assert set(os.listdir(out)) == RESULT | {"notes.txt", "stats.pt"}
    assert os.stat(out / "notes.txt").st_ino == notes and (out / "notes.txt").read_text() == "the user's own file"
    assert (out / "stats.pt").read_bytes() == before[str(out / "stats.pt")]
    assert json.loads((out / "report.json").read_text())["alpha"] == 30.0
    assert not [e for e in os.listdir(space) if e.startswith(".twice.")]


def test_an_out_that_holds_a_folder_or_the_working_folder_is_refused(space, here, monkeypatch):
    os.makedirs(space / "shared" / "logs")
    shutil.copytree(space / "images", space / "shared" / "images")
    os.makedirs(space / "cwd")
    before = files(space)
    refused(here(*BASE, "--out", "shared"), "--out shared holds the folder 'images', which is not sap-fast's")
    refused(here(*BASE[:2], "--data", "shared/images", *BASE[4:], "--out", "shared"),
            "--data shared/images lies inside --out shared, which is replaced as one folder")
    monkeypatch.chdir(space / "cwd")
    code = main(["correct", "--model", "outnet:make", "--weights", "../w.safetensors", "--data", "../train.pt",
                 "--trusted", "12", "--alpha", "30", "--out", ".", "--quiet"])
    refused((code, None, here.capsys.readouterr().err), "--out . holds the working folder")
    assert files(space) == before


def test_without_an_atomic_exchange_two_renames_replace_the_folder(space, here, monkeypatch):
    assert here(*BASE, "--out", "renamed")[0] == 0
    (space / "renamed" / "notes.txt").write_text("kept")
    monkeypatch.setattr(io, "exchange_folders", lambda a, b: False)
    code, _, err = here(*BASE[:-1], "300", "--out", "renamed", "--overwrite")
    assert code == 0, err
    assert set(os.listdir(space / "renamed")) == RESULT | {"notes.txt"}
    assert json.loads((space / "renamed" / "report.json").read_text())["alpha"] == 300.0
    assert not [e for e in os.listdir(space) if e.startswith(".renamed.")]
    # a run stopped between the two renames: --out is missing, the earlier folder waits beside it
    os.rename(space / "renamed", space / ".renamed.sap_fast-old-x1")
    before = files(space)
    refused(here(*BASE, "--out", "renamed", "--overwrite"), "--out renamed is missing: a run that was replacing it "
                                                             "stopped halfway")
    assert files(space) == before


# ---- SIGKILL at every point of the final write -------------------------------------------------

class Interrupt:
    """Ctrl-C in the middle of scoring, after ``after`` chunks."""

    def __init__(self, after):
        self.after, self.calls, self.real = after, 0, REAL_SAMPLE_SCORES

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_kills_during_the_final_write_leave_the_earlier_folder_or_the_new_one(space, here, earlier, monkeypatch):
    """--out holds an earlier result (a sweep, with its plot and statistics), a file of the
    user's, and the checkpoint of a new run that was interrupted while scoring. The new run is
    resumed and killed by SIGKILL before every step of its final write and at random moments
    in it (tests/cli/final_write_kills.py): after every kill, --out is byte for byte the earlier
    folder or the complete new one. Run again with --resume, it gives the weights of an
    uninterrupted run (to 1e-12) and clears what the kills left beside --out."""
    new_run = ["--weights", "w.safetensors", "--data", "train.pt", "--trusted", "15", "--alpha", "100",
               "--checkpoint-every", "16", "--batch-size", "8", "--overwrite"]
    code, _, err = here(*new_run, "--stats-out", "straight/stats.pt", "--out", "straight")
    assert code == 0, err
    shutil.copytree(earlier, space / "killed")
    (space / "killed" / "notes.txt").write_text("the user's own file")
    monkeypatch.setattr(sap_fast, "sample_scores", Interrupt(after=2))
    assert here(*new_run, "--stats-out", "killed/stats.pt", "--out", "killed")[0] == 130
    monkeypatch.setattr(sap_fast, "sample_scores", REAL_SAMPLE_SCORES)
    earlier = files(space / "killed")
    assert ".sap_fast-partial" in earlier[str(space / "killed")] and "report.png" in earlier[str(space / "killed")]

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(space), os.environ.get("PYTHONPATH", "")]))
    summary = space / "kills.json"
    done = subprocess.run([sys.executable, KILLS, str(summary), "12", "0", "--", "correct", "--model", "outnet:make",
                           *new_run, "--stats-out", "killed/stats.pt", "--out", "killed", "--resume", "--quiet"],
                          cwd=space, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(summary.read_text())
    assert seen["kills"] == seen["steps"] + 13 and seen["steps"] >= 20, seen
    assert seen["seen"]["old"] >= 1 and seen["seen"]["new"] >= 1, seen   # kills before and after the swap
    assert set(seen["left_beside"]) <= {"new"}, seen
    def outside_the_checkpoint(found):  # the resumed run went on checkpointing its scoring
        return {k: v for k, v in found.items() if ".sap_fast-partial" not in k}

    assert outside_the_checkpoint(files(space / "killed")) == outside_the_checkpoint(earlier)
    assert ".sap_fast-partial" in os.listdir(space / "killed")  # the last kill came before anything was written
    assert [e for e in os.listdir(space) if e.startswith(".killed.")]   # what the kills left beside --out

    code, _, err = here(*new_run, "--stats-out", "killed/stats.pt", "--out", "killed", "--resume")
    assert code == 0, err
    assert set(os.listdir(space / "killed")) == RESULT | {"notes.txt", "stats.pt"}
    assert (space / "killed" / "notes.txt").read_text() == "the user's own file"
    assert not [e for e in os.listdir(space) if e.startswith(".killed.")]
    a, b = (load_file(str(space / f / "corrected.safetensors")) for f in ("straight", "killed"))
    assert a.keys() == b.keys() and all((a[k].double() - b[k].double()).abs().max() <= 1e-12 for k in a)
    for name in ("trusted", "scores"):
        x, y = (torch.load(space / f / "trusted.pt", weights_only=True)[name] for f in ("straight", "killed"))
        assert torch.equal(x, y), name
    assert (space / "straight" / "stats.pt").read_bytes() == (space / "killed" / "stats.pt").read_bytes()


# ---- non-finite weights and samples ------------------------------------------------------------

def _with_nan(space, name, position):
    x, y = torch.load(space / f"{name}.pt", weights_only=True)
    x = x.clone()
    x[position, 1, 2, 3] = float("nan")
    torch.save((x, y), space / f"{name}-nan.pt")
    return f"{name}-nan.pt"


def test_non_finite_weights_and_samples_are_refused_naming_the_tensor_or_sample_and_stage(space, here):
    state = load_file(str(space / "w.safetensors"))
    state["4.weight"][1, 5] = float("inf")
    save_file(state, str(space / "w-inf.safetensors"))
    cases = [
        (["--weights", "w-inf.safetensors", "--data", "train.pt", "--alpha", "30"],
         "--weights w-inf.safetensors: the tensor '4.weight' holds Inf values"),
        (["--weights", "w.safetensors", "--data", _with_nan(space, "train", 41), "--alpha", "30"],
         "--data sample 41 gives non-finite logits (NaN/Inf) in scoring"),
        (["--weights", "w.safetensors", "--data", "train.pt", "--val", _with_nan(space, "val", 7), "--alphas", "10"],
         "--val sample 7 gives non-finite logits (NaN/Inf) in validation"),
        (["--weights", "w.safetensors", "--data", "train.pt", "--val", "val-nan.pt", "--alpha", "30"],
         "--val sample 7 gives non-finite logits (NaN/Inf) in validation (original)"),
        (["--weights", "w.safetensors", "--data", "train.pt", "--test", "val-nan.pt", "--alpha", "30"],
         "--test sample 7 gives non-finite logits (NaN/Inf) in test"),
    ]
    before = files(space)
    for args, words in cases:
        refused(here(*args, "--trusted", "12", "--batch-size", "16", "--out", "out-non-finite"), words)
    assert files(space) == before


# ---- Clothing1M keys ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clothing(space):
    write_tree(space / "c1m", noisy_train=12, clean_val=4, clean_test=0, image_size=8, seed=0)
    (space / "elsewhere").mkdir()
    shutil.copy(space / "c1m" / open(space / "c1m" / "noisy_train_key_list.txt").readline().strip(),
                space / "elsewhere" / "secret.jpg")
    namespace = {}
    exec(FACTORY, namespace)
    save_file(namespace["make14"]().state_dict(), str(space / "w14.safetensors"))
    return space / "c1m"


@pytest.mark.parametrize("key, words", [
    ("../elsewhere/secret.jpg", "line 3: the key '../elsewhere/secret.jpg' leads outside"),
    ("images/../../elsewhere/secret.jpg", "line 3: the key 'images/../../elsewhere/secret.jpg' leads outside"),
    ("ABSOLUTE", "leads outside"),
    ("DUPLICATE", "line 3: '{first}' is listed again (first on line 1); list each image once"),
])
def test_clothing1m_keys_outside_the_root_or_listed_twice_are_refused(space, here, clothing, key, words):
    list_file, labels = clothing / "noisy_train_key_list.txt", clothing / "noisy_label_kv.txt"
    keys, kv = list_file.read_text(), labels.read_text()
    first = keys.split()[0]
    key = {"ABSOLUTE": str(space / "elsewhere" / "secret.jpg"), "DUPLICATE": first}.get(key, key)
    lines = keys.splitlines()
    try:
        list_file.write_text("\n".join(lines[:2] + [key] + lines[2:]) + "\n")
        if key != first:
            labels.write_text(kv + f"{key} 3\n")
        before = files(space)
        refused(here("--weights", "w14.safetensors", "--data", "clothing1m:c1m", "--val", "clothing1m:c1m:clean_val",
                     "--image-size", "8", "--out", "out-c1m", model="outnet:make14"),
                words.format(first=first))
        assert files(space) == before
    finally:
        list_file.write_text(keys)
        labels.write_text(kv)


# ---- our own messages ---------------------------------------------------------------------------

def test_unreadable_stats_resume_files_and_a_missing_device_get_our_own_one_line_messages(space, here):
    (space / "garbage.pt").write_bytes(b"not a torch file at all")
    torch.save({"layers": torch.nn.Linear(2, 2)}, space / "pickled.pt")
    os.makedirs(space / "stopped" / ".sap_fast-partial")
    (space / "stopped" / ".sap_fast-partial" / "scores.pt").write_bytes(b"garbage")
    before = files(space)
    for name in ("garbage.pt", "pickled.pt"):
        code, _, err = here("--weights", "w.safetensors", "--stats-in", name, "--val", "val.pt", "--alpha", "30",
                            "--out", "out-msg")
        refused((code, _, err), f"--stats-in '{name}' is not a sap_fast stats file (statistics are written by "
                                "Stats.save, or by sap-fast correct --stats-out)")
        assert "Weights only load failed" not in err
    for flag, name in (("--weights", "garbage.pt"), ("--weights", "pickled.pt"), ("--data", "garbage.pt"),
                       ("--data", "pickled.pt"), ("--val-indices", "pickled.pt")):
        args = {"--weights": ["--weights", name, "--data", "train.pt", "--val", "val.pt"],
                "--data": ["--weights", "w.safetensors", "--data", name, "--val", "val.pt"],
                "--val-indices": ["--weights", "w.safetensors", "--data", "train.pt", "--val-indices", name]}[flag]
        code, _, err = here(*args, "--out", "out-msg")
        refused((code, _, err), f"{flag} {name}: ")
        assert ("never loaded: a pickle can run code" if name == "pickled.pt" else "not a file torch.save wrote") in err
        assert "Weights only load failed" not in err and "miniz" not in err
    code, _, err = here(*BASE, "--out", "stopped", "--resume")
    refused((code, _, err), "is not a scoring checkpoint of sap-fast correct")
    assert "Weights only load failed" not in err and "stopped" in err
    code, _, err = here(*BASE, "--out", "out-msg", "--device", "cuda:99")
    refused((code, _, err), "--device cuda:99: ")
    assert "this machine has" in err and "Torch not compiled" not in err
    if not torch.cuda.is_available():
        refused(here(*BASE, "--out", "out-msg", "--device", "cuda"), "this machine has only cpu")
    refused(here(*BASE, "--out", "out-msg", "--device", "gpu"), "--device gpu: not a device name")
    assert files(space) == before


# ---- options that cannot both apply -------------------------------------------------------------

@pytest.mark.parametrize("args, pair", [
    (["--alpha", "30", "--alphas", "10,100"], "--alpha and --alphas"),
    (["--stats-in", "s.pt", "--trusted", "5"], "--stats-in and --trusted"),
    (["--stats-in", "s.pt", "--candidates", "50"], "--stats-in and --candidates"),
    (["--stats-in", "s.pt", "--score", "curvature"], "--stats-in and --score"),
    (["--stats-in", "s.pt", "--checkpoint-every", "10"], "--stats-in and --checkpoint-every"),
])
def test_options_that_cannot_both_apply_are_refused(space, here, args, pair):
    before = files(space)
    refused(here("--weights", "w.safetensors", "--data", "train.pt", "--val", "val.pt", *args, "--out", "out-pair"),
            f"{pair} cannot both apply")
    assert files(space) == before


def test_help_states_the_output_rules(capsys):
    with pytest.raises(SystemExit):
        main(["correct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "staging folder beside --out and swapped in as one step" in text
    assert "No output may replace or lie inside an input" in text and "--overwrite" in text
