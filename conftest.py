"""pytest settings shared by every test file.
- One torch thread: the tensors are tiny, and on shared cores a second intra-op thread only waits
  (10x slower).
- SMD_TEST_DEVICE=cuda python -m pytest runs the tests marked `device` (sampler/learner equality, the exact
  path, one training step per mode) on that device and skips the rest, which are CPU-only specifications."""
import os

import pytest
import torch

DEVICE = os.environ.get("SMD_TEST_DEVICE", "cpu")
EXTRA = "pip install -r requirements-extra.txt"  # what an optional part's skipped tests say to run


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "device: also runs on SMD_TEST_DEVICE (equality and training-step tests)")
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"SMD_TEST_DEVICE={DEVICE} but torch sees no GPU")


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cpu":
        return
    skip = pytest.mark.skip(
        reason=f"CPU-only specification (SMD_TEST_DEVICE={DEVICE} runs the 'device' tests)")
    for item in items:
        if "device" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
