"""End to end on the embedded default: SAP must repair what label noise did (one seed, ~20 s)."""
from sap_fast.cli import main
from sap_fast.experiments.demo import run_seed


def test_sap_repairs_the_noisy_digits_model():
    r = run_seed(0, noise=0.25, trusted=300, alphas=None)
    assert r["train_acc_noisy"] >= 0.995          # the model memorised the wrong labels
    assert r["vanilla_test"] <= 0.85              # ... and it shows on clean test data
    assert r["trusted_clean"] >= 0.95             # loss-based selection avoids flipped labels
    assert r["alpha"] is not None                 # a projection beat "no projection" on noisy val
    assert r["sap_test"] >= r["vanilla_test"] + 0.08


def test_demo_rejects_bad_arguments(capsys):
    import pytest
    with pytest.raises(SystemExit):
        main(["demo", "--alphas", "sometimes"])
    assert "invalid choice" in capsys.readouterr().err
