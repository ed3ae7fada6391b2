"""The comparison table of benchmarks/README.md: SAP and every baseline on the digits default.

    python benchmarks/compare_methods.py            # 3 settings x 3 seeds, the full grids (~30 min on 1 core)
    python benchmarks/compare_methods.py --seeds 0 --grid defaults   # a quick look

Same options as ``sap-fast compare`` (this only changes where the results go):
benchmarks/results/compare/compare.{json,md,png}. Each method's hyperparameters are searched on
the noisy validation split (trials counted), selection included in its wall time; see
sap_fast/experiments/compare.py for the budgets and grids, docs/methods.md for the methods, and
benchmarks/README.md for the table.
"""
import os
import sys

from sap_fast.cli import main

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", os.path.join(here, "results", "compare")]
    sys.exit(main(["compare", *argv]))
