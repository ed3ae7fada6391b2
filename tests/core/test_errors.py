"""Bad input gets a one-line ValueError/TypeError that names the problem, and the caller's model
is left exactly as it was."""
import math

import pytest
import torch
from torch import nn

import sap_fast
from support import assert_unchanged, snapshot


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x = torch.randn(12, 1, 6, 6)
    y = torch.randint(0, 3, (12,))
    return model, x, y


def _raises(exc, match, fn, model):
    snap = snapshot(model)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert "\n" not in str(info.value), "error message must be one line"
    assert_unchanged(model, snap)


@pytest.mark.parametrize("alpha", [0.0, -1.0, math.nan, math.inf])
def test_bad_alpha(setup, alpha):
    model, x, y = setup
    _raises(ValueError, "alpha must be finite and > 0", lambda: sap_fast.correct(model, x, alpha=alpha), model)
    _raises(ValueError, "alphas must be finite and > 0",
            lambda: sap_fast.sweep(model, x, (x, y), alphas=[1e3, alpha]), model)


def test_alpha_of_wrong_type(setup):
    model, x, _ = setup
    _raises(TypeError, "alpha must be a positive number", lambda: sap_fast.correct(model, x, alpha="1e4"), model)
    _raises(TypeError, "alpha must be a positive number", lambda: sap_fast.correct(model, x, alpha=True), model)


@pytest.mark.parametrize("empty", [torch.zeros(0, 1, 6, 6), [], (torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))])
def test_empty_data(setup, empty):
    model, _, _ = setup
    _raises(ValueError, "empty", lambda: sap_fast.collect_stats(model, empty), model)
    _raises(ValueError, "empty", lambda: sap_fast.correct(model, empty, alpha=1e3), model)


def test_no_covered_layer():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    _raises(ValueError, "no layer SAP covers", lambda: sap_fast.collect_stats(model, torch.randn(4, 3)), model)


def test_rejected_input_shape_names_the_layer(setup):
    model, _, _ = setup
    _raises(ValueError, r"layer '(0|3)' rejected inputs of shape \(2, 1, 5, 5\)",
            lambda: sap_fast.correct(model, torch.randn(2, 1, 5, 5), alpha=1e3), model)
    _raises(ValueError, r"layer '0' rejected", lambda: sap_fast.collect_stats(model, torch.randn(2, 3, 6, 6)), model)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_activations_name_the_first_layer(setup, bad):
    model, x, _ = setup
    x = x.clone()
    x[3, 0, 2, 2] = bad
    _raises(ValueError, r"non-finite activations \(NaN/Inf\) reach layer '0'",
            lambda: sap_fast.correct(model, x, alpha=1e3), model)


def test_non_finite_inside_the_model_names_that_layer(setup):
    model, x, _ = setup
    with torch.no_grad():
        model[0].bias[1] = math.inf  # conv output is Inf: layer '3' is the first to see it
    _raises(ValueError, r"reach layer '3'", lambda: sap_fast.collect_stats(model, x), model)


def test_n_larger_than_data(setup):
    model, x, y = setup
    _raises(ValueError, r"n=50 but data has only 12 samples", lambda: sap_fast.select_trusted(model, (x, y), n=50), model)
    _raises(ValueError, r"n must be a positive int", lambda: sap_fast.select_trusted(model, (x, y), n=0), model)


def test_missing_targets(setup):
    model, x, _ = setup
    _raises(ValueError, "no targets", lambda: sap_fast.select_trusted(model, x, n=3), model)
    _raises(ValueError, "no targets", lambda: sap_fast.sweep(model, x, x), model)
    _raises(ValueError, "no targets", lambda: sap_fast.select_trusted(model, x, n=3, score="curvature"), model)


def test_targets_out_of_range(setup):
    model, x, y = setup
    for score in ("loss", "curvature"):
        _raises(ValueError, r"targets must lie in \[0, 3\)",
                lambda: sap_fast.select_trusted(model, (x, y + 3), n=3, score=score), model)


def test_integer_inputs_to_float_model(setup):
    model, x, _ = setup
    ints = (x * 100).to(torch.int64)
    _raises(TypeError, "int64 inputs but the model computes in floating point",
            lambda: sap_fast.collect_stats(model, ints), model)


def test_model_on_another_device(setup):
    model, x, _ = setup
    _raises(ValueError, r"device='cuda' but the model is on cpu",
            lambda: sap_fast.correct(model, x, alpha=1e3, device="cuda"), model)


def test_unknown_and_uncovered_layers(setup):
    model, x, _ = setup
    _raises(ValueError, r"no module named 'conv9'", lambda: sap_fast.collect_stats(model, x, layers=["conv9"]), model)
    _raises(ValueError, r"'1' is a ReLU, which SAP does not cover", lambda: sap_fast.collect_stats(model, x, layers=["1"]), model)
    lstm = nn.Sequential(nn.LSTM(3, 3))
    _raises(ValueError, "no layer SAP covers", lambda: sap_fast.collect_stats(lstm, torch.randn(2, 4, 3)), lstm)


def test_stats_from_another_model(setup):
    model, x, _ = setup
    other = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    stats = sap_fast.collect_stats(other, torch.randn(3, 2, 6, 6))
    _raises(ValueError, r"stats for layer '0' have width 18", lambda: sap_fast.correct(model, stats=stats, alpha=1e3), model)
    _raises(ValueError, "pass the trusted samples", lambda: sap_fast.correct(model, alpha=1e3), model)
    own = sap_fast.collect_stats(model, x)
    _raises(ValueError, "not both", lambda: sap_fast.correct(model, x, stats=own, alpha=1e3), model)


def test_bad_options(setup):
    model, x, y = setup
    _raises(ValueError, "dtype must be", lambda: sap_fast.collect_stats(model, x, dtype=torch.float16), model)
    _raises(ValueError, "batch_size must be a positive int", lambda: sap_fast.correct(model, x, batch_size=0), model)
    _raises(ValueError, "score must be one of", lambda: sap_fast.select_trusted(model, (x, y), n=3, score="entropy"), model)
    _raises(ValueError, "alphas must be None, 'auto'", lambda: sap_fast.sweep(model, x, (x, y), alphas="grid"), model)
    _raises(ValueError, "alphas is empty", lambda: sap_fast.sweep(model, x, (x, y), alphas=[]), model)
    _raises(ValueError, "refine_steps must be an int >= 2",
            lambda: sap_fast.sweep(model, x, (x, y), alphas="auto", refine_steps=1), model)
    _raises(TypeError, "one-shot iterator", lambda: sap_fast.collect_stats(model, iter([x])), model)
    _raises(TypeError, "DataParallel", lambda: sap_fast.collect_stats(nn.DataParallel(model), x), model)


def test_inplace_failure_leaves_model_untouched(setup):
    """An error during inplace=True must not leave a half-corrected model behind."""
    model, x, _ = setup
    x = x.clone()
    x[0, 0, 0, 0] = math.nan
    _raises(ValueError, "non-finite", lambda: sap_fast.correct(model, x, alpha=1e3, inplace=True), model)


@pytest.mark.parametrize("layer", [0, 3])
def test_non_finite_weights_are_named_by_every_entry_point(setup, layer):
    """Inf in the classifier's weight reaches no later activation, so only a check of the weights
    themselves names it (in the first conv it would also reach layer '3')."""
    model, x, y = setup
    stats = sap_fast.collect_stats(model, x)
    with torch.no_grad():
        model[layer].weight.view(-1)[5] = math.inf
    words = rf"the model's tensor '{layer}.weight' holds Inf values; SAP needs finite weights"
    for fn in (lambda: sap_fast.select_trusted(model, (x, y), n=3),
               lambda: sap_fast.sample_scores(model, (x, y)),
               lambda: sap_fast.evaluate(model, (x, y)),
               lambda: sap_fast.correct(model, x, alpha=1e3),
               lambda: sap_fast.correct(model, stats=stats, alpha=1e3),
               lambda: sap_fast.sweep(model, x, (x, y), alphas=[1e3]),
               lambda: sap_fast.Projector(model, stats)):
        _raises(ValueError, words, fn, model)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_sample_is_named_with_its_position_and_stage(setup, bad):
    model, x, y = setup
    x = x.clone()
    x[7, 0, 1, 1] = bad
    clean = x[[0, 1, 2]]
    for stage, what, fn in [
            ("scoring", "data", lambda: sap_fast.select_trusted(model, (x, y), n=3, batch_size=4)),
            ("scoring", "data", lambda: sap_fast.sample_scores(model, (x, y), batch_size=5, score="curvature")),
            ("validation", "val", lambda: sap_fast.sweep(model, clean, (x, y), alphas=[1e3], batch_size=4)),
            ("evaluate", "data", lambda: sap_fast.evaluate(model, (x, y), batch_size=3))]:
        snap = snapshot(model)
        with pytest.raises(ValueError, match=rf"^{stage}: sample 7 of {what} gives non-finite") as info:
            fn()
        assert info.value.index == 7 and info.value.stage == stage and "\n" not in str(info.value)
        assert_unchanged(model, snap)


def test_given_stats_must_be_finite(setup):
    model, x, y = setup
    stats = sap_fast.collect_stats(model, x)
    stats["0"].gram[0, 2, 2] = math.nan  # as a damaged or hand-made stats object would hold
    words = r"statistics: the stats of layer '0' hold non-finite values"
    _raises(ValueError, words, lambda: sap_fast.correct(model, stats=stats, alpha=1e3), model)
    _raises(ValueError, words, lambda: sap_fast.sweep(model, None, (x, y), stats=stats), model)
    _raises(ValueError, words, lambda: sap_fast.Projector(model, stats), model)
