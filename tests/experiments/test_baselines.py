"""Properties every baseline must have, whatever it does: it forgets the forget set on a tiny
memorising model while keeping the retain set, leaves the caller's model alone, is reproducible
for a seed, and rejects bad hyperparameters in one line naming the method. Method-specific
checks (formulas, schedules) live in test_baselines_*.py."""
import inspect

import pytest
import torch

from baseline_support import accuracy, noisy_blobs
from sap_fast import baselines
from sap_fast.baselines import METHODS

# Hyperparameters that make each method act on the tiny problem (its defaults are tuned for
# CIFAR-sized sets; e.g. GA at lr 1e-4 over one batch of 40 does not move). Bounds: forget-set
# accuracy (against its wrong labels, 100% before) falls to at most FORGET_MAX, retain accuracy
# (100% before) stays at least RETAIN_MIN.
TEST_HPARAMS = {
    "finetune": dict(lr=0.1, epochs=30, weight_decay=5e-3),
    "gradient_ascent": dict(lr=0.015, epochs=6, batch_size=8, max_grad_norm=1.0),
    "random_labels": dict(lr=0.05, batch_size=32),
    "ssd": dict(batch_size=8, selection_weighting=6.0, dampening_constant=4.0),
    "scrub": dict(lr=0.1),
    "ugradsl": dict(lr=0.1, batch_size=16),
    "ugradsl_plus": dict(),
    # label-free ManiF-SMC cannot lower a plain classifier's forget accuracy (its own tests
    # show why); the with-label variant does
    "manif_smc": dict(with_label=True, epochs=5, lr=0.01),
}
FORGET_MAX = {"gradient_ascent": 0.75, "manif_smc": 0.6}
DEFAULT_FORGET_MAX = 0.5
RETAIN_MIN = 0.85


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_method_has_test_hyperparameters():
    assert set(METHODS) <= set(TEST_HPARAMS), "add the new method to TEST_HPARAMS"
    for name, fn in METHODS.items():
        assert getattr(baselines, name) is fn


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return request.param


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_forgets_and_keeps(method):
    model, retain, forget, test = noisy_blobs()
    assert accuracy(model, forget) == 1.0 and accuracy(model, retain) == 1.0
    out = METHODS[method](model, retain, forget, **TEST_HPARAMS[method])
    assert accuracy(out, forget) <= FORGET_MAX.get(method, DEFAULT_FORGET_MAX)
    assert accuracy(out, retain) >= RETAIN_MIN
    assert not out.training


def test_caller_model_untouched_and_copy_returned(method):
    model, retain, forget, _ = noisy_blobs()
    before = _state(model)
    model.train()  # the caller's mode flags are theirs too
    out = METHODS[method](model, retain, forget, **TEST_HPARAMS[method])
    assert out is not model and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in out.state_dict().items())


def test_inplace_changes_the_model(method):
    model, retain, forget, _ = noisy_blobs()
    before = _state(model)
    out = METHODS[method](model, retain, forget, inplace=True, **TEST_HPARAMS[method])
    assert out is model
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_seed_reproduces_and_leaves_global_rng(method):
    model, retain, forget, _ = noisy_blobs()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = METHODS[method](model, retain, forget, seed=5, **TEST_HPARAMS[method])
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is not consumed
    b = METHODS[method](model, retain, forget, seed=5, **TEST_HPARAMS[method])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


BAD_VALUES = [("lr", -1.0), ("lr", float("nan")), ("epochs", 0), ("epochs", 2.5), ("epochs", True),
              ("seed", -1)]
# only the hyperparameters a method has (SSD trains nothing, so it has no lr or epochs)
BAD_CASES = [(m, name, value) for m in sorted(METHODS) for name, value in BAD_VALUES
             if name in inspect.signature(METHODS[m]).parameters]


@pytest.mark.parametrize("method,name,value", BAD_CASES)
def test_bad_hyperparameters_are_one_line(method, name, value):
    model, retain, forget, _ = noisy_blobs()
    with pytest.raises((ValueError, TypeError)) as err:
        METHODS[method](model, retain, forget, **{name: value})
    msg = str(err.value)
    assert "\n" not in msg and method in msg and name in msg


def test_unknown_hyperparameter_is_refused(method):
    model, retain, forget, _ = noisy_blobs()
    with pytest.raises(TypeError, match="learning_rate"):
        METHODS[method](model, retain, forget, learning_rate=0.1)


def test_bad_data_is_one_line(method):
    model, retain, forget, _ = noisy_blobs()
    empty = (retain[0][:0], retain[1][:0])
    for r, f in ((empty, forget), (retain, empty)):
        if method == "finetune" and f is empty:
            continue  # finetune does not read the forget set
        if method == "gradient_ascent" and r is empty:
            continue  # nor GA the retain set
        with pytest.raises(ValueError, match="empty") as err:
            METHODS[method](model, r, f, **TEST_HPARAMS[method])
        assert "\n" not in str(err.value)
    bad_labels = (forget[0], forget[1] + 10)
    if method not in ("finetune", "manif_smc"):  # ManiF-SMC is label-agnostic on the forget set
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
            METHODS[method](model, retain, bad_labels, **TEST_HPARAMS[method])


def test_not_a_model():
    _, retain, forget, _ = noisy_blobs()
    for fn in METHODS.values():
        with pytest.raises(TypeError, match="must be a torch.nn.Module"):
            fn("model.pt", retain, forget)
