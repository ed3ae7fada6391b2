"""The benchmarks' one results schema (benchmarks/common.py): a payload becomes one record per
measurement with every number kept, the writer is atomic and keeps its call form, the reader
refuses what is not a record, and every results file in benchmarks/results/ is in the schema."""
import glob
import json
import os

import pytest

from support import BENCHMARKS, benchmark_module

common = benchmark_module("common")
RESULTS = sorted(glob.glob(os.path.join(BENCHMARKS, "results", "**", "*.jsonl"), recursive=True))


def test_a_payload_is_one_record_per_measurement_with_its_parameters():
    payload = {"threads": 2, "rows": [
        {"layer": "conv1", "batch": 2, "portable": {"seconds": 0.5, "extra_mb": 3.0}, "speedup": 1.5},
        {"layer": "conv2", "batch": 2, "portable": {"error": "out of memory"}}],
        "markdown": "| a table |", "times": [0.1, 0.2]}
    got = common.flatten(payload)
    assert got == [
        ({"threads": 2, "layer": "conv1", "batch": 2}, "portable.seconds", 0.5, {}),
        ({"threads": 2, "layer": "conv1", "batch": 2}, "portable.extra_mb", 3.0, {}),
        ({"threads": 2, "layer": "conv1", "batch": 2}, "speedup", 1.5, {}),
        ({"threads": 2, "layer": "conv2", "batch": 2, "error": "out of memory"}, "portable", None, {}),
        ({"threads": 2, "index": 0}, "times", 0.1, {}),
        ({"threads": 2, "index": 1}, "times", 0.2, {}),
    ]


def test_keyed_levels_become_parameters_and_a_verdict_keeps_its_target():
    v = common.verdict(1.2, 1.5)
    got = common.flatten({"results": {"resnet50": {"samples": 8, "modes": {"fp64": {"gram_s": 2.0,
                                                                                      "verdicts": {"floor": v}}}}}},
                         keyed={"results": "model", "modes": "mode"})
    assert got == [({"model": "resnet50", "samples": 8, "mode": "fp64"}, "gram_s", 2.0, {}),
                   ({"model": "resnet50", "samples": 8, "mode": "fp64"}, "verdicts.floor", 1.2,
                    {"verdict": {"target": "<= 1.5", "pass": True}})]
    nested = common.flatten({"corrective": {"sym10": {"sap": [{"seed": 0, "test": 0.9}]}}},
                            keyed={"corrective": ("setting", "method")})
    assert nested == [({"setting": "sym10", "method": "sap", "seed": 0}, "test", 0.9, {})]


def test_rows_that_would_read_the_same_are_told_apart_by_index():
    got = common.flatten({"rows": [{"seconds": 1.0}, {"seconds": 2.0}]})
    assert got == [({"index": 0}, "seconds", 1.0, {}), ({"index": 1}, "seconds", 2.0, {})]
    assert common.tree(common.records({"rows": [{"a": {"b": 1.0}, "c": [3, 4]}]}, name="x", device="cpu",
                                      versions={}, command="c")) == {"a": {"b": 1.0}, "c": [3, 4]}


def test_write_results_keeps_its_call_form_and_writes_the_schema_atomically(tmp_path):
    path = tmp_path / "sub" / "conv.jsonl"
    rows = common.write_results(str(path), {"rows": [{"case": "3x3", "seconds": 0.25}]}, threads=2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    (row,) = common.read_results(str(path))
    assert set(common.SCHEMA) <= set(row)
    assert row["parameters"] == {"threads": 2, "case": "3x3"} and (row["metric"], row["value"]) == ("seconds", 0.25)
    assert row["device"].startswith("cpu: ") and row["device"].endswith(f"{os.cpu_count()} cores")
    assert {"python", "torch", "sap_fast"} <= set(row["versions"]) and row["command"].startswith("python ")
    assert common.value(common.read_results(str(path)), "seconds", case="3x3") == 0.25
    with pytest.raises(LookupError, match="0 records of 'seconds' with case='1x1', not one"):
        common.value(rows, "seconds", case="1x1")
    # a payload that cannot be written leaves the file as it was and no temporary beside it
    with pytest.raises(TypeError):
        common.write_results(str(path), {"rows": [{"seconds": 1.0}]}, keys=5)
    assert common.read_results(str(path)) == rows and os.listdir(path.parent) == ["conv.jsonl"]


def test_the_reader_names_a_line_that_is_not_a_record(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text('{"meta": {"command": "python x.py"}, "rows": []}\n')
    with pytest.raises(ValueError, match=r"old.jsonl:1 is not a benchmark record \(no name, device"):
        common.read_results(str(path))
    path.write_text(json.dumps(common.record("n", "seconds", 1.0, device="cpu", versions={}, command="c"))
                    + '\n{"name": "n", "dev')
    assert len(common.read_results(str(path), partial=True)) == 1


def test_the_results_folder_holds_only_records():
    assert len(RESULTS) >= 14 and not glob.glob(os.path.join(BENCHMARKS, "results", "**", "*.json"), recursive=True)
    for path in RESULTS:
        rows = common.read_results(path)
        assert rows, path
        for row in rows:
            assert isinstance(row["name"], str) and row["name"], path
            assert isinstance(row["device"], str) and row["device"], path
            assert isinstance(row["versions"], dict) and "torch" in row["versions"], path
            assert isinstance(row["parameters"], dict) and isinstance(row["metric"], str) and row["metric"], path
            assert row["value"] is None or isinstance(row["value"], (int, float)), path
            assert isinstance(row["command"], str) and row["command"].strip(), path
