"""The GPU benchmark scripts' plumbing, run here at smoke size on the CPU so a GPU session does
not find a broken script: benchmarks/gpu_gram.py (floors, Wp errors, default choice) and
benchmarks/gpu_e2e.py (stages, both solvers). The numbers themselves mean something only on a
GPU; what is asserted here are properties a wrong script would break."""
import json
import os
import sys

import pytest
import torch
from torch import nn

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import gpu_e2e  # noqa: E402
import gpu_gram  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shift_floor_counts_distinct_offsets():
    """3×3 stride-1: 13 C×C correlations per position instead of d(d+1)/2 products; strided and
    1×1 convs and linear layers keep the triangle."""
    class Layer:
        def __init__(self, name, d, rows):
            self.name, self.d, self.groups, self.rows_per_sample = name, d, 1, rows
            self.sym_macs = rows * d * (d + 1) // 2
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2), nn.Conv2d(8, 8, 1),
                          nn.Conv2d(8, 8, (1, 3)))
    assert gpu_gram.shift_macs(model, Layer("0", 72, 10)) == 13 * 64 * 10
    assert gpu_gram.shift_macs(model, Layer("1", 72, 10)) == 10 * 72 * 73 // 2
    assert gpu_gram.shift_macs(model, Layer("2", 8, 10)) == 10 * 8 * 9 // 2
    assert gpu_gram.shift_macs(model, Layer("3", 24, 10)) == 3 * 64 * 10  # (1·5 + 1)/2 offsets


def test_default_mode_is_the_fastest_within_the_error_limit():
    def row(t, err):
        return {"gram_s": t, "wp_error": {"1e3": {"max": err}, "1e6": {"max": err}}}
    modes = {"fp64": row(1.0, 0.0), "fp32": row(0.5, 2e-5), "tf32": row(0.1, 3e-3), "bf16": row(0.05, 2e-2)}
    assert gpu_gram.choose_default(modes) == "fp32"
    modes["fp32"]["wp_error"]["1e6"]["max"] = 2e-4  # over the limit at one α: out
    assert gpu_gram.choose_default(modes) == "fp64"


def test_gram_script_smoke(tmp_path):
    out = tmp_path / "gram.json"
    assert gpu_gram.main(["--tiny", "--models", "resnet50", "--modes", "fp64,fp32", "--no-official",
                          "--wp-max-d", "64", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["resnet50"]
    assert res["source"] in ("torchvision", "benchmarks.models")
    assert 0 < res["gram_tflop_shift"] < res["gram_tflop_sym"]
    for mode, row in res["modes"].items():
        assert row["floor_shift_s"] < row["floor_sym_s"]
        assert row["ratio"] == pytest.approx(row["gram_s"] / row["floor_shift_s"])
    fp32 = res["modes"]["fp32"]["wp_error"]
    assert set(fp32) == {"1000", "30000", "1e+06"}
    assert all(0 < e["median"] <= e["max"] < 1e-2 for e in fp32.values())  # float32 sums: small, not 0
    assert res["default_mode"] in ("fp64", "fp32")


def test_e2e_script_smoke_both_solvers_agree(tmp_path):
    out = tmp_path / "e2e.json"
    assert gpu_e2e.main(["--tiny", "--models", "resnet50", "--no-official", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["resnet50"]
    eigh, chol = res["eigh"], res["cholesky"]
    assert set(eigh["update_s"]) == {"None", *map(str, gpu_e2e.DEFAULT_ALPHAS)}
    assert eigh["val_accuracy"] == chol["val_accuracy"]  # the same weights, so the same predictions
    assert eigh["sweep_call_best_alpha"] == chol["sweep_call_best_alpha"]
    for row in (eigh, chol):
        assert row["sweep_s"] >= res["stats_s"] + row["setup_s"]
        assert row["correct_s"] > res["stats_s"]
