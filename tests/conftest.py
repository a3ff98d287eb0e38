import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_build: compiles the CUDA ops")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (pytestmark = pytest.mark.usefixtures("one_thread")): on the
    shared 2-core machine, OpenMP threads spinning against other processes made tiny runs and the thousands
    of tiny ops of some tests over ten times slower. Module scope: module fixtures (training runs) see it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
