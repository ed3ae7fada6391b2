"""benchmarks/sweep_cache.py (the α sweep of ``sap-fast correct`` with its validation and test
splits decoded once, against decoding them every pass) at smoke size: a tree of 60 images, two
runs, in a fresh process that writes into a temporary folder. The times mean nothing at this
size; what is checked is that each run went through, that the cached run's result is the
uncached one's, and that its records (benchmarks/common.py's schema) hold the figures the full run reports as numbers."""
import os
import sys

import pytest

from support import REPO_ROOT, benchmark_module, run_command

common = benchmark_module("common")

pytest.importorskip("PIL")
pytest.importorskip("safetensors")

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "sweep_cache.py")


@pytest.mark.slow
def test_smoke_run_gives_the_uncached_result_and_reports_time_and_memory(tmp_path):
    run = run_command([sys.executable, SCRIPT, "--val", "24", "--test", "12", "--train", "24", "--image-size", "32",
                       "--modes", "off,auto", "--no-progress", "--trees", os.path.join("{out}", "trees"),
                       "--out", os.path.join("{out}", "sweep.jsonl")], tmp_path, env={"OMP_NUM_THREADS": "1"},
                      timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = common.read_results(str(tmp_path / "sweep.jsonl"))
    modes = list(dict.fromkeys(r["parameters"]["mode"] for r in records if "mode" in r["parameters"]))
    off, auto = ({**{k: v for r in common.select(records, mode=m) for k, v in r["parameters"].items()},
                  **common.tree(common.select(records, mode=m))} for m in modes)
    assert (off["mode"], auto["mode"]) == ("off", "auto")
    assert off.get("eval_cache", {}) == {}  # nothing kept: no record of it
    assert {r["metric"][len("eval_cache."):-len(".bytes")]: {"where": r["parameters"]["where"], "bytes": r["value"]}
            for r in common.select(records, mode="auto") if r["metric"].startswith("eval_cache.")} == \
        {s: {"where": "memory", "bytes": n * 3 * 224 * 224} for s, n in (("--val", 24), ("--test", 12))}
    assert auto["identical_to_off"] is True and off["identical_to_off"] is True
    for row in (off, auto):
        for key in ("wall_seconds", "sweep_seconds", "test_seconds", "peak_rss_mib", "peak_anon_mib", "peak_file_mib"):
            assert isinstance(row[key], float) and row[key] > 0, key
    assert common.value(records, "settings.auto_in_memory_up_to_images") > 0
    assert "| auto | memory |" in run.stdout  # the table, printed
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging or cache file left
