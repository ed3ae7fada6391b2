"""The comparison harness: the selection rule, trial counting, divergence, and `sap-fast compare`."""
import copy
import json
import math

import pytest
import torch

from baseline_support import noisy_blobs
from sap_fast import baselines
from sap_fast.experiments import compare
from sap_fast.sweep import DEFAULT_ALPHAS
from sap_fast.experiments.compare import Corrector, compare_correctors, compare_privacy, search, validation_score


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem():
    model, retain, forget, test = noisy_blobs()
    x = torch.cat([retain[0], forget[0]])
    y = torch.cat([retain[1], forget[1]])
    # a clean validation split drawn like test: what matters is that selection only sees val
    val = (test[0][::2], test[1][::2])
    return model, (x, y), val, (test[0][1::2], test[1][1::2])


def test_search_keeps_the_best_validation_trial_and_counts_every_trial(monkeypatch):
    model, train, val, _ = _problem()
    calls = []

    def fake(model, retain, forget, *, seed, show_progress, scale, diverge=False):
        calls.append(scale)
        if diverge:
            raise FloatingPointError("fake: the loss became nan")
        out = copy.deepcopy(model)
        with torch.no_grad():
            out.fc3.weight.mul_(scale)  # 0 kills the classifier, 1 keeps it
        return out

    monkeypatch.setitem(baselines.METHODS, "finetune", fake)
    c = Corrector("finetune", "F", 10, grid=[{"scale": 0.0}, {"scale": 1.0}, {"scale": 1.0, "diverge": True},
                                             {"scale": 1.0}])
    best, chosen, trials = search(c, model, train, train, seed=0, score=validation_score(val))
    assert calls == [0.0, 1.0, 1.0, 1.0]
    assert len(trials) == 4 and trials[2].error and not trials[2].metrics
    assert chosen == {"scale": 1.0}  # the first of the equal best keys
    accs = [t.metrics.get("val_accuracy", -1) for t in trials]
    assert accs[1] == max(accs) > accs[0]
    assert torch.equal(best.fc3.weight, model.fc3.weight)


def test_compare_correctors_runs_each_method_and_leaves_the_model():
    model, train, val, test = _problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = compare_correctors(model, train, val, test, methods=["gradient_ascent", "sap"], grid="defaults")
    assert set(out) == {"gradient_ascent", "sap"}
    assert out["gradient_ascent"].trials == 1
    assert out["sap"].trials == 1 + len(DEFAULT_ALPHAS)  # identity plus the grid
    budgets = compare.correctors()
    assert len(out["sap"].extra["retain_idx"]) == min(budgets["sap"].retain, len(train[1]))
    # 400 samples < 600 + 120: the trusted set shrinks to what the suspects leave
    assert len(out["gradient_ascent"].extra["retain_idx"]) == len(train[1]) - budgets["gradient_ascent"].forget
    assert out["sap"].extra["forget_idx"] is None
    assert len(out["gradient_ascent"].extra["forget_idx"]) == budgets["gradient_ascent"].forget
    # the suspects are the highest-loss samples: they include the memorised flips' neighbours,
    # never the trusted ones
    assert not set(out["gradient_ascent"].extra["forget_idx"]) & set(out["gradient_ascent"].extra["retain_idx"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # the kept model's validation accuracy is the one its trial recorded
    assert out["gradient_ascent"].val_accuracy == out["gradient_ascent"].table[0].metrics["val_accuracy"]
    assert out["sap"].val_accuracy == max(t.metrics["val_accuracy"] for t in out["sap"].table)
    for o in out.values():
        assert 0 <= o.test_accuracy <= 1 and o.seconds > 0


def test_privacy_picks_the_smallest_gap():
    model, retain, forget, test = noisy_blobs()
    out = compare_privacy(model, retain, forget, test, model, methods=["gradient_ascent"], grid="search")
    ga = out["gradient_ascent"]
    gaps = [t.metrics["avg_gap"] for t in ga.table if not t.error]
    assert ga.extra["avg_gap"] == pytest.approx(min(gaps))
    assert out["retrain"].extra["avg_gap"] == 0.0
    # the "retrained" model here is the original, so doing nothing is the perfect score
    assert out["original"].extra["avg_gap"] == 0.0
    assert ga.trials == len(compare.correctors()["gradient_ascent"].grid)


def test_unknown_method_and_grid_are_one_line():
    model, train, val, test = _problem()
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        compare_correctors(model, train, val, test, methods=["sgd"])
    with pytest.raises(ValueError, match="grid must be"):
        compare_correctors(model, train, val, test, methods=["finetune"], grid="huge")


def test_every_grid_point_is_a_valid_call():
    """A typo in a grid would only surface hours into a comparison: check names now."""
    import inspect
    for c in compare.correctors().values():
        if c.run is None:
            continue
        params = inspect.signature(c.run).parameters
        for point in c.grid:
            assert set(point) <= set(params), (c.name, point)


@pytest.mark.slow
@pytest.mark.xdist_group("digits-models")
def test_cli_compare_writes_table_json_and_plot(tmp_path, capsys, keep_threads):
    """On the models of the run's cache ($SAP_FAST_CACHE): the 3-epoch noisy model is the one the
    demo command's test trains."""
    from sap_fast.cli import main
    out = tmp_path / "cmp"
    code = main(["compare", "--quiet", "--settings", "sym25", "--seeds", "0", "--methods", "random_labels", "sap",
                 "--grid", "defaults", "--epochs", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "compare.json").read_text())
    rows = data["corrective"]["sym25"]
    assert set(rows) == {"vanilla", "retrain", "random_labels", "sap"}
    assert rows["sap"][0]["trials"] == 1 + len(DEFAULT_ALPHAS)
    assert 0 < rows["sap"][0]["retain_clean"] <= 1
    priv = data["privacy"]
    assert set(priv) == {"retrain", "original", "random_labels"}  # SAP has no forget set
    assert not math.isnan(priv["random_labels"][0]["avg_gap"])
    md = (out / "compare.md").read_text()
    assert "| SAP |" in md and "| RL |" in md and "Avg Gap" in md
    assert (out / "compare.png").stat().st_size > 1000
    assert "| SAP |" in capsys.readouterr().out


def test_cli_compare_bad_method_exits_2(capsys):
    from sap_fast.cli import main
    assert main(["compare", "--methods", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'nope'" in err[0]


def test_budgets_override_and_their_errors():
    table = compare.correctors({"sap": (600, 0), "scrub": (600, 120)})
    assert (table["sap"].retain, table["sap"].forget) == (600, 0)
    assert (table["scrub"].retain, table["scrub"].forget) == (600, 120)
    assert table["scrub"].grid == compare.correctors()["scrub"].grid
    for bad, match in [({"nope": (1, 0)}, "unknown method 'nope'"), ({"sap": (600, 10)}, "uses no forget set"),
                       ({"scrub": (600, 0)}, "forget budget"), ({"ssd": (0, 10)}, "retain budget")]:
        with pytest.raises(ValueError, match=match):
            compare.correctors(bad)
    model, train, val, test = _problem()
    out = compare_correctors(model, train, val, test, methods=["sap"], grid="defaults", budgets={"sap": (40, 0)})
    assert len(out["sap"].extra["retain_idx"]) == 40


def test_cli_budget_syntax_error_exits_2(capsys):
    from sap_fast.cli import main
    assert main(["compare", "--budget", "sap:600"]) == 2
    assert "use METHOD=RETAIN" in capsys.readouterr().err
