"""benchmarks/scale.py (``sap-fast correct`` end to end on Clothing1M-shaped trees, per stage) at
smoke size: ``--quick`` with one tree of 300 images, run as a user runs it, in a fresh process
that writes into a temporary folder. The numbers mean nothing
at this size; what is checked is that the script runs the command through, and that its records
(benchmarks/common.py's schema) hold what the full run reports: the machine, the generation speed, and per run the stages'
seconds and images per second, the wall time and the peak memory, all as numbers."""
import math
import os
import sys

import pytest

from support import REPO_ROOT, benchmark_module, run_command

common = benchmark_module("common")

pytest.importorskip("PIL")

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "scale.py")
SCALE = [sys.executable, SCRIPT, "--quick", "--sizes", "300", "--trees", os.path.join("{out}", "trees"),
         "--out", os.path.join("{out}", "scale.jsonl"), "--heartbeat", "0"]
STAGES = ("scan", "scoring", "statistics", "decomposition", "alpha", "test")


def view(rows) -> dict:
    """One entry's parameters and its measurements' nested view (``settings``, a run, ...)."""
    settings = {k: v for r in rows for k, v in r["parameters"].items()}
    tree = common.tree(rows)
    for key, sub in tree.items():
        if isinstance(sub, dict) and key in ("settings", "generation"):
            tree[key] = {**settings, **sub}
    return {**settings, **tree}


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_quick_run_reports_every_stage_the_wall_time_and_peak_memory_as_numbers(tmp_path):
    run = run_command(SCALE, tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "run 1/1: sap-fast correct on 300 training images" in run.stdout  # progress as it goes
    rows = common.read_results(os.path.join(run.out, "scale.jsonl"))

    first = rows[0]
    assert common.value(rows, "cores") >= 1 and first["versions"]["torch"] and first["time"]
    assert "scale.py" in first["command"] and "cpu_model" in first["parameters"]
    settings = view([r for r in rows if r["metric"].startswith("settings.")])["settings"]
    assert settings["mode"] == "quick" and settings["passes"] == settings["alpha_count"] + 1 == 5
    assert number(settings["startup"]["seconds"]) and settings["startup"]["seconds"] > 0
    assert settings["factory"] == "scale_cnn:make" and os.path.isfile(settings["weights"])  # the model's

    generated = view([r for r in rows if r["metric"].startswith("generation.")])["generation"]
    assert len({r["parameters"]["root"] for r in rows if r["metric"].startswith("generation.")}) == 1
    assert generated["noisy_train"] == 300 and generated["images"] == 300 + generated["clean_val"] + \
        generated["clean_test"]
    assert number(generated["images_per_second"]) and generated["images_per_second"] > 0

    runs = [r for r in rows if "train_images" in r["parameters"]]
    assert len({r["parameters"]["command_line"] for r in runs}) == 1
    row = view(runs)
    assert "error" not in row, row.get("error")
    assert row["train_images"] == 300 and row["workers"] == 0 and row["returncode"] == 0
    assert "correct" in row["command"][:4]  # sap-fast correct, or python -m sap_fast correct
    assert "--test" in row["command"] and row["command_line"].count("clothing1m:") == 3
    sec = row["seconds"]
    for stage in STAGES:
        assert number(sec[stage]) and sec[stage] >= 0, stage
    assert len(sec["validation"]) == 5 and all(number(s) and s > 0 for s in sec["validation"])
    assert sec["alpha"] >= sec["decomposition"] + sum(sec["validation"]) - 1e-6
    rates = row["images_per_second"]
    for stage in ("scan_keys", "scoring", "statistics", "test"):
        assert number(rates[stage]) and rates[stage] > 0, stage
    assert len(rates["validation"]) == 5 and all(number(r) and r > 0 for r in rates["validation"])
    assert row["samples"]["scoring"] == 300 and row["samples"]["statistics"] == 100
    assert number(row["wall_seconds"]) and row["wall_seconds"] > row["staged_seconds"] > 0
    assert number(row["unstaged_seconds"]) and row["unstaged_seconds"] > 0
    # ru_maxrss of the command (torch alone is over 100 MiB) and the sampled PSS of its tree
    assert number(row["peak_rss_mib"]) and row["peak_rss_mib"] > 50
    assert number(row["peak_tree_pss_mib"]) and row["peak_tree_pss_mib"] >= 0
    assert "| 300 | 50 / 40 | 0 |" in run.stdout  # the table, printed
