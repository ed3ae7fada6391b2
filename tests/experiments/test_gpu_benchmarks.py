"""The GPU benchmark scripts, benchmarks/gpu_gram.py (floors, Wp errors, default choice) and
benchmarks/gpu_e2e.py (stages, both solvers), run at smoke size on the CPU, each in a fresh
process as on the GPU machine, so that a GPU run does not find
a broken script. The numbers themselves mean something only on a GPU; what is asserted here are
properties a wrong script would break. The scripts' own rules are unit-checked beside them, in
benchmarks/test_scripts.py."""
import os
import sys

import pytest

from sap_fast.sweep import DEFAULT_ALPHAS
from support import REPO_ROOT, benchmark_module, run_command

zoo = benchmark_module("zoo")
common = benchmark_module("common")

WP_LIMIT = 1e-4  # benchmarks/gpu_gram.py: the default mode keeps Wp within this relative error


def script(name: str, *args: str):
    """``(name, argv)`` of ``python benchmarks/<name>.py --tiny --models resnet50 --no-official *args
    --out {out}/<name>.jsonl``."""
    return name, [sys.executable, os.path.join(REPO_ROOT, "benchmarks", f"{name}.py"), "--tiny", "--models",
                  "resnet50", "--no-official", *args, "--out", os.path.join("{out}", f"{name}.jsonl")]


GRAM = script("gpu_gram", "--modes", "fp64,fp32", "--wp-max-d", "64")
E2E = script("gpu_e2e")


def results(command, out):
    """The script's records of ResNet-50 (benchmarks/common.py's schema), run in ``out`` with one
    torch thread, and their nested view: the model's parameters and measurements, and per mode
    (``modes``) that mode's measurements."""
    name, argv = command
    run = run_command(argv, out, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = common.select(common.read_results(os.path.join(run.out, f"{name}.jsonl")), model="resnet50")
    model = [r for r in rows if "mode" not in r["parameters"]]
    res = {k: v for r in model for k, v in r["parameters"].items()}
    res.update(common.tree(model))
    modes = sorted({r["parameters"]["mode"] for r in rows if "mode" in r["parameters"]})
    if modes:
        res["modes"] = {m: common.tree(common.select(rows, mode=m)) for m in modes}
    return rows, res


@pytest.mark.slow
def test_gram_script_smoke(tmp_path):
    _, res = results(GRAM, tmp_path)
    assert res["source"] in ("torchvision", "benchmarks/zoo.py")
    assert 0 < res["gram_tflop_shift"] < res["gram_tflop_sym"]
    # the shift-form count is the census's, over the distinct Grams, for every sample
    model = zoo.build("resnet50", device="meta", image_size=res["image_size"])
    census = zoo.census(model, res["image_size"])
    shift = sum(zoo.shift_macs(model, layer) for layer in census.distinct())
    assert res["gram_tflop_shift"] == pytest.approx(2 * shift * res["samples"] / 1e12)
    assert res["gram_tflop_sym"] == pytest.approx(census.gram_flops(res["samples"], symmetric=True) / 1e12)
    for mode, row in res["modes"].items():
        assert row["floor_shift_s"] < row["floor_sym_s"]
        assert row["ratio"] == pytest.approx(row["gram_s"] / row["floor_shift_s"])
    fp32 = res["modes"]["fp32"]["wp_error"]
    assert set(fp32) == {"1000", "30000", "1e+06"}
    assert all(0 < e["median"] <= e["max"] < 1e-2 for e in fp32.values())  # float32 sums: small, not 0
    # the default: the fastest mode whose Wp error stays within the limit at every α
    modes = res["modes"]
    within = [m for m, row in modes.items() if all(e["max"] <= WP_LIMIT for e in row["wp_error"].values())]
    assert "fp64" in within and res["default_mode"] == min(within, key=lambda m: modes[m]["gram_s"])


@pytest.mark.slow
def test_e2e_script_smoke_both_solvers_agree(tmp_path):
    rows, res = results(E2E, tmp_path)
    eigh, chol = res["eigh"], res["cholesky"]
    alphas = {r["metric"][len("eigh.update_s."):] for r in rows if r["metric"].startswith("eigh.update_s.")}
    assert alphas == {"None", *map(str, DEFAULT_ALPHAS)}  # (an α's own dots are part of its name)
    assert eigh["val_accuracy"] == chol["val_accuracy"]  # the same weights, so the same predictions
    assert eigh["sweep_call_best_alpha"] == chol["sweep_call_best_alpha"]
    for row in (eigh, chol):
        assert row["sweep_s"] >= res["stats_s"] + row["setup_s"]
        assert row["correct_s"] > res["stats_s"]
