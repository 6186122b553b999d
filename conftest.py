"""pytest settings shared by every test file: one torch thread (the tensors are tiny, and on shared cores a
second intra-op thread only waits: measured 10x slower)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
