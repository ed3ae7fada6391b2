"""Each stage's chooser: what ``backend_info()`` and ``sap-fast info`` say each stage picks is the
implementation that runs. Every implementation's ``run`` is wrapped to record its name and the
call's description; ``collect_stats`` and ``correct`` then run a small conv + linear model on the
CPU under a few switch settings, and every recorded call is compared with the choice reported
for a call of the same description."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

import sap_fast
from sap_fast.backends import dispatch, gram, info, linalg, native, update
from sap_fast.backends.dispatch import Stage
from sap_fast.cli import main as cli_main

from .triton_support import update_stage_that_fails_to_compile

STAGE_HOMES = {"gram": (gram, "GRAM"), "eigh": (linalg, "EIGH"), "cholesky": (linalg, "CHOLESKY"),
               "update": (update, "UPDATE")}


@pytest.fixture
def recorded(monkeypatch):
    """(stage, call description, implementation) of every stage call that runs."""
    calls = []
    for stage_name, (module, attr) in STAGE_HOMES.items():
        stage = getattr(module, attr)

        def wrap(impl, stage_name=stage_name):
            def run(inputs):
                calls.append((stage_name, inputs.describe(), impl.name))
                return impl.run(inputs)
            return dataclasses.replace(impl, run=run)

        monkeypatch.setattr(module, attr, Stage(stage.name, tuple(wrap(i) for i in stage.implementations)))
    return calls


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    return model, torch.randn(12, 3, 8, 8)


def reported(capsys) -> dict:
    """(stage, call description) → chosen, from backend_info() and from ``sap-fast info``'s text;
    the two must agree."""
    from_info = {(stage, entry["call"]): entry["chosen"]
                 for stage, by_device in sap_fast.backend_info()["choosers"].items()
                 for entries in by_device.values() for entry in entries}
    assert cli_main(["info"]) == 0
    text = capsys.readouterr().out
    printed, stage = {}, None
    for line in text.splitlines():
        if line.startswith("stage "):
            stage = line[len("stage "):-1]
        elif stage and re.match(r"^  \S", line):
            call, chosen = re.match(r"^  (.*): (\S+) \(", line).groups()
            printed[(stage, call)] = chosen
    assert printed == from_info
    return from_info


def run_pipeline(solver="eigh"):
    model, x = model_and_data()
    sap_fast.correct(model, x, alpha=30.0, solver=solver, batch_size=6)


def check(recorded, capsys, stages=("gram", "update")):
    choices = reported(capsys)
    assert {stage for stage, _, _ in recorded} >= set(stages)
    for stage, call, name in recorded:
        assert (stage, call) in choices, f"{stage}: no reported choice for a call like {call!r}"
        assert choices[(stage, call)] == name, (stage, call)
    return {(stage, call): name for stage, call, name in recorded}


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_the_default_choice_is_what_runs(recorded, capsys, monkeypatch, solver):
    monkeypatch.delenv("SAP_FAST_BACKEND", raising=False)
    monkeypatch.delenv("SAP_FAST_GRAM_KERNEL", raising=False)
    run_pipeline(solver)
    ran = check(recorded, capsys, stages=("gram", "eigh", "update") if solver == "eigh" else ("gram", "cholesky"))
    if native.native() is not None:  # the 3×3 convs on the C++ kernels (shift at stride 1, direct
        # at stride 2), rows for the rest
        assert ran[("gram", "cpu 3×3 conv, stride 1×1, float32 inputs, fp32 precision, float64 Gram")] == "shift"
        assert ran[("gram", "cpu 3×3 conv, stride 2×2, float32 inputs, fp32 precision, float64 Gram")] == "direct"
    assert all(name in ("rows", "shift", "direct", "torch") for name in ran.values())


def test_forced_portable_is_rows_and_torch_everywhere(recorded, capsys, monkeypatch):
    monkeypatch.setenv("SAP_FAST_BACKEND", "portable")
    run_pipeline("eigh")
    run_pipeline("cholesky")
    ran = check(recorded, capsys, stages=("gram", "eigh", "cholesky", "update"))
    assert {name for (stage, _), name in ran.items() if stage == "gram"} == {"rows"}
    assert {name for (stage, _), name in ran.items() if stage != "gram"} == {"torch"}


def test_the_interpreted_triton_kernel_is_reported_and_runs(recorded, capsys, monkeypatch):
    tl_gram = pytest.importorskip("sap_fast.backends.triton.gram")
    if not tl_gram.interpreted():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1 before import)")
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", "triton")
    model, x = model_and_data()
    sap_fast.collect_stats(model, x[:4], batch_size=4, show_progress=False)
    ran = check(recorded, capsys, stages=("gram",))
    assert {name for (stage, _), name in ran.items() if stage == "gram"} == {"triton-interpreter"}


def test_a_compile_failure_is_reported_as_a_reason_and_the_next_implementation_runs(recorded, capsys,
                                                                                     monkeypatch):
    """The chooser's own compile fallback: the failing implementation is skipped from then on,
    with why among its reasons, and the reported choice moves on with it."""
    from sap_fast.backends import triton as triton_backend
    monkeypatch.setattr(triton_backend, "_BROKEN", {})
    stage = update_stage_that_fails_to_compile()
    with pytest.warns(RuntimeWarning, match="Triton update kernel does not compile here"):
        assert dispatch.call(stage, None) == "torch"
    chosen, skipped = dispatch.choose(stage, None)
    assert chosen.name == "torch"
    assert skipped[0][0] == "triton" and "does not compile here" in skipped[0][1][0]
    cuda_update = sap_fast.backend_info()["choosers"]["update"]["cuda"][0]
    assert any("does not compile here" in r for s in cuda_update["skipped"] for r in s["reasons"])


def test_every_implementation_gives_one_line_reasons():
    for device_type in info.DEVICE_TYPES:
        for stage, calls in info.representative_calls(device_type).items():
            for call in calls:
                for impl in info.STAGES[stage].implementations:
                    for reason in impl.not_supported_reasons(call):
                        assert reason and "\n" not in reason, (stage, impl.name, reason)


def test_reasons_name_the_switch_that_selects_an_implementation(monkeypatch):
    monkeypatch.delenv("SAP_FAST_GRAM_KERNEL", raising=False)
    conv = info.representative_calls("cuda")["gram"][0]
    assert "SAP_FAST_GRAM_KERNEL=shift selects it" in gram.GRAM["torch-shift"].not_supported_reasons(conv)
    eigh = info.representative_calls("cuda")["eigh"][0]
    assert "SAP_FAST_BATCHED_EIGH=cupy selects it" in linalg.EIGH["cupy-syevj"].not_supported_reasons(eigh)
    monkeypatch.setenv("SAP_FAST_BACKEND", "portable")
    conv = info.representative_calls("cpu")["gram"][0]
    assert gram.GRAM["shift"].not_supported_reasons(conv) == ["SAP_FAST_BACKEND=portable"]
    assert dispatch.choose(gram.GRAM, conv)[0].name == "rows"


def test_an_unknown_implementation_name_is_a_one_line_error():
    with pytest.raises(KeyError, match="stage gram has no implementation 'cutlass'"):
        gram.GRAM["cutlass"]


BACKENDS_DIR = __import__("os").path.dirname(gram.__file__)


def _backend_sources():
    import os
    for folder, _, files in os.walk(BACKENDS_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, BACKENDS_DIR), open(path, encoding="utf-8").read()


def test_the_switches_module_is_the_only_reader_of_the_environment():
    readers = [path for path, text in _backend_sources()
               if re.search(r"os\.environ|os\.getenv|getenv\(", text) and path != "switches.py"]
    assert readers == []


def test_backends_take_tensors_and_geometry_not_layers():
    """No torch.nn layer types in the backends: kernels take tensors and a ConvGeometry."""
    found = [(path, m.group(0)) for path, text in _backend_sources()
             for m in re.finditer(r"nn\.|torch import nn|CONV_TYPES", text)]
    assert found == []


def test_every_backends_module_declares_its_public_names():
    import importlib
    native.load()  # the op shape functions register against the loaded ops
    for path, text in _backend_sources():
        assert re.search(r"^__all__", text, re.M), f"{path} has no __all__"
        if path == "_ops.py" and native.load()[0] is None:
            continue
        dotted = "sap_fast.backends." + path[:-3].replace("/", ".").replace(".__init__", "")
        if dotted.startswith("sap_fast.backends.triton.") and importlib.util.find_spec("triton") is None:
            continue
        module = importlib.import_module(dotted)
        assert all(hasattr(module, name) for name in module.__all__), dotted


def test_the_kernels_take_a_geometry_or_the_arguments_it_is_built_from():
    from sap_fast.backends.geometry import conv_geometry
    from sap_fast.backends.shift import shift_gram
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    geometry = conv_geometry(x, [3, 2], [1, 1], [1, 0], [2, 1], 2, torch.float64)
    assert torch.equal(shift_gram(x, geometry=geometry, dtype=torch.float64),
                       shift_gram(x, [3, 2], [1, 0], [2, 1], 2, torch.float64))
    strided = conv_geometry(x, [3, 2], [2, 1], [1, 0], [2, 1], 2, torch.float64)
    with pytest.raises(ValueError, match="shift_gram: the shift form takes stride-1"):
        shift_gram(x, geometry=strided, dtype=torch.float64)
    tl_gram = pytest.importorskip("sap_fast.backends.triton.gram")
    args = ([3, 2], [2, 1], [1, 0], [2, 1], 2)
    assert torch.equal(tl_gram.conv_gram_reference(x, geometry=strided), tl_gram.conv_gram_reference(x, *args))
    if tl_gram.interpreted():
        assert torch.equal(tl_gram.conv_gram(x, geometry=strided, splits=1), tl_gram.conv_gram(x, *args, splits=1))


def test_info_json_is_backend_info(capsys):
    import json
    assert cli_main(["info", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["choosers"] == json.loads(json.dumps(sap_fast.backend_info()["choosers"]))
    assert set(printed["choosers"]) == {"gram", "eigh", "cholesky", "update"}
    assert printed["switches"]["SAP_FAST_BACKEND"] in ("auto", "portable")
    assert all(set(by_device) == {"cpu", "cuda"} for by_device in printed["choosers"].values())
