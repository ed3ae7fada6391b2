"""The comparison table of benchmarks/README.md: SAP and every baseline on the digits default.

    python benchmarks/compare_methods.py            # 3 settings x 3 seeds, the full grids (~30 min on 1 core)
    python benchmarks/compare_methods.py --seeds 0 --grid defaults   # a quick look

Same options as ``sap-fast compare``; the results go to benchmarks/results/compare/ (``--out``
names another folder): ``compare.jsonl`` (every measurement of every trial, one record a line:
benchmarks/common.py), ``compare.md`` and ``compare.png``, the command's own table and plot. Each
method's hyperparameters are searched on the noisy validation split (trials counted), selection
included in its wall time; see sap_fast/experiments/compare.py for the budgets and grids,
docs/methods.md for the methods, and benchmarks/README.md for the table.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import cpu_device, records, write_lines  # noqa: E402

from sap_fast.cli import main  # noqa: E402

# the nesting of sap-fast compare's compare.json (benchmarks/common.flatten)
KEYED = {"corrective": ("setting", "method"), "privacy": "method", "budgets": "method", "grids": "method",
         "settings": "setting"}


def compare_records(report: dict, *, device: str, versions: dict, command: str, time=None) -> list:
    """``sap-fast compare``'s compare.json as records: every searched hyperparameter, the noise
    of each setting and the seeds are parameters; every accuracy, metric and time a measurement."""
    report = dict(report)
    keys = {k for grid in report.get("grids", {}).values() for entry in grid for k in entry} | {"rate", "epochs"}
    report["settings"] = {s: {"noise": kind, "rate": rate} for s, (kind, rate) in report.get("settings", {}).items()}
    return records(report, name="compare_methods", device=device, versions=versions, command=command, time=time,
                   keys=keys, keyed=KEYED)


def convert(folder: str) -> str:
    """Replace ``folder/compare.json`` (the command's report) by ``folder/compare.jsonl``."""
    from common import versions as found_versions

    source = os.path.join(folder, "compare.json")
    with open(source, encoding="utf-8") as f:
        report = json.load(f)
    env = report.pop("environment", {})
    versions = found_versions()
    versions.update({k: str(env[k]) for k in ("python", "torch") if k in env})
    extra = {k: env[k] for k in ("threads", "cpu_count") if k in env}
    rows = compare_records({**extra, **report}, device=cpu_device(), versions=versions,
                           command=env.get("command") or " ".join(["python"] + sys.argv), time=env.get("time"))
    target = os.path.join(folder, "compare.jsonl")
    write_lines(target, rows)
    os.remove(source)
    print(f"wrote {target} ({len(rows)} measurements)")
    return target


if __name__ == "__main__":
    argv = [part for arg in sys.argv[1:] for part in (arg.split("=", 1) if arg.startswith("--out=") else [arg])]
    if "--out" not in argv:
        argv += ["--out", os.path.join(HERE, "results", "compare")]
    code = main(["compare", *argv])
    if code == 0:
        convert(argv[argv.index("--out") + 1])
    sys.exit(code)
