"""Fixtures shared by the CPU integration tests of the backend."""

import pytest


@pytest.fixture(scope="module")
def cpu_platform():
    from vllm import platforms
    from vllm.platforms.cpu import CpuPlatform

    previous = platforms.current_platform
    platforms.current_platform = CpuPlatform()
    yield
    platforms.current_platform = previous
