"""Shared test setup: the ``gpu`` marker is skipped where no CUDA device exists (CI)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """A fresh seed per test run, printed so a failure can be replayed."""
    import os
    import random

    value = int(os.environ.get("RTPURBO_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    print(f"RTPURBO_TEST_SEED={value}")
    return value
