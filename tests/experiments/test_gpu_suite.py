"""The GPU suite's plumbing on the CPU: results streamed one JSON line at a time, verdicts against
the targets, and the suite's refusals (benchmarks/common.py, benchmarks/verdicts.py,
benchmarks/gpu_suite.sh). The whole suite's dry run is ``make gpu-dry-run`` (CI)."""
import os
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCHMARKS)


def test_a_verdict_passes_fails_or_stays_open_for_a_lower_bound():
    from common import verdict
    assert verdict(1.2, 1.5) == {"value": 1.2, "target": "<= 1.5", "pass": True}
    assert verdict(1.6, 1.5)["pass"] is False
    assert verdict(60.0, 50, at_most=False)["pass"] is True
    assert verdict(None, 1.5)["pass"] is None
    # a capped baseline: the speed-up is a lower bound, so only reaching the target is conclusive
    assert verdict(70.0, 50, at_most=False, bound=True)["pass"] is True
    assert verdict(20.0, 50, at_most=False, bound=True)["pass"] is None


def test_every_line_is_on_disk_when_written_and_a_cut_last_line_loses_only_itself(tmp_path):
    from common import JsonLines, verdict
    log = JsonLines(str(tmp_path / "gram.jsonl"), name="gpu_gram", device="NVIDIA H100 80GB HBM3")
    log.write({"kind": "setup", "rates_tflops": {"fp64": 51.2}})
    log.write({"kind": "mode", "model": "resnet50", "mode": "fp64", "verdicts": {"gram_vs_floor": verdict(1.2, 1.5)}})
    assert len((tmp_path / "gram.jsonl").read_text().splitlines()) == 2  # no buffering
    log.write({"kind": "skipped", "model": "resnet50", "mode": "bf16", "reason": "out of time"})
    with open(tmp_path / "gram.jsonl", "a") as f:
        f.write('{"kind": "mode", "model": "resn')  # killed mid-line
    (tmp_path / "tests.xml").write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/></testsuites>')
    run = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "verdicts.py"),
                          str(tmp_path)], capture_output=True, text=True)
    lines = run.stdout.splitlines()
    assert lines[0] == "verdicts on NVIDIA H100 80GB HBM3"
    assert any("resnet50 fp64 gram_vs_floor" in ln and ln.endswith("PASS") for ln in lines)
    assert any("bf16" in ln and "SKIPPED (out of time)" in ln for ln in lines)
    assert any(ln.startswith("unreadable: ") and "gram.jsonl:4" in ln for ln in lines)
    assert any("tests: pytest" in ln and "3/4 passed" in ln and ln.endswith("FAIL") for ln in lines)
    assert run.returncode == 1  # a failed test fails the phase


def test_the_suite_runs_one_phase_per_device_call(tmp_path):
    suite = os.path.join(BENCHMARKS, "gpu_suite.sh")
    env = {**os.environ, "OUT": str(tmp_path)}
    two = subprocess.run(["bash", suite, "gram", "e2e"], capture_output=True, text=True, env=env)
    assert two.returncode == 2 and "one phase per call" in two.stderr
    bad = subprocess.run(["bash", suite, "grams"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown phase 'grams'" in bad.stderr
    assert not os.listdir(tmp_path)  # refused before writing anything
