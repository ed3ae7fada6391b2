"""Atomic writes (sap_fast._runtime.io) and the run report (sap_fast.cli.report): numbers, figure,
files."""
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import sap_fast
from sap_fast._runtime import io as sio
from sap_fast.cli.report import layer_summary, plot_report, report_data, write_report
from sap_fast.spectrum import LayerSpectrum, spectra

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _spectrum(*groups, d=None):
    e = torch.tensor(groups, dtype=torch.float64)
    d = d or e.shape[-1]
    return LayerSpectrum(e, torch.eye(d, dtype=torch.float64)[:, :e.shape[-1]].expand(e.shape[0], d, e.shape[-1]))


@pytest.fixture(scope="module")
def run():
    """A real (tiny) run: stats, spectra and a 2-α sweep."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    stats = sap_fast.collect_stats(model, x)
    result = sap_fast.sweep(model, None, (x, y), stats=stats, alphas=[10, 100])
    return result, spectra(stats)


# -- atomic_write ------------------------------------------------------------------------------
def _half_then(exc, flush=True):
    def write(f):
        f.write(b"half of the new")
        if flush:
            f.flush()
        raise exc
    return write


@pytest.mark.parametrize("flush", [True, False], ids=["flushed", "buffered"])
def test_atomic_write_interrupted_keeps_old_file(tmp_path, flush):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        sio.atomic_write(path, _half_then(KeyboardInterrupt(), flush))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(KeyboardInterrupt):  # no old file: nothing at all is left
        sio.atomic_write(tmp_path / "new.bin", _half_then(KeyboardInterrupt(), flush))
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_failed_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def failing_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(sio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        sio.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_save_json_failed_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("{}")

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        sio.save_json(path, {"a": 1})
    assert path.read_text() == "{}" and os.listdir(tmp_path) == ["report.json"]


def test_atomic_write_replaces_and_sets_permissions(tmp_path):
    path = tmp_path / "out.bin"
    sio.atomic_write(str(path), lambda f: f.write(b"first"))
    assert path.read_bytes() == b"first"
    assert (path.stat().st_mode & 0o777) == 0o666 & ~sio.current_umask()   # as open() would, not mkstemp's 0600
    os.chmod(path, 0o640)
    sio.atomic_write(path, lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second" and (path.stat().st_mode & 0o777) == 0o640
    assert os.listdir(tmp_path) == ["out.bin"]


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        sio.atomic_write(missing / "x.bin", lambda f: f.write(b""))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(missing, extra={"a": 1})
    with pytest.raises(FileNotFoundError, match="nope"):
        sio.save_json(missing / "x.json", {})
    assert not missing.exists()


# -- savers ------------------------------------------------------------------------------------
def test_save_json_converts_tensors_numpy_and_non_finite(tmp_path):
    path = tmp_path / "x.json"
    obj = {"t0": torch.tensor(2.5), "t": torch.tensor([[1, 2], [3, 4]]), "f32": torch.tensor([0.5, float("nan")]),
           "np": np.float32(1.5), "npi": np.int64(7), "arr": np.array([1.0, np.inf]), "nan": float("nan"),
           "inf": float("inf"), "ninf": -math.inf, "tuple": (1, None, True), 1.5: "float key", None: "none key",
           "dtype": torch.float64, "α": "ünïcode"}
    sio.save_json(path, obj)
    raw = path.read_bytes()
    assert "α".encode("utf-8") in raw and raw.endswith(b"\n")  # ensure_ascii=False, UTF-8
    back = json.loads(raw.decode("utf-8"))
    assert back == {"t0": 2.5, "t": [[1, 2], [3, 4]], "f32": [0.5, None], "np": 1.5, "npi": 7, "arr": [1.0, None],
                    "nan": None, "inf": None, "ninf": None, "tuple": [1, None, True], "1.5": "float key",
                    "null": "none key", "dtype": "torch.float64", "α": "ünïcode"}
    with pytest.raises(TypeError, match=r"value\['bad'\].*object"):
        sio.save_json(tmp_path / "bad.json", {"bad": object()})
    assert sorted(os.listdir(tmp_path)) == ["x.json"]
    # over an existing file: replaced whole
    sio.save_json(path, {"t": torch.tensor([1.5, float("nan")]), "inf": math.inf, 2.0: torch.tensor(3)})
    assert json.loads(path.read_text()) == {"t": [1.5, None], "inf": None, "2.0": 3}


def test_save_safetensors_and_torch_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "t": torch.randn(4, 3).T,
               "s": torch.arange(5.0)[::2]}  # two non-contiguous ones
    sio.save_safetensors(tmp_path / "w.safetensors", tensors, metadata={"alpha": "1000"})
    back = st.load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"alpha": "1000"}
    sio.save_torch(tmp_path / "w.pt", tensors)
    assert torch.equal(torch.load(tmp_path / "w.pt")["w"], tensors["w"])


def test_save_safetensors_without_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        sio.save_safetensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    assert os.listdir(tmp_path) == []


# -- report numbers ----------------------------------------------------------------------------
def test_layer_summary_on_a_known_spectrum():
    sp = _spectrum([4.0, 3.0, 2.0, 1.0, 0.0])   # s = .4 .3 .2 .1 0
    h = -sum(p * math.log(p) for p in (0.4, 0.3, 0.2, 0.1))
    out = layer_summary(sp, alpha=10.0)
    assert out["d"] == 5 and out["groups"] == 1 and out["r"] == 5 and out["basis"] == "full"
    assert out["rank"] == 4 and out["effective_rank"] == pytest.approx(math.exp(h), rel=1e-5)
    assert out["energy_top_1pct"] == out["energy_top_10pct"] == pytest.approx(0.4)  # ceil(.05), ceil(.5) = 1
    # λ > ½  ⇔  s > 1/(α+1): α = 10 keeps s ≥ .1 (4 directions), α = 3 keeps s > .25 (2)
    assert out["lambda_gt_half"] == 4
    lam = [10 * s / (9 * s + 1) for s in (0.4, 0.3, 0.2, 0.1, 0.0)]
    assert out["lambda_mean"] == pytest.approx(sum(lam) / 5, rel=1e-5)
    assert layer_summary(sp, alpha=3.0)["lambda_gt_half"] == 2
    assert layer_summary(sp)["lambda_gt_half"] is None
    # α = 9: s = .1 gives λ = ½ exactly, not above it (3 directions); λ = 9s/(8s+1)
    nine = layer_summary(sp, alpha=9.0)
    assert nine["lambda_gt_half"] == 3
    lam9 = [9 * s / (8 * s + 1) for s in (0.4, 0.3, 0.2, 0.1, 0.0)]
    assert nine["lambda_mean"] == pytest.approx(sum(lam9) / 5, rel=1e-5)  # 6 significant digits
    # 20 equal directions: top 1% = 1 direction, top 10% = 2; effective rank 20
    flat = layer_summary(_spectrum([1.0] * 20), alpha=100.0)
    assert flat["energy_top_1pct"] == pytest.approx(0.05) and flat["energy_top_10pct"] == pytest.approx(0.1)
    assert flat["effective_rank"] == pytest.approx(20) and flat["rank"] == 20 and flat["lambda_gt_half"] == 20


def test_layer_summary_groups_are_averaged_and_thin_bases_counted():
    grouped = layer_summary(_spectrum([4.0, 3.0, 2.0, 1.0, 0.0], [1.0] * 5), alpha=10.0)
    assert grouped["groups"] == 2 and grouped["rank"] == pytest.approx(4.5)
    assert grouped["lambda_gt_half"] == pytest.approx(4.5)          # 4 and 5 directions
    assert grouped["energy_top_1pct"] == pytest.approx((0.4 + 0.2) / 2)
    thin = layer_summary(_spectrum([3.0, 1.0], d=8), alpha=1e3)    # 2 rows of width 8
    assert (thin["d"], thin["r"], thin["basis"], thin["rank"]) == (8, 2, "thin", 2)
    assert thin["energy_top_10pct"] == pytest.approx(0.75)          # ceil(0.1 · 8) = 1 direction
    empty = layer_summary(_spectrum([0.0, 0.0, 0.0]), alpha=10.0)   # a layer that saw no energy
    assert (empty["rank"], empty["effective_rank"], empty["lambda_gt_half"]) == (0, 0, 0)


def test_report_data_from_a_real_sweep(run):
    result, specs = run
    data = report_data(sweep=result, spectra=specs, extra={"test_accuracy": 0.5, "seconds": torch.tensor(1.25)})
    json.dumps(data, allow_nan=False)  # plain JSON already
    assert data["alpha"] == result.best_alpha and data["alpha_source"] == "sweep"
    rows = data["sweep"]["rows"]
    assert [r["alpha"] for r in rows] == [None, 10.0, 100.0] and rows[0]["label"] == "no projection"
    assert [r["best"] for r in rows] == [r.alpha == result.best_alpha for r in result.table]
    assert [r["val_accuracy"] for r in rows] == [r.val_accuracy for r in result.table]
    assert set(data["layers"]) == {"0", "2"} and data["layers"]["0"]["d"] == 6
    assert data["extra"] == {"test_accuracy": 0.5, "seconds": 1.25}
    given = report_data(spectra=specs, alpha=100.0, test_accuracy={100.0: 0.7, None: 0.6})
    assert given["alpha_source"] == "given" and given["sweep"] is None
    assert [t["alpha"] for t in given["test_accuracy"]] == [None, 100.0]
    assert given["layers"]["2"]["lambda_gt_half"] is not None
    with pytest.raises(TypeError, match="spectra\\(stats\\)"):
        report_data(spectra=result.stats)


# -- figure and files --------------------------------------------------------------------------
def _legend_texts(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_plot_report_panels_lines_and_labels(run):
    pytest.importorskip("matplotlib")
    result, specs = run
    fig = plot_report(sweep=result, spectra=specs, alpha=10.0, test_accuracy={None: 0.3, 10.0: 0.4, 100.0: 0.35},
                      title="tiny")
    acc, spec, twin = fig.axes                                     # λ on a twin axis of the spectra
    assert acc.get_xscale() == "log" and spec.get_yscale() == "log" and twin.get_ylim() == (-0.02, 1.02)
    labels = [l.get_label() for l in acc.lines if not l.get_label().startswith("_")]
    assert labels[0] == "validation" and "test" in labels and "chosen α* = 10" in labels
    assert any(l.startswith("no projection, validation") and "--" == ln.get_linestyle()
               for ln in acc.lines for l in [ln.get_label()])
    solid = [l for l in spec.lines if l.get_linestyle() == "-"]
    assert len(solid) == 2 and len(twin.lines) == 2 and all(l.get_linestyle() == "--" for l in twin.lines)
    assert [l.get_color() for l in solid] == [l.get_color() for l in twin.lines]
    assert "0 (d=6)" in _legend_texts(fig) and "2 (d=8)" in _legend_texts(fig)
    assert fig._suptitle.get_text() == "tiny"
    # one panel each when the other input is missing; no twin without an α
    assert len(plot_report(sweep=result).axes) == 1
    assert len(plot_report(spectra=specs).axes) == 1
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_report()


def test_plot_report_caps_layers_evenly():
    pytest.importorskip("matplotlib")
    many = {f"layer{i}": _spectrum([float(20 - j) for j in range(20)]) for i in range(30)}
    spec, twin = plot_report(spectra=many, alpha=100.0).axes
    names = [t.split(" ")[0] for t in _legend_texts(spec.figure) if t.startswith("layer")]
    assert len(names) == 12 and names[0] == "layer0" and names[-1] == "layer29" and len(twin.lines) == 12
    assert "12 of 30 layers" in spec.get_title()


def test_write_report_files(run, tmp_path):
    pytest.importorskip("matplotlib")
    result, specs = run
    paths = write_report(tmp_path, sweep=result, spectra=specs, test_accuracy={None: 0.3, 10.0: 0.4},
                         extra={"noise": "symmetric 25%", "nan": float("nan")}, title="tiny run")
    assert paths == {"json": str(tmp_path / "report.json"), "png": str(tmp_path / "report.png")}
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 1000
    with open(paths["json"], encoding="utf-8") as f:
        data = json.load(f)
    assert data["title"] == "tiny run" and data["extra"] == {"noise": "symmetric 25%", "nan": None}
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.png"]  # no temporary left
    only_json = tmp_path / "only"
    only_json.mkdir()
    assert write_report(only_json, extra={"a": 1})["png"] is None and os.listdir(only_json) == ["report.json"]


@pytest.fixture(scope="module")
def conv_run():
    """A tiny conv model's run: a conv (d = 9) and a linear layer (d = 12)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randn(40, 1, 4, 4)
    y = (x.mean((1, 2, 3)) > 0).long()
    stats = sap_fast.collect_stats(model, x[:30])
    result = sap_fast.sweep(model, None, (x[30:], y[30:]), stats=stats, alphas=[10, 100])
    return result, spectra(stats)


def test_report_figure_and_files_of_a_conv_run(conv_run, tmp_path):
    pytest.importorskip("matplotlib")
    result, layer_spectra = conv_run
    fig = plot_report(sweep=result, spectra=layer_spectra, alpha=100.0,
                      test_accuracy={None: 0.5, 10.0: 0.6, 100.0: 0.7})
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 3 and any("accuracy" in t for t in titles) and any("spectra" in t for t in titles)
    spectrum_axis = next(ax for ax in fig.axes if "spectra" in ax.get_title())
    assert {line.get_label() for line in spectrum_axis.get_lines()} >= {"0 (d=9)", "3 (d=12)"}
    paths = write_report(tmp_path, sweep=result, spectra=layer_spectra, extra={"note": "x"})
    assert open(paths["png"], "rb").read(8) == PNG_SIGNATURE
    data = json.load(open(paths["json"]))
    assert [r["alpha"] for r in data["sweep"]["rows"]] == [None, 10.0, 100.0]
    assert set(data["layers"]) == {"0", "3"} and data["extra"] == {"note": "x"}
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.png"]


def test_stats_save_goes_through_atomic_write(run, tmp_path, monkeypatch):
    result, _ = run
    path = tmp_path / "stats.pt"
    path.write_bytes(b"old")
    monkeypatch.setattr(sio.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("no rename")))
    with pytest.raises(OSError, match="no rename"):
        result.stats.save(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["stats.pt"]
    monkeypatch.undo()
    result.stats.save(path)
    assert sap_fast.Stats.load(path).num_samples == 40 and os.listdir(tmp_path) == ["stats.pt"]
    saved = path.read_bytes()  # a failed save over a real earlier save keeps that one
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        result.stats.save(path)
    assert path.read_bytes() == saved and os.listdir(tmp_path) == ["stats.pt"]
