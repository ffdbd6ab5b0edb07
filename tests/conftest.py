"""Shared test setup: the ``gpu`` marker is skipped where no CUDA device exists (CI); on such machines
every Triton kernel launch of the session is recorded (``triton_launches.py``), and with
``--compile-launches`` (``scripts/test.sh`` passes it) the session ends by compiling each recorded launch
specialisation for sm_90 on the CPU: a kernel the GPU compiler rejects fails the run. Under pytest-xdist
each worker sends its launches to the controller, which compiles them all once the workers are done. The
kernel tests' paged-layout builders (``kernels/paged_layouts.py``) are importable as
``rtpurbo_paged_layouts`` (with ``--import-mode=importlib`` sibling test modules are not importable by
name)."""

import dataclasses
import importlib.util
import json
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
_RECORDER = triton_launches.LaunchRecorder()
_WORKER_LAUNCHES: dict[str, dict] = {}  # the controller's: the xdist workers' recorded launches by variant
LAUNCHES_KEY = "rtpurbo_triton_launches"
GPU_ARCH = 90


def pytest_addoption(parser):
    parser.addoption("--compile-launches", action="store_true",
                     help="end the session by compiling every Triton launch it recorded (CPU machines, "
                          f"TRITON_INTERPRET=1) for sm_{GPU_ARCH}; a launch that does not compile fails the run")


def pytest_sessionstart(session):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        _RECORDER.install()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:                              # an xdist worker: its share of the cores for torch's threads
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the xdist controller: keeps the launches a worker recorded."""
    _WORKER_LAUNCHES.update(json.loads(node.workeroutput.get(LAUNCHES_KEY, "{}")))


def _launches_by_variant() -> dict[str, dict]:
    """This process's recorded launch descriptions keyed by their variant (JSON): the key that makes
    launches from several workers one compile each."""
    return {json.dumps(dataclasses.astuple(variant)): launch for variant, launch in _RECORDER.launches.items()}


def pytest_sessionfinish(session, exitstatus):
    _RECORDER.uninstall()
    config = session.config
    if hasattr(config, "workeroutput"):          # an xdist worker: its launches go to the controller
        config.workeroutput[LAUNCHES_KEY] = json.dumps(_launches_by_variant())
    elif config.getoption("compile_launches"):
        _compile_recorded_launches(session, list({**_WORKER_LAUNCHES, **_launches_by_variant()}.values()))


def _compile_recorded_launches(session, launches: list[dict]) -> None:
    """Compiles the session's launches (one per variant) for the GPU target; a failure sets the exit
    status to 1.

    The interpreter runs kernels without Triton's GPU compiler, so the tests cannot see a kernel that the
    compiler rejects (Triton 3.6's layout pass once rejected the sink-merge kernel for an int64 index
    argument, found only on the GPU)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not launches:
        reporter.write_line(f"--compile-launches: no Triton launch recorded (GPU machine, or no kernel ran), "
                            f"nothing compiled for sm_{GPU_ARCH}")
        return
    kernels = {f"{launch['module']}.{launch['name']}" for launch in launches}
    reporter.write_line("")                      # ends the progress line
    reporter.write_sep("-", f"compiling {len(launches)} Triton launch specialisations of {len(kernels)} kernels "
                            f"for sm_{GPU_ARCH}")
    failures = triton_launches.compile_launches(launches, arch=GPU_ARCH, processes=os.cpu_count() or 1)
    if not failures:
        reporter.write_line(f"all {len(launches)} compiled")
        return
    reporter.write_sep("=", f"{len(failures)} Triton launches do not compile for sm_{GPU_ARCH}", red=True)
    for failure in failures:
        reporter.write_line(triton_launches.describe_failure(failure))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def triton_launch_recorder():
    """The session's :class:`LaunchRecorder` (records only on CPU machines under the interpreter)."""
    return _RECORDER


def pytest_collection_modifyitems(config, items):
    # The slow tests first (a stable sort): under pytest-xdist the short ones then fill the processes' ends.
    items.sort(key=lambda item: "slow" not in item.keywords)
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
