"""End to end on the embedded default: SAP must repair what label noise did (one seed).

Training the default 100-epoch model takes ~15 s on one core: a fresh process trains it into the
run's model cache, and the test's own run_seed reads it from there (the recipe runs on one thread,
so the weights are the ones run_seed would train itself)."""
import sys

import pytest

from sap_fast.cli import main
from sap_fast.experiments import digits
from sap_fast.experiments.demo import run_seed
from sap_fast.experiments.digits import default_cache_dir
from support import run_command

SEED, NOISE, RATE, EPOCHS = 0, "symmetric", 0.25, 100
TRAIN = [sys.executable, "-c", (
    "from sap_fast.experiments.digits import default_cache_dir, noisy_model; "
    f"noisy_model({SEED}, {NOISE!r}, {RATE}, {EPOCHS}, default_cache_dir())")]


@pytest.mark.slow
@pytest.mark.xdist_group("digits-models")
def test_sap_repairs_the_noisy_digits_model(monkeypatch, tmp_path):
    trained = run_command(TRAIN, tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    monkeypatch.setattr(digits, "train", lambda *a, **k: pytest.fail("run_seed trained instead of reading the cache"))
    r = run_seed(SEED, noise=RATE, trusted=300, alphas=None, kind=NOISE, epochs=EPOCHS, cache=default_cache_dir())
    assert r["train_acc_noisy"] >= 0.995          # the model memorised the wrong labels
    assert r["vanilla_test"] <= 0.85              # ... and it shows on clean test data
    assert r["trusted_clean"] >= 0.95             # loss-based selection avoids flipped labels
    assert r["alpha"] is not None                 # a projection beat "no projection" on noisy val
    assert r["sap_test"] >= r["vanilla_test"] + 0.08


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--alphas", "sometimes"])
    assert "invalid choice" in capsys.readouterr().err
