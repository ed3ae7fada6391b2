"""Shared by the benchmark scripts: one measurement per fresh process, the results files, and
the time a GPU run must end by.

Every benchmark result is a JSON-lines file, one measurement per line, each line a record

    {"name": "bench_native_cpu",                     # the benchmark (its script, by default)
     "device": "cpu: AMD EPYC, 2 cores",             # or the GPU's name
     "versions": {"python": ..., "torch": ..., "sap_fast": ..., "triton": ..., "cupy": ...},
     "parameters": {"layer": "resnet50.conv1", "batch": 2, "dtype": "float64", ...},
     "metric": "tiled.seconds",                      # what was measured (its unit is its last word)
     "value": 0.0299,                                # a number; null for an entry that measured
     "command": "python benchmarks/bench_native_cpu.py",   # nothing (an error, a skip)
     "time": "2026-11-22 00:09:51"}

plus, where they apply, ``"verdict": {"target": "<= 1.5", "pass": true}`` (a measurement against
its target, :func:`verdict`) and ``"skipped": "<why>"``. :func:`write_results` turns a script's
nested payload into these records (:func:`flatten`) and writes them atomically;
:class:`JsonLines` streams them one line at a time; :func:`read_results`, :func:`select`,
:func:`value` and :func:`tree` read them back.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple


def run_worker(code: str, env: Optional[dict] = None) -> dict:
    """Run ``code`` in a fresh Python (so its peak RSS is its own); the dict its last stdout line
    prints as JSON, or ``{"error": <last stderr line>}``."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return {"error": lines[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


SCHEMA = ("name", "device", "versions", "parameters", "metric", "value", "command")

# numbers that say what was measured rather than what came out (parameters, not measurements);
# a script names more with write_results(..., keys=...)
KEYS = frozenset({"batch", "batch_size", "d", "n", "K", "N", "out", "samples", "image_size", "threads",
                  "torch_threads", "workers", "ranks", "seed", "seeds", "trusted", "repeats", "draws",
                  "alphas", "arch", "epochs", "passes", "population", "noise_rate", "rate", "quantile_n_over_K",
                  "forget_fraction", "train_images", "val_images", "test_images", "noisy_train", "clean_train",
                  "clean_val", "clean_test", "retain", "forget", "local_samples", "index",
                  "alpha_count", "noise", "oracle_samples", "pool", "models", "selections", "layers",
                  "default", "tiles", "kernel", "mode", "dtype", "time_cap_s"})
# strings that render the numbers (tables for a README): printed by the scripts, not recorded
RENDERINGS = frozenset({"markdown", "table"})
# the top-level containers whose name a metric does not repeat
CONTAINERS = frozenset({"rows", "results", "records", "runs"})
# version strings a script may pass to write_results as meta (they go to "versions")
_VERSIONS = ("python", "torch", "triton", "cupy", "cuda", "nvrtc", "sap_fast", "pillow")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_verdict(v) -> bool:
    return isinstance(v, dict) and {"value", "target", "pass"} <= set(v)


def _is_parameter(key: str, v, keys) -> bool:
    if v is None or isinstance(v, (str, bool)):
        return True
    if _number(v):
        return key in keys
    if isinstance(v, list):
        return bool(v) and all(x is None or isinstance(x, (str, bool)) or _number(x) for x in v) and (
            key in keys or not all(_number(x) for x in v))
    return False


def flatten(payload: Dict[str, Any], *, keys: Iterable[str] = (), keyed: Optional[Dict[str, Any]] = None
            ) -> List[Tuple[dict, str, Any, dict]]:
    """A nested results payload as ``(parameters, metric, value, extra)`` per measurement, every
    number in it kept as it is.

    In every dict, the strings, booleans, None and the numbers named in ``keys`` (and
    :data:`KEYS`) are parameters of every measurement below it; every other number is a
    measurement, its metric the dotted path of dict keys down to it (a top-level
    :data:`CONTAINERS` name left out). A dict under a key of ``keyed`` maps a parameter's values
    to their measurements: ``keyed={"modes": "mode"}`` makes ``{"modes": {"fp64": {"gram_s": 1}}}``
    the measurement ``gram_s`` with parameter ``mode="fp64"``; a tuple of names reads that many
    levels (``{"corrective": ("setting", "method")}``). A list of numbers is one measurement
    per element (parameter ``index``); rows of a list that would read the same get ``index`` too.
    A verdict dict (:func:`verdict`) is one measurement with ``extra={"verdict": ...}``. An entry
    with parameters and no number (an error, a skip) is kept as a measurement of value None.
    :data:`RENDERINGS` (tables that render these numbers) are left out."""
    keys = KEYS | set(keys)
    keyed = keyed or {}
    out: List[Tuple[dict, str, Any, dict]] = []

    def walk(node, params: dict, path: List[str], top: bool = False) -> None:
        metric = ".".join(path)
        if _is_verdict(node):
            out.append((params, metric, node["value"], {"verdict": {k: v for k, v in node.items() if k != "value"}}))
        elif isinstance(node, dict):
            own, rest = dict(params), []
            for k, v in node.items():
                k = str(k)
                if k in RENDERINGS and isinstance(v, str):
                    continue
                if _is_parameter(k, v, keys):
                    name = k if own.get(k, v) == v else ".".join(path + [k])
                    own[name] = v
                else:
                    rest.append((k, v))
            before = len(out)
            for k, v in rest:
                if k in keyed and isinstance(v, dict):
                    by_key(v, own, path, (keyed[k],) if isinstance(keyed[k], str) else tuple(keyed[k]))
                else:
                    walk(v, own, path if top and k in CONTAINERS else path + [k])
            if len(out) == before and own != params:
                out.append((own, metric or "entry", None, {}))
        elif isinstance(node, list):
            if node and all(_number(x) for x in node):
                out.extend(({**params, "index": i}, metric or "value", x, {}) for i, x in enumerate(node))
                return
            parts = []
            for element in node:
                before = len(out)
                walk(element, params, path)
                parts.append(out[before:])
                del out[before:]
            seen = [(json.dumps(p, sort_keys=True, default=str), m) for part in parts for p, m, _, _ in part]
            if len(seen) != len(set(seen)):
                parts = [[({**p, "index": i}, m, v, e) for p, m, v, e in part] for i, part in enumerate(parts)]
            for part in parts:
                out.extend(part)
        elif _number(node) or node is None:
            out.append((params, metric or "value", node, {}))
        else:
            out.append(({**params, metric or "value": node}, metric or "entry", None, {}))

    def by_key(node, params: dict, path: List[str], names: Tuple[str, ...]) -> None:
        for key, sub in node.items():
            if len(names) > 1 and isinstance(sub, dict):
                by_key(sub, {**params, names[0]: key}, path, names[1:])
            else:
                walk(sub, {**params, names[0]: key}, path)

    walk(payload, {}, [], top=True)
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_device(model: Optional[str] = None, cores: Optional[int] = None) -> str:
    """``"cpu: <cpu model>, N cores"`` of this machine (or of the model and count given)."""
    return f"cpu: {model or _cpu_model()}, {cores or os.cpu_count()} cores"


def _dist_version(*names: str) -> Optional[str]:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> Dict[str, str]:
    """python, torch, sap_fast, and triton and cupy where they are installed (read from the
    installed distributions, without importing them)."""
    import torch

    import sap_fast

    out = {"python": platform.python_version(), "torch": torch.__version__, "sap_fast": sap_fast.__version__}
    for key, names in (("triton", ("triton",)), ("cupy", ("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x"))):
        found = _dist_version(*names)
        if found:
            out[key] = found
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def command_line() -> str:
    """The command line that runs this script (``python benchmarks/<script> ...``)."""
    return " ".join(["python"] + sys.argv)


def record(name: str, metric: str, value, parameters: Optional[dict] = None, *, device: str,
           versions: Dict[str, str], command: str, time: Optional[str] = None, **extra) -> dict:
    """One measurement in the results schema (:data:`SCHEMA`, plus ``time`` and ``extra``:
    ``verdict``, ``skipped``)."""
    row = {"name": name, "device": device, "versions": versions, "parameters": parameters or {},
           "metric": metric, "value": value, "command": command}
    if time is not None:
        row["time"] = time
    row.update(extra)
    return row


def records(payload: Dict[str, Any], *, name: str, device: str, versions: Dict[str, str], command: str,
            time: Optional[str] = None, keys: Iterable[str] = (), keyed: Optional[Dict[str, Any]] = None
            ) -> List[dict]:
    """``payload`` (:func:`flatten`) as records of one benchmark run. A top-level ``device``
    string names the device (a GPU's name; ``"cpu"`` keeps ``device``); a top-level ``skipped``
    string is a record of its own saying why the run measured nothing."""
    payload = dict(payload)
    named = payload.pop("device", None)
    if isinstance(named, str) and named != "cpu":
        device = named
    skipped = payload.pop("skipped", None) if isinstance(payload.get("skipped"), str) else None
    rows = [record(name, metric, value, params, device=device, versions=versions, command=command, time=time,
                   **extra) for params, metric, value, extra in flatten(payload, keys=keys, keyed=keyed)]
    if skipped is not None:  # a run that measured nothing, and why
        rows.append(record(name, "skipped", None, {}, device=device, versions=versions, command=command, time=time,
                           skipped=skipped))
    return rows


def write_lines(path: str, rows: Sequence[dict]) -> None:
    """Write ``rows`` (records), one JSON line each, atomically: the file is whole or absent."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # whole or absent: written beside, then renamed over
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_results(path: str, payload: Dict[str, Any], *, name: Optional[str] = None, keys: Iterable[str] = (),
                  keyed: Optional[Dict[str, Any]] = None, **meta) -> List[dict]:
    """Write ``payload`` as records (:func:`records`), one JSON line each, atomically (the file is
    whole or absent). ``name`` defaults to the script's name; device, versions, command and time
    are this run's. ``meta`` (e.g. ``threads=2``) adds parameters to every record; a ``command``
    or ``time`` there replaces the run's, a ``versions`` dict adds to them, and a dict of any
    other name is recorded as a version (e.g. ``backend=sap_fast.backend_info()``). Returns the
    records."""
    found = versions()
    extra: Dict[str, Any] = {}
    for key, v in meta.items():
        if key == "versions" or isinstance(v, dict):
            found.update(v if key == "versions" else {key: v})
        elif key in _VERSIONS and isinstance(v, str):
            found[key] = v
        else:
            extra[key] = v
    command = str(extra.pop("command", command_line()))
    when = str(extra.pop("time", time.strftime("%Y-%m-%d %H:%M:%S")))
    name = name or os.path.splitext(os.path.basename(sys.argv[0]))[0] or "benchmark"
    rows = records({**extra, **payload}, name=name, device=cpu_device(), versions=found, command=command,
                   time=when, keys=keys, keyed=keyed)
    write_lines(path, rows)
    print(f"wrote {path} ({len(rows)} measurements)")
    return rows


def read_results(path: str, *, partial: bool = False) -> List[dict]:
    """The records of a results file. A line that is not a whole record is an error naming the
    file and line; ``partial=True`` (a stream cut by a kill) stops at it instead."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                missing = [k for k in SCHEMA if k not in row]
            except json.JSONDecodeError:
                row, missing = None, ["a whole JSON line"]
            if missing:
                if partial:
                    break
                raise ValueError(f"{path}:{number} is not a benchmark record (no {', '.join(missing)}): "
                                 "write it with benchmarks/common.py's write_results or JsonLines")
            rows.append(row)
    return rows


def select(rows: Iterable[dict], metric: Optional[str] = None, **parameters) -> List[dict]:
    """The records of ``metric`` (any, if None) whose parameters include ``parameters``."""
    return [r for r in rows if (metric is None or r["metric"] == metric)
            and all(k in r["parameters"] and r["parameters"][k] == v for k, v in parameters.items())]


def value(rows: Iterable[dict], metric: str, **parameters):
    """The value of the one record of ``metric`` with ``parameters``; an error if none or several."""
    found = select(rows, metric, **parameters)
    if len(found) != 1:
        shown = ", ".join(f"{k}={v!r}" for k, v in parameters.items())
        raise LookupError(f"{len(found)} records of {metric!r} with {shown or 'no parameters'}, not one")
    return found[0]["value"]


def tree(rows: Iterable[dict]) -> Dict[str, Any]:
    """The nested view of some records (e.g. one row's, :func:`select`): each metric's dotted path
    as nested dicts down to its value; the records of one metric told apart by ``index`` as a
    list. The inverse of :func:`flatten` for the numbers of one entry."""
    out: Dict[str, Any] = {}
    for r in rows:
        parts = r["metric"].split(".") if r["metric"] else ["value"]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if "index" in r["parameters"]:
            series = node.setdefault(parts[-1], [])
            i = r["parameters"]["index"]
            series.extend([None] * (i + 1 - len(series)))
            series[i] = r["value"]
        else:
            node[parts[-1]] = r["value"]
    return out


class JsonLines:
    """Records (the results schema) streamed one line at a time, each flushed to disk as soon as
    it is written, so a run that times out or crashes keeps every line before it. ``path=None``
    writes nothing. ``device`` defaults to this machine's CPU, ``name`` to the script's name."""

    def __init__(self, path: Optional[str], *, name: Optional[str] = None, device: Optional[str] = None,
                 keys: Iterable[str] = (), keyed: Optional[Dict[str, Any]] = None):
        self.path = path
        self.name = name or os.path.splitext(os.path.basename(sys.argv[0]))[0] or "benchmark"
        self.device = device or cpu_device()
        self.keys, self.keyed = tuple(keys), keyed
        self.versions, self.command = (versions(), command_line()) if path else ({}, "")
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, row: Dict[str, Any]) -> None:
        """One entry of the run (a dict as :func:`flatten` reads it): its records. An entry of
        ``kind="skipped"`` is one record saying why (``reason``) and of what."""
        if not self.path:
            return
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        common = dict(device=self.device, versions=self.versions, command=self.command, time=when)
        if row.get("kind") == "skipped":
            params = {k: v for k, v in row.items() if k not in ("kind", "reason")}
            rows = [record(self.name, "skipped", None, params, skipped=str(row.get("reason")), **common)]
        else:
            rows = records(row, name=self.name, keys=self.keys, keyed=self.keyed, **common)
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
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


class PlainBar:
    """What a benchmark's tqdm bar does, without tqdm or with the bar off: ``write`` prints,
    the rest does nothing."""

    def write(self, text: str) -> None:
        print(text, flush=True)

    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar (on stderr) over ``total`` steps, or a :class:`PlainBar` without tqdm or when
    not ``enabled``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return PlainBar()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) if enabled else PlainBar()
