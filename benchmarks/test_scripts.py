"""Unit checks of the benchmark scripts' own rules, beside them (the test suite runs the scripts
only as programs, in tests/experiments/test_gpu_benchmarks.py):

    python -m pytest benchmarks/test_scripts.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_gram  # noqa: E402


def test_default_mode_is_the_fastest_within_the_error_limit():
    def row(t, err):
        return {"gram_s": t, "wp_error": {"1e3": {"max": err}, "1e6": {"max": err}}}
    modes = {"fp64": row(1.0, 0.0), "fp32": row(0.5, 2e-5), "tf32": row(0.1, 3e-3), "bf16": row(0.05, 2e-2)}
    assert gpu_gram.choose_default(modes) == "fp32"
    modes["fp32"]["wp_error"]["1e6"]["max"] = 2e-4  # over the limit at one α: out
    assert gpu_gram.choose_default(modes) == "fp64"

