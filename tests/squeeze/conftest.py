import pytest


@pytest.fixture(autouse=True, scope="module")
def _squeeze_one_thread(one_thread):
    """Squeeze tests use tiny tensors: one thread (8x faster when other jobs hold the 2 cores)."""
    yield
