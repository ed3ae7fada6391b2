import os
import sys

# Triton kernels run in its interpreter on machines without a GPU; the switch is read when a
# kernel module is imported, so it is set before anything imports one.
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/support.py
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors gain nothing from a second one, which stalls
    badly on shared cores (tests of small models take seconds instead of a minute)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
