"""Shared fixtures and settings of the whole suite.

The folders follow the package's layers: ``core/`` (the SAP pipeline), ``backends/`` (kernels
and their routing), ``cli/`` (the ``sap-fast`` command, its report and file writes) and
``experiments/`` (the digits demo, label noise, baselines, comparison harness, model zoo and
the benchmark scripts' smoke runs). Support code every folder imports lives beside this file:
``support.py`` (small models of every layer kind, comparisons), ``baseline_support.py`` (a tiny
memorising MLP) and ``dist_support.py`` (spawned gloo ranks).

Markers: ``slow`` marks the tests that take several seconds each (fresh processes, the 100-epoch
digits model, the benchmark scripts); ``python -m pytest -m "not slow" tests`` leaves them out.
``prestart`` marks a slow test whose command runs in a fresh process started at the beginning of
the run, beside the other tests (tests/prestart.py).

Trained digits models go to one fresh folder per test run (``SAP_FAST_CACHE``, set for every
test and every process a test starts), so a model is trained at most once per run, whichever
tests need it, and never read from or written to the user's own cache.
"""
import os
import shutil
import sys
import tempfile

import pytest
import torch

# Triton kernels run in its interpreter on machines without a GPU; the switch is read when a
# kernel module is imported (by any test, in any folder), so it is set before anything imports
# one. tests/backends/triton_support.py checks it and skips with the reason when it came too late.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # support.py and its siblings
torch.set_num_threads(1)  # tiny tensors gain nothing from a second thread; the background commands (tests/prestart.py) take the other core

import prestart  # noqa: E402


_MODEL_CACHE = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes several seconds (deselect with -m \"not slow\")")
    config.addinivalue_line("markers", "prestart(name): the test's command starts early, in the background "
                                       "(tests/prestart.py)")
    # the run's model cache, named before any test module is imported or any process started
    _MODEL_CACHE.update(folder=tempfile.mkdtemp(prefix="sap_fast-model-cache-"),
                        before=os.environ.get("SAP_FAST_CACHE"))
    os.environ["SAP_FAST_CACHE"] = _MODEL_CACHE["folder"]


@pytest.hookimpl(trylast=True)  # after -m/-k have deselected what will not run
def pytest_collection_modifyitems(config, items):
    """Start the commands of the selected tests marked ``prestart`` (in their order), unless the
    run only lists the tests."""
    if config.option.collectonly:
        return
    names = []
    for item in items:
        for mark in item.iter_markers("prestart"):
            names += [n for n in mark.args if n not in names]
    prestart.start(names)


def pytest_unconfigure(config):
    prestart.stop_all()
    if _MODEL_CACHE:
        shutil.rmtree(_MODEL_CACHE["folder"], ignore_errors=True)
        if _MODEL_CACHE["before"] is None:
            os.environ.pop("SAP_FAST_CACHE", None)
        else:
            os.environ["SAP_FAST_CACHE"] = _MODEL_CACHE["before"]


@pytest.fixture(scope="session", autouse=True)
def model_cache():
    """The trained-model cache of this test run: one folder, empty when the run starts, that
    ``SAP_FAST_CACHE`` names for every test and every process a test starts
    (``sap_fast.experiments.digits.default_cache_dir`` reads it). It is made and named in
    pytest_configure, so that the processes started before the first test see it too."""
    folder = _MODEL_CACHE["folder"]
    assert os.environ.get("SAP_FAST_CACHE") == folder
    return folder


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors gain nothing from a second one, which stalls
    badly on shared cores (tests of small models take seconds instead of a minute)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def keep_threads():
    """Restores torch's thread count after a test that runs a command in this process (the
    ``demo`` and ``compare`` commands set it for their own run)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
