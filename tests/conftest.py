"""Shared fixtures and settings of the whole suite.

The folders follow the package's layers: ``core/`` (the SAP pipeline), ``backends/`` (kernels
and their routing), ``cli/`` (the ``sap-fast`` command, its report and file writes) and
``experiments/`` (the digits demo, label noise, baselines, comparison harness, model zoo and
the benchmark scripts' smoke runs). Support code every folder imports lives beside this file:
``support.py`` (small models of every layer kind, comparisons), ``baseline_support.py`` (a tiny
memorising MLP) and ``dist_support.py`` (spawned gloo ranks).

Markers: ``slow`` marks the tests that take several seconds each (fresh processes, the 100-epoch
digits model, the benchmark scripts); ``python -m pytest -m "not slow" tests`` leaves them out.

The suite runs in parallel under pytest-xdist (``make test``: ``-n auto --dist loadgroup``, one
worker process per core). Tests that share an expensive result that is not a fixture carry the
same ``xdist_group`` mark, so one worker runs them one after another: ``digits-models`` for the
trained digits models of the run's cache (the first such test trains a model, the others read
it), ``clothing1m-tree`` for the trained model of tests/cli/test_correct_at_scale.py, and
``gloo-2-ranks``/``gloo-3-ranks`` for the spawned ranks of tests/core/test_distributed.py (one
spawn per world size). The tests marked slow are handed out first, so that the long ones start at
once and the short ones fill in around them. The suite also runs as it is without pytest-xdist.

Trained digits models go to one fresh folder per test run (``SAP_FAST_CACHE``, set for every
test and every process a test starts, in every worker), so a model is trained at most once per
run, whichever tests need it, and never read from or written to the user's own cache.
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
torch.set_num_threads(1)  # tiny tensors gain nothing from a second thread; the other cores run other workers


_MODEL_CACHE = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes several seconds (deselect with -m \"not slow\")")
    config.addinivalue_line("markers", "xdist_group(name): tests that run on one pytest-xdist worker, in turn")
    # the run's model cache, named before any test module is imported or any process started; a
    # worker uses the folder of the run that started it, which removes it at the end
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "sap_fast_model_cache" in workerinput:
        _MODEL_CACHE.update(folder=workerinput["sap_fast_model_cache"], owner=False)
    else:
        _MODEL_CACHE.update(folder=tempfile.mkdtemp(prefix="sap_fast-model-cache-"), owner=True)
    _MODEL_CACHE["before"] = os.environ.get("SAP_FAST_CACHE")
    os.environ["SAP_FAST_CACHE"] = _MODEL_CACHE["folder"]


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first, each set in its own order: under pytest-xdist the long ones
    start at once, and the many short ones fill the workers around them, instead of one long
    test ending the run on one worker while the others wait."""
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: each worker is told the run's model cache
def pytest_configure_node(node):
    node.workerinput["sap_fast_model_cache"] = _MODEL_CACHE["folder"]


def pytest_unconfigure(config):
    if _MODEL_CACHE:
        if _MODEL_CACHE["owner"]:
            shutil.rmtree(_MODEL_CACHE["folder"], ignore_errors=True)
        if _MODEL_CACHE["before"] is None:
            os.environ.pop("SAP_FAST_CACHE", None)
        else:
            os.environ["SAP_FAST_CACHE"] = _MODEL_CACHE["before"]


@pytest.fixture(scope="session", autouse=True)
def model_cache():
    """The trained-model cache of this test run: one folder, empty when the run starts, that
    ``SAP_FAST_CACHE`` names for every test and every process a test starts
    (``sap_fast.experiments.digits.default_cache_dir`` reads it), in every worker. It is made
    and named in pytest_configure, before any test module is imported."""
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
