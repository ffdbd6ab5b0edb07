"""Shared test setup: the ``gpu`` marker is skipped where no CUDA device exists (CI); on such machines
the Triton kernel launches of the whole session are recorded (``triton_launches.py``) so that the
last test can compile them for a GPU target."""

import importlib.util
import os
import pathlib

import pytest
import torch

_spec = importlib.util.spec_from_file_location("rtpurbo_triton_launches",
                                               pathlib.Path(__file__).with_name("triton_launches.py"))
triton_launches = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(triton_launches)
LAST = "test_recorded_launches_compile_for_hopper"
_RECORDER = triton_launches.LaunchRecorder()


def pytest_sessionstart(session):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        _RECORDER.install()


def pytest_sessionfinish(session, exitstatus):
    _RECORDER.uninstall()


@pytest.fixture(scope="session")
def triton_launch_recorder():
    """The session's :class:`LaunchRecorder` (records only on CPU machines under the interpreter)."""
    return _RECORDER


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.name.startswith(LAST))      # stable: only moves that test to the end
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
