"""Every verdict a GPU suite phase wrote, as one table: each measured item against its target.

    python3 benchmarks/verdicts.py OUT        # OUT: the folder benchmarks/gpu_suite.sh wrote

Reads the streamed records ``OUT/<phase>.jsonl`` (benchmarks/gpu_gram.py and gpu_e2e.py write one
record a line, in the schema of benchmarks/common.py; a record with a ``verdict`` is a measurement
against its target, one with ``skipped`` says what did not fit the time; the final results,
``OUT/<phase>-results.jsonl``, repeat them and are not read) and the pytest JUnit files
``OUT/*.xml``. A verdict is PASS, FAIL, OPEN (a lower bound that has not yet reached its target:
the baseline was capped by time) or SKIPPED. On a machine without a GPU the targets mean nothing
(they are an H100's): the table says so in its first line. Exit status 0 unless a test failed or
a result file cannot be read (a FAIL against a target is a finding, not an error of the run).
"""
from __future__ import annotations

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

SCHEMA = ("name", "device", "versions", "parameters", "metric", "value", "command")  # benchmarks/common.py
FINAL = "-results.jsonl"  # a phase's final results file beside its stream


def _label(model, what, mode=None) -> str:
    return " ".join(str(p) for p in (model, mode, what) if p)


def records(path: str, broken: list):
    """The whole records of a stream, in order; a line cut by a kill (or not a record) goes to
    ``broken`` as ``path:line`` and everything before and after it still counts."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or any(k not in row for k in SCHEMA):
                broken.append(f"{path}:{number}")
                continue
            yield row


def streams(out: str):
    return [p for p in sorted(glob.glob(os.path.join(out, "*.jsonl"))) if not p.endswith(FINAL)]


def _item(rec: dict):
    """(label, where) of a verdict record: its check's name, and the mode or solver it is of."""
    p, metric = rec["parameters"], rec["metric"]
    where = p.get("mode") or p.get("solver")
    if metric.startswith("verdicts."):
        return metric[len("verdicts."):], where
    if metric == "verdict":  # a check of its own kind (the oracle)
        return p.get("kind") or metric, where
    if metric.startswith("speedup_vs_official."):  # one speed-up per mode or solver, against the same baseline
        capped = f" (capped at {p.get('time_cap_s') or 0:.0f} s)" if p.get("capped") else ""
        return f"{metric.split('.', 1)[1]} speed-up vs official{capped}", None
    return metric, where


def verdict_rows(out: str):
    """(item, value, target, verdict) per measured item, in file order."""
    rows, broken = [], []
    for path in streams(out):
        phase = os.path.basename(path)[:-len(".jsonl")]
        for rec in records(path, broken):
            p = rec["parameters"]
            if "skipped" in rec:
                what = p.get("mode") or p.get("solver") or p.get("check") or ""
                rows.append((f"{phase}: " + _label(p.get("model"), p.get("check") if p.get("mode") else "", what),
                             "", "", f"SKIPPED ({rec['skipped']})"))
            elif "verdict" in rec:
                name, where = _item(rec)
                v = {**rec["verdict"], "value": rec["value"]}
                rows.append((f"{phase}: " + _label(p.get("model"), name, where), _fmt(v["value"]),
                             v.get("target", ""), _word(v)))
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
    """The device the first whole record of a stream names."""
    for path in streams(out):
        for rec in records(path, []):
            return rec["device"] or "?"
    return "?"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python3 benchmarks/verdicts.py OUT (the folder benchmarks/gpu_suite.sh wrote)", file=sys.stderr)
        return 2
    rows, broken = verdict_rows(argv[0])
    device = device_of(argv[0])
    note = "" if not (device == "?" or device.startswith("cpu")) else " (no GPU: the targets are an H100's, these verdicts mean nothing)"
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
