"""Every verdict a GPU suite phase wrote, as one table: each measured item against its target.

    python3 benchmarks/verdicts.py OUT        # OUT: the folder benchmarks/gpu_suite.sh wrote

Reads ``OUT/*.jsonl`` (benchmarks/gpu_gram.py and gpu_e2e.py write one line per measurement,
each with its ``verdicts``; lines of kind ``skipped`` say what did not fit the time) and the
pytest JUnit files ``OUT/*.xml``. A verdict is PASS, FAIL, OPEN (a lower bound that has not yet
reached its target: the baseline was capped by time) or SKIPPED. On a machine without a GPU the
targets mean nothing (they are an H100's): the table says so in its first line. Exit status 0
unless a test failed or a result file cannot be read (a FAIL against a target is a finding, not
an error of the run).
"""
from __future__ import annotations

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET


def _label(model, what, mode=None) -> str:
    return " ".join(str(p) for p in (model, mode, what) if p)


def verdict_rows(out: str):
    """(item, value, target, verdict) per measured item, in file order."""
    rows, broken = [], []
    for path in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        phase = os.path.basename(path)[:-len(".jsonl")]
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: everything before it counts
                    broken.append(f"{path}:{number}")
                    continue
                kind = row.get("kind")
                if kind == "skipped":
                    what = row.get("mode") or row.get("solver") or row.get("check") or ""
                    rows.append((f"{phase}: " + _label(row.get("model"), row.get("check") if row.get("mode") else "", what),
                                 "", "", f"SKIPPED ({row.get('reason')})"))
                    continue
                checks = dict(row.get("verdicts") or {})
                if kind == "oracle":
                    checks = {"oracle": row["verdict"]}
                where = row.get("mode") or row.get("solver")
                if kind == "official":  # one speed-up per mode or solver, against the same baseline
                    capped = f" (capped at {row.get('time_cap_s', 0):.0f} s)" if row.get("capped") else ""
                    checks = {f"{k} speed-up vs official{capped}": v
                              for k, v in (row.get("speedup_vs_official") or {}).items()}
                for name, v in checks.items():
                    rows.append((f"{phase}: " + _label(row.get("model"), name, where),
                                 _fmt(v.get("value")), v.get("target", ""), _word(v)))
    for path in sorted(glob.glob(os.path.join(out, "*.xml"))):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            broken.append(path)
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        total = sum(int(s.get("tests", 0)) for s in suites)
        bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
        skipped = sum(int(s.get("skipped", 0)) for s in suites)
        ran = total - skipped
        rows.append((f"{os.path.basename(path)[:-4]}: pytest", f"{ran - bad}/{ran} passed, {skipped} skipped",
                     "all pass", "PASS" if bad == 0 and ran > 0 else ("FAIL" if bad else "SKIPPED (nothing ran)")))
    return rows, broken


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _word(v: dict) -> str:
    if v.get("value") is None:
        return "NOT MEASURED"
    if v.get("pass") is None:
        return "OPEN (lower bound)" if v.get("lower_bound") else "NOT MEASURED"
    return "PASS" if v["pass"] else "FAIL"


def device_of(out: str) -> str:
    for path in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if row.get("kind") == "setup":
                    return row.get("device") or "?"
    return "?"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python3 benchmarks/verdicts.py OUT (the folder benchmarks/gpu_suite.sh wrote)", file=sys.stderr)
        return 2
    rows, broken = verdict_rows(argv[0])
    device = device_of(argv[0])
    note = "" if device not in ("cpu", "?") else " (no GPU: the targets are an H100's, these verdicts mean nothing)"
    print(f"verdicts on {device}{note}")
    width = max([len(r[0]) for r in rows] + [4])
    for item, value, target, word in rows:
        print(f"{item:<{width}}  {value:>24}  {target:>9}  {word}")
    for where in broken:
        print(f"unreadable: {where} (cut short: a timeout or a crash)")
    failed_tests = any(r[0].endswith(": pytest") and r[3] == "FAIL" for r in rows)
    return 1 if failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
