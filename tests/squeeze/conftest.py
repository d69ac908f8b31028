import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Squeeze tests use tiny tensors: a second OpenMP thread only adds barrier waits, and on a shared
    2-core machine those waits dominate (8x slower when other jobs hold the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
