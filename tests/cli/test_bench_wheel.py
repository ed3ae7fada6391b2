"""``sap-fast bench`` from an installed wheel: the package without a source checkout around it
(site-packages/sap_fast, no benchmarks/ beside it) stops with one line and exit status 2, saying
how to get a checkout; inside a checkout it finds the checkout's benchmarks/."""
import os

from sap_fast.cli import bench, main
from support import REPO_ROOT


def test_a_checkout_finds_its_benchmarks_folder():
    assert bench.benchmarks_folder() == os.path.join(REPO_ROOT, "benchmarks")


def test_a_wheel_install_says_in_one_line_that_it_needs_a_checkout(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site-packages" / "sap_fast" / "cli"
    site.mkdir(parents=True)
    monkeypatch.setattr(bench, "__file__", str(site / "bench.py"))
    assert main(["bench", "--tiny", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("sap-fast bench: error: ") and "source checkout" in err
    assert "git clone" in err and "pip install -e ." in err
