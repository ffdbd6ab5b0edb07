"""Packaging: the kernel folder maps into the package, and the CUDA build says why it is skipped."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_module(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("rtpurbo_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)   # defines the helpers; setup() runs only as __main__
    return module


def test_triton_kernels_install_inside_the_package(setup_module):
    packages, package_dir = setup_module._packages()
    assert package_dir == {"rtpurbo_vllm.triton_kernels": "triton_kernels"}
    assert "rtpurbo_vllm.triton_kernels.block_topp" in packages
    assert not any(p == "triton_kernels" or p.startswith("triton_kernels.") for p in packages)


def test_cuda_build_skipped_on_request_with_a_message(setup_module, monkeypatch, capsys):
    monkeypatch.setenv("RTPURBO_BUILD_CUDA", "0")
    assert setup_module._cuda_extensions() == ([], {})
    assert "not building the CUDA extension rtpurbo_vllm._C: RTPURBO_BUILD_CUDA=0" in capsys.readouterr().err


def test_cuda_build_forced_without_toolchain_fails_clearly(setup_module, monkeypatch):
    monkeypatch.setenv("RTPURBO_BUILD_CUDA", "1")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(setup_module.glob, "glob", lambda pattern: ["csrc/op.cu"] if pattern.endswith(".cu") else [])
    with pytest.raises(RuntimeError, match="RTPURBO_BUILD_CUDA=1 but the CUDA extension cannot be built: nvcc"):
        setup_module._cuda_extensions()
