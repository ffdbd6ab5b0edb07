"""Shared test setup: the ``gpu`` marker is skipped where no CUDA device exists (CI); on such machines
the Triton kernel launches of the whole session are recorded (``triton_launches.py``) so that the
last test can compile them for a GPU target. The kernel tests' paged-layout builders
(``kernels/paged_layouts.py``) are importable as ``rtpurbo_paged_layouts`` (with
``--import-mode=importlib`` sibling test modules are not importable by name)."""

import importlib.util
import os
import pathlib
import sys

import pytest
import torch


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


triton_launches = _load("rtpurbo_triton_launches", pathlib.Path(__file__).with_name("triton_launches.py"))
_load("rtpurbo_paged_layouts", pathlib.Path(__file__).parent / "kernels" / "paged_layouts.py")
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
