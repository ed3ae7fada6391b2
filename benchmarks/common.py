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
    with open(path, "w") as f:
        json.dump({"meta": meta, **payload}, f, indent=2)
    print(f"wrote {path}")
