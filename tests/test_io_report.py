"""Atomic writes (sap_fast.io) and the run report (sap_fast.report)."""
import json
import math
import os

import pytest
import torch
from torch import nn

import sap_fast
from sap_fast._runtime import io
from sap_fast.cli import report
from sap_fast.spectrum import LayerSpectrum, spectra


def _leftovers(folder):
    return [f for f in os.listdir(folder) if f.startswith(".sap_fast-")]


def test_interrupted_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"old contents")

    def half_then_ctrl_c(f):
        f.write(b"new con")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(path, half_then_ctrl_c)
    assert path.read_bytes() == b"old contents" and not _leftovers(tmp_path)


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("{}")

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        io.save_json(path, {"a": 1})
    assert path.read_text() == "{}" and not _leftovers(tmp_path)


def test_a_complete_write_replaces_the_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    io.save_json(path, {"t": torch.tensor([1.5, float("nan")]), "inf": math.inf, 2.0: torch.tensor(3)})
    assert json.loads(path.read_text()) == {"t": [1.5, None], "inf": None, "2.0": 3}


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        io.save_json(tmp_path / "nowhere" / "x.json", {})


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5.0)[::2]}   # a non-contiguous one too
    io.save_safetensors(tmp_path / "t.safetensors", tensors, metadata={"by": "test"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_layer_summary_on_a_known_spectrum():
    # e = [4, 3, 2, 1, 0] → s = [.4, .3, .2, .1, 0]; at α = 9: λ = 9s/(8s+1)
    spectrum = LayerSpectrum(torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]], dtype=torch.float64),
                             torch.eye(5, dtype=torch.float64).unsqueeze(0))
    out = report.layer_summary(spectrum, alpha=9.0)
    s = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert out["d"] == 5 and out["rank"] == 4 and out["basis"] == "full"
    # reports keep 6 significant digits
    assert out["effective_rank"] == pytest.approx(math.exp(float(-(s * s.log()).sum())), rel=1e-5)
    assert out["energy_top_1pct"] == pytest.approx(0.4) and out["energy_top_10pct"] == pytest.approx(0.4)
    lam = 9 * s / (8 * s + 1)   # [.878, .794, .692, .474]: three above one half
    assert out["lambda_gt_half"] == 3
    assert out["lambda_mean"] == pytest.approx(float(lam.sum()) / 5, rel=1e-5)


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randn(40, 1, 4, 4)
    y = (x.mean((1, 2, 3)) > 0).long()
    stats = sap_fast.collect_stats(model, x[:30])
    result = sap_fast.sweep(model, None, (x[30:], y[30:]), stats=stats, alphas=[10, 100])
    return result, spectra(stats)


def test_report_figure_and_files(run, tmp_path):
    result, layer_spectra = run
    fig = report.plot_report(sweep=result, spectra=layer_spectra, alpha=100.0,
                             test_accuracy={None: 0.5, 10.0: 0.6, 100.0: 0.7})
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 3 and any("accuracy" in t for t in titles) and any("spectra" in t for t in titles)
    spectrum_axis = next(ax for ax in fig.axes if "spectra" in ax.get_title())
    assert {line.get_label() for line in spectrum_axis.get_lines()} >= {"0 (d=9)", "3 (d=12)"}
    paths = report.write_report(tmp_path, sweep=result, spectra=layer_spectra, extra={"note": "x"})
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.load(open(paths["json"]))
    assert [r["alpha"] for r in data["sweep"]["rows"]] == [None, 10.0, 100.0]
    assert set(data["layers"]) == {"0", "3"} and data["extra"] == {"note": "x"}
    assert not _leftovers(tmp_path)


def test_stats_save_is_atomic(run, tmp_path, monkeypatch):
    stats = run[0].stats
    path = tmp_path / "stats.pt"
    stats.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        stats.save(path)
    assert path.read_bytes() == before and not _leftovers(tmp_path)
