"""benchmarks/sweep_cache.py (the α sweep of ``sap-fast correct`` with its validation and test
splits decoded once, against decoding them every pass) at smoke size: a tree of 60 images, two
runs, in a fresh process that writes into a temporary folder. The times mean nothing at this
size; what is checked is that each run went through, that the cached run's result is the
uncached one's, and that the JSON holds the figures the full run reports as numbers."""
import json
import os
import sys

import pytest

from support import REPO_ROOT, run_command

pytest.importorskip("PIL")
pytest.importorskip("safetensors")

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "sweep_cache.py")


@pytest.mark.slow
def test_smoke_run_gives_the_uncached_result_and_reports_time_and_memory(tmp_path):
    run = run_command([sys.executable, SCRIPT, "--val", "24", "--test", "12", "--train", "24", "--image-size", "32",
                       "--modes", "off,auto", "--no-progress", "--trees", os.path.join("{out}", "trees"),
                       "--out", os.path.join("{out}", "sweep.json")], tmp_path, env={"OMP_NUM_THREADS": "1"},
                      timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(tmp_path / "sweep.json", encoding="utf-8") as f:
        saved = json.load(f)
    off, auto = saved["rows"]
    assert (off["mode"], auto["mode"]) == ("off", "auto")
    assert off["eval_cache"] == {}
    assert auto["eval_cache"] == {s: {"where": "memory", "bytes": n * 3 * 224 * 224}
                                  for s, n in (("--val", 24), ("--test", 12))}
    assert auto["identical_to_off"] is True and off["identical_to_off"] is True
    for row in (off, auto):
        for key in ("wall_seconds", "sweep_seconds", "test_seconds", "peak_rss_mib", "peak_anon_mib", "peak_file_mib"):
            assert isinstance(row[key], float) and row[key] > 0, key
    assert saved["settings"]["auto_in_memory_up_to_images"] > 0
    assert "| auto | memory |" in saved["markdown"]
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging or cache file left
