"""Distributed statistics, selection, spectra and sweep over 2 and 3 gloo processes (spawned,
loopback only, bounded time) equal one process on the union of the shards: uneven shards, an
empty shard, permuted global ids; a rank that raises makes every rank raise; the torchrun example
runs. The ranks' code lives in tests/dist_support.py. The tests on spawned processes are marked
slow; the single-process ones at the end are not."""
import os

import pytest
import torch

import dist_support as ds
import sap_fast
from support import REPO_ROOT, run_command
from sap_fast import distributed
from sap_fast.select import _local_candidates, candidate_ids, lowest_per_class

REL = 1e-10
SHARDS = {2: (25, 15), 3: (22, 0, 18)}  # uneven; the three-rank run has an empty rank


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def reference():
    model, x, y, _ = ds.problem()
    result = sap_fast.sweep(model, x, (x, y), alphas=[10.0, ds.ALPHA])
    return {
        "stats": ds.stats_summary(sap_fast.collect_stats(model, x)),
        "weights": sap_fast.correct(model, x, alpha=ds.ALPHA).state_dict(),
        "trusted": sap_fast.select_trusted(model, (x, y), n=ds.TRUSTED),
        "candidates": sap_fast.select_trusted(model, (x, y), n=ds.TRUSTED, candidates=ds.CANDIDATES),
        "suspects": sap_fast.select_suspects(model, (x, y), n=ds.TRUSTED),
        "sweep": ([(r.alpha, r.val_accuracy, r.val_loss) for r in result.table], result.best_alpha),
    }


_RUNS = {}


def _run(world: int, tmp_path_factory) -> list:
    if world not in _RUNS:  # one spawn per world size serves every test below
        _RUNS[world] = ds.run_workers(world, SHARDS[world], str(tmp_path_factory.mktemp(f"w{world}")))
    for r, out in enumerate(_RUNS[world]):
        assert "crash" not in out, f"rank {r} crashed:\n{out['crash']}"
    return _RUNS[world]


@pytest.fixture(params=[pytest.param(n, marks=[pytest.mark.slow, pytest.mark.xdist_group(f"gloo-{n}-ranks")])
                        for n in (2, 3)], ids=["2-ranks", "3-ranks"])  # one worker spawns each world once
def ranks(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory)


def test_stats_equal_one_process_on_the_union(ranks, reference):
    ref = reference["stats"]
    for got in [out[key] for out in ranks for key in ("stats", "stats_packed")]:
        assert got["layers"] == ref["layers"] and got["samples"] == ref["samples"] == ds.N
        assert got["shared"] == ref["shared"]  # q/k/v share one record, as in one process
        for name, want in ref["records"].items():
            have = got["records"][name]
            assert (have["mode"], have["count"]) == (want["mode"], want["count"]), name
            assert rel(have["data"], want["data"]) <= REL, name
    assert ref["records"]["head"]["mode"] == "rows" and ref["records"]["conv1"]["mode"] == "gram"
    for out in ranks[1:]:  # bitwise identical on every rank
        for name, rec in out["stats"]["records"].items():
            assert torch.equal(rec["data"], ranks[0]["stats"]["records"][name]["data"]), name


def test_corrected_weights_equal_one_process_and_identical_on_every_rank(ranks, reference):
    for out in ranks:
        for key in ("weights", "weights_from_stats", "weights_eigh"):  # cholesky (default), eigh
            for name, want in reference["weights"].items():
                assert rel(out[key][name], want) <= REL, (key, name)
                assert torch.equal(out[key][name], ranks[0][key][name]), (key, name)


def test_selection_equals_one_process_in_global_ids(ranks, reference):
    for r, out in enumerate(ranks):
        assert torch.equal(out["trusted"], reference["trusted"])       # default ids: rank order
        assert torch.equal(out["trusted_ids"], reference["trusted"])   # permuted shards, indices=
        assert torch.equal(out["trusted_candidates"], reference["candidates"])
        assert torch.equal(out["suspects"], reference["suspects"])
        _, _, _, perm = ds.problem()
        a, b = ds.blocks(SHARDS[len(ranks)])[r]
        assert torch.equal(perm[a:b][out["local_part"]].sort().values,
                           perm[a:b][torch.isin(perm[a:b], reference["trusted"])].sort().values)
    assert sum(len(out["local_part"]) for out in ranks) == ds.TRUSTED
    # curvature draws its noise per rank, so only agreement between ranks is asserted
    assert all(torch.equal(out["curvature"], ranks[0]["curvature"]) for out in ranks)
    assert ranks[0]["curvature"].numel() == ds.TRUSTED


def test_sweep_sums_validation_over_ranks(ranks, reference):
    table, best = reference["sweep"]
    for out in ranks:
        for key in ("sweep", "sweep_cholesky"):  # both solvers reach the one-process table
            got_table, got_best = out[key]
            assert got_best == best, key
            assert len(got_table) == len(table), key
            for (a, acc, loss), (a2, acc2, loss2) in zip(got_table, table):
                assert a == a2 and acc == acc2 and abs(loss - loss2) <= REL * abs(loss2), key


def test_a_rank_that_raises_makes_every_rank_raise(ranks):
    world = len(ranks)
    for r, out in enumerate(ranks):
        kind, typ, msg = out["bad_input"]  # bad input on the last rank only
        assert kind == "raised" and typ == "ValueError" and "rejected inputs" in msg
        assert msg.startswith(f"rank {world - 1}: ") == (r != world - 1)
        kind, typ, msg = out["bad_labels"]  # labels out of range on rank 0 only
        assert typ == "ValueError" and "targets must lie in [0, 3)" in msg
        assert msg.startswith("rank 0: ") == (r != 0)
        assert out["local_stats"][1] == "ValueError" and "stats differ between rank" in out["local_stats"][2]
        assert out["too_many"][2] == f"n={ds.N + 1} but data has only {ds.N} samples over all ranks; pass n <= {ds.N}"
        assert torch.equal(out["after_errors"], out["trusted"])  # the group is still usable


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_others_at_once(tmp_path_factory):
    ranks = _run(2, tmp_path_factory)  # the two-rank run ends with rank 1 exiting
    kind, typ, msg = ranks[0]["peer_died"]
    assert kind == "raised" and typ in ("RuntimeError", "DistBackendError"), msg
    assert ranks[0]["peer_died_seconds"] < 30  # well before the 60 s process-group timeout


def test_bucketed_collectives(ranks):
    for out in ranks:
        assert out["buckets"]["reduce"] <= 1e-15 and out["buckets"]["symmetric"] <= 1e-15
        assert out["buckets"]["calls"] > 3  # small buckets: many calls, one tensor split over several
        assert out["buckets"]["one_bucket"] == 1
        assert out["buckets"]["broadcast"] == 0.0


TORCHRUN = ds.torchrun(os.path.join(REPO_ROOT, "examples", "distributed_correct.py"),
                       ["--epochs", "3", "--trusted", "100", "--candidates", "600"])


@pytest.mark.slow
def test_torchrun_example(tmp_path):
    argv, env = TORCHRUN
    run = run_command(argv, tmp_path, env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "identical corrected weights on all 2 ranks: True" in run.stdout, run.stdout


# -- local (single-process) behaviour of the new parameters -------------------------------------
def test_process_group_without_torch_distributed_is_a_one_line_error():
    model, x, y, _ = ds.problem()
    for call in (lambda: sap_fast.collect_stats(model, x, process_group=True),
                 lambda: sap_fast.select_trusted(model, (x, y), n=5, process_group=True)):
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            call()
    with pytest.raises(TypeError, match="process_group must be"):
        sap_fast.correct(model, x, process_group="world")
    assert distributed.resolve_group(None) is None and distributed.resolve_group(False) is None


def test_candidates_and_indices_locally():
    model, x, y, perm = ds.problem()
    plain = sap_fast.select_trusted(model, (x, y), n=10)
    with pytest.raises(ValueError, match="candidates=5 is less than n=10"):
        sap_fast.select_trusted(model, (x, y), n=10, candidates=5)
    with pytest.raises(ValueError, match="candidates must be a positive int"):
        sap_fast.select_trusted(model, (x, y), n=10, candidates=0)
    assert torch.equal(sap_fast.select_trusted(model, (x, y), n=10, candidates=ds.N), plain)
    # global ids: a permuted copy of the data with its ids selects the same samples
    assert torch.equal(sap_fast.select_trusted(model, (x[perm], y[perm]), n=10, indices=perm), plain)
    with pytest.raises(ValueError, match="indices has 3 entries but data has 40"):
        sap_fast.select_trusted(model, (x, y), n=10, indices=[0, 1, 2])
    # the candidate subset: exactly K scored samples, chosen by the seed
    sub = sap_fast.select_trusted(model, (x, y), n=10, candidates=20, seed=3)
    chosen = candidate_ids(ds.N, 20, 3)
    assert chosen.unique().numel() == 20 and not torch.equal(chosen, torch.randperm(
        ds.N, generator=torch.Generator().manual_seed(3))[:20])  # not the plain seeded draw
    assert torch.isin(sub, chosen).all()
    s = torch.nn.functional.cross_entropy(model(x[chosen.sort().values]), y[chosen.sort().values],
                                          reduction="none").double()
    expected = chosen.sort().values[lowest_per_class(s, y[chosen.sort().values], ds.CLASSES, 10)]
    assert torch.equal(sub, expected)
    with pytest.raises(ValueError, match="not initialized"):
        distributed.shard(10, process_group=True)
    assert torch.equal(distributed.shard(10), torch.arange(10))


def test_local_candidates_contain_every_global_pick():
    """The per-rank candidate rule (class quotas + the n lowest overall) never misses a sample
    that the global class-balanced choice takes, including classes short of their quota."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        n_total, classes = int(torch.randint(5, 60, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
        scores = torch.randint(0, 8, (n_total,), generator=gen).double()  # many ties
        labels = torch.randint(0, classes, (n_total,), generator=gen)
        labels[labels == classes - 1] = 0 if trial % 2 else classes - 1  # sometimes an empty class
        n = int(torch.randint(1, n_total + 1, (1,), generator=gen))
        want = lowest_per_class(scores, labels, classes, n)
        ranks = torch.randint(0, 3, (n_total,), generator=gen)
        pool = torch.cat([torch.nonzero(ranks == r).flatten()[
            _local_candidates(scores[ranks == r], labels[ranks == r], torch.nonzero(ranks == r).flatten(),
                              classes, n, True)] for r in range(3)])
        assert torch.isin(want, pool).all(), trial
