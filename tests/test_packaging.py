"""Packaging: the kernel folder maps into the package, the CUDA build says why it is skipped, and a
real wheel holds what `pip install .` users need."""

import configparser
import importlib.util
import re
import subprocess
import sys
import zipfile
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


def test_wheel_holds_kernels_tiny_model_and_entry_points(tmp_path, monkeypatch):
    """`pip wheel .` as `pip install .` builds it, without a single build warning: every kernel folder
    inside the package, the tiny model and its artifacts, the plugin and console-script entry points,
    and no pickle anywhere."""
    monkeypatch.setenv("RTPURBO_BUILD_CUDA", "0")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-w", str(tmp_path), str(ROOT)],
                           check=True, cwd=tmp_path, capture_output=True, text=True)
    assert not re.findall(r"\w+Warning: .*", build.stdout + build.stderr)
    (wheel,) = tmp_path.glob("rtpurbo_vllm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())

    for op in sorted(p.name for p in (ROOT / "triton_kernels").iterdir() if (p / "__init__.py").exists()):
        assert f"rtpurbo_vllm/triton_kernels/{op}/reference.py" in names, op
        assert f"rtpurbo_vllm/triton_kernels/{op}/__init__.py" in names, op
    assert not any(n.startswith("triton_kernels/") for n in names)
    for artifact in ("model/rtpurbo", "model/rtpurbo-kv1", "long_model/rtpurbo"):
        assert f"rtpurbo_vllm/tiny/{artifact}/indexer.safetensors" in names
        assert f"rtpurbo_vllm/tiny/{artifact}/rtpurbo_config.json" in names
    for model in ("model", "long_model"):
        assert {f"rtpurbo_vllm/tiny/{model}/model.safetensors", f"rtpurbo_vllm/tiny/{model}/config.json",
                f"rtpurbo_vllm/tiny/{model}/tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".pickle", ".bin"))]
    assert entry_points["vllm.general_plugins"]["rtpurbo"] == "rtpurbo_vllm.plugin:register"
    assert set(entry_points["console_scripts"]) == {"rtpurbo-calibrate", "rtpurbo-eval", "rtpurbo-demo"}
