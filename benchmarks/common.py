"""Shared by the benchmark scripts: one measurement per fresh process, and the results file."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Optional


def run_worker(code: str, env: Optional[dict] = None) -> dict:
    """Run ``code`` in a fresh Python (so its peak RSS is its own); the dict its last stdout line
    prints as JSON, or ``{"error": <last stderr line>}``."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return {"error": lines[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(path: str, payload: dict, **meta) -> None:
    """Write ``payload`` plus a ``meta`` block (command, versions, machine, time) as JSON."""
    import torch

    meta = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), **meta}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:  # whole or absent: written beside, then renamed over
            json.dump({"meta": meta, **payload}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {path}")


class JsonLines:
    """One JSON object per line, each flushed to disk as soon as it is written, so a run that
    times out or crashes keeps every line before it. ``path=None`` writes nothing."""

    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, row: dict) -> None:
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


class Deadline:
    """The time a run must end by: ``seconds`` from now, or the epoch time in the environment
    variable SAP_FAST_DEADLINE (set by benchmarks/gpu_suite.sh for the whole phase), whichever
    comes first; none when neither is given."""

    def __init__(self, seconds: Optional[float] = None):
        ends = []
        if seconds is not None:
            ends.append(time.time() + seconds)
        if os.environ.get("SAP_FAST_DEADLINE"):
            ends.append(float(os.environ["SAP_FAST_DEADLINE"]))
        self.end = min(ends) if ends else None

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.time()

    def allows(self, seconds: float) -> bool:
        """Whether ``seconds`` more still fit."""
        return self.left() >= seconds


def verdict(value: Optional[float], target: float, *, at_most: bool = True, bound: bool = False) -> dict:
    """A measured value against its target: ``{"value", "target", "pass"}``; ``pass`` is None
    when nothing was measured. ``bound=True``: ``value`` is a lower bound (``at_most=False``)
    of the real value (a capped baseline), so only a pass is conclusive; a miss is None."""
    if value is None or value != value:
        return {"value": None, "target": ("<= " if at_most else ">= ") + f"{target:g}", "pass": None}
    ok = value <= target if at_most else value >= target
    if bound and not ok:
        ok = None
    return {"value": value, "target": ("<= " if at_most else ">= ") + f"{target:g}", "pass": ok,
            **({"lower_bound": True} if bound else {})}


def add_lease_arguments(parser, official_seconds: float = 120.0) -> None:
    """The options that fit a GPU benchmark into a device lease (benchmarks/gpu_suite.sh):
    the official approach's time cap, the run's time budget, and the streamed results file."""
    parser.add_argument("--official-seconds", type=float, default=official_seconds,
                        help="time cap of the official approach per model (its times are then lower bounds)")
    parser.add_argument("--time-budget", type=float,
                        help="seconds this run may take; items that would not fit are skipped and said so "
                             "(also SAP_FAST_DEADLINE, an epoch time)")
    parser.add_argument("--jsonl", help="also write every measurement as one JSON line, flushed as it is made")
