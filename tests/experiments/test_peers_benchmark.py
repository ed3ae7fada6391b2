"""benchmarks/peers.py (sap_fast's Grams beside the KFAC libraries' input factors) at smoke size:
``--tiny`` on one model, run as a user runs it, in a fresh process that writes into a temporary
folder. It needs the ``peers`` extra (curvlinops-for-pytorch, backpack-for-pytorch), which the
test stack does not bring: without it the run test skips, saying so, and the script's own refusal
is checked instead. The times mean nothing at this size; what is checked is that every peer's
factor, times its stated normalisation, is sap_fast's Gram, and that the records, the table and the
plot hold every method."""
import importlib.util
import os
import sys

import pytest

from support import REPO_ROOT, benchmark_module, run_command

common = benchmark_module("common")

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "peers.py")
PEERS = ("curvlinops", "backpack")
MISSING = [m for m in PEERS if importlib.util.find_spec(m) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"the peers extra is not installed ({', '.join(MISSING)} missing): "
                                          "pip install -e '.[peers]'")
def test_tiny_run_agrees_with_every_peer_and_reports_every_method(tmp_path):
    run = run_command([sys.executable, SCRIPT, "--tiny", "--models", "vgg11", "--repeats", "1", "--no-progress",
                       "--out", os.path.join("{out}", "peers.jsonl")], tmp_path, env={"OMP_NUM_THREADS": "1"},
                      timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = common.read_results(str(tmp_path / "peers.jsonl"))
    assert {r["parameters"]["model"] for r in rows if "model" in r["parameters"]} == {"vgg11"}
    model = [r for r in rows if "model" in r["parameters"] and "method" not in r["parameters"]]
    result = {**{k: v for r in model for k, v in r["parameters"].items()}, **common.tree(model)}
    names = {r["parameters"]["method"] for r in rows if "method" in r["parameters"]}
    methods = {m: {**{k: v for r in common.select(rows, method=m) for k, v in r["parameters"].items()},
                   **common.tree(common.select(rows, method=m))} for m in names}
    assert set(methods) == {"sap_fast fp64", "sap_fast fp32", "unfold fp64", "unfold fp32", "curvlinops forward-only",
                            "curvlinops KFAC", "BackPACK KFAC", "forward", "forward + backward"}
    kinds = set(result["layers"])
    assert kinds == {"conv 3×3", "linear"}
    for name, row in methods.items():
        assert "error" not in row, (name, row["error"])
        assert row["seconds"] > 0 and row["vs_sap_fast_fp64"] > 0 and row["peak_rise_mib"] is not None
        if name in ("forward", "forward + backward", "sap_fast fp64"):
            continue
        # every layer compared, and the factor times its normalisation is the Gram
        assert row["layers_compared"] == sum(result["layers"].values()) and "layers_missing" not in row
        assert set(row["agreement_fp64_model"]) == kinds == set(row["agreement_fp32_model"])
        for k in kinds:
            limit = 1e-5 if "fp32" in name else 1e-12
            assert row["agreement_fp64_model"][k]["max_rel_error"] <= limit, (name, k)
            assert row["agreement_fp32_model"][k]["max_rel_error"] <= 1e-5, (name, k)
    # the stated normalisations: curvlinops divides by N·positions, BackPACK by N
    n = result["samples"]
    assert methods["BackPACK KFAC"]["agreement_fp64_model"]["linear"]["factor"] == min(n, 16)  # on a slice
    assert methods["curvlinops KFAC"]["agreement_fp32_model"]["linear"]["factor"] == n
    assert methods["curvlinops KFAC"]["agreement_fp32_model"]["conv 3×3"]["factor"] == [n * 2 * 2, n * 32 * 32]
    for method in methods:
        assert f"| {method} |" in run.stdout  # the table, printed
    assert (tmp_path / "peers.png").stat().st_size > 0


def test_without_the_peers_the_script_says_what_to_install(tmp_path):
    """A stand-in curvlinops that cannot be imported: exit status 2 and one line naming the extra."""
    (tmp_path / "curvlinops.py").write_text("raise ImportError('not installed')\n")
    run = run_command([sys.executable, SCRIPT, "--tiny", "--out", os.path.join("{out}", "peers.jsonl")], tmp_path,
                      env={"PYTHONPATH": os.pathsep.join([str(tmp_path), REPO_ROOT])}, timeout=120)
    assert run.returncode == 2
    assert "curvlinops-for-pytorch" in run.stderr and ".[peers]" in run.stderr
    assert not (tmp_path / "peers.jsonl").exists()
