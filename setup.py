"""Build script: maps ``triton_kernels/`` into the package and builds ``csrc/`` when it can.

``triton_kernels/`` is installed as ``rtpurbo_vllm.triton_kernels``, never as a top-level
``triton_kernels`` (vLLM probes that name for an unrelated PyPI package).

The tiny models' folders hold only data (weights, tokenizer, artifacts). Setuptools wants every
folder whose name could be imported listed as a package, so ``tiny/model``, ``tiny/model/rtpurbo``,
``tiny/long_model`` and ``tiny/long_model/rtpurbo`` are listed with their files as package data;
``rtpurbo-kv1`` is not an importable name and is data of ``tiny/model``.

The CUDA extension ``rtpurbo_vllm._C`` is built from ``csrc/`` only when nvcc and a CUDA build of
torch are both present; otherwise the build says why it skipped it and the package uses its Triton
kernels. ``RTPURBO_BUILD_CUDA=0`` skips the build, ``=1`` makes a missing toolchain an error.
Install with ``--no-build-isolation`` so the build sees the installed torch.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


# Data-only folders of the package -> their files.
PACKAGE_DATA = {
    "rtpurbo_vllm.tiny.model": ["*.json", "*.jinja", "*.safetensors", "rtpurbo-kv1/*.json",
                                "rtpurbo-kv1/*.safetensors"],
    "rtpurbo_vllm.tiny.model.rtpurbo": ["*.json", "*.safetensors"],
    "rtpurbo_vllm.tiny.long_model": ["*.json", "*.jinja", "*.safetensors"],
    "rtpurbo_vllm.tiny.long_model.rtpurbo": ["*.json", "*.safetensors"],
}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(include=["rtpurbo_vllm", "rtpurbo_vllm.*"]) + list(PACKAGE_DATA)
    kernel_pkgs = find_packages(where="triton_kernels")
    packages += ["rtpurbo_vllm.triton_kernels"]
    packages += [f"rtpurbo_vllm.triton_kernels.{p}" for p in kernel_pkgs]
    return packages, {"rtpurbo_vllm.triton_kernels": "triton_kernels"}


def _cuda_extensions():
    mode = os.environ.get("RTPURBO_BUILD_CUDA", "auto").lower()
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))

    def skip(reason: str):
        if mode == "1":
            raise RuntimeError(f"RTPURBO_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"[rtpurbo-vllm] not building the CUDA extension rtpurbo_vllm._C: {reason}; "
              "the Triton kernels will be used", file=sys.stderr)
        return [], {}

    if mode == "0":
        return skip("RTPURBO_BUILD_CUDA=0")
    if not sources:
        return skip("csrc/ holds no sources")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return skip("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable (install with --no-build-isolation after torch)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    ext = CUDAExtension(
        name="rtpurbo_vllm._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                     "-gencode=arch=compute_90,code=sm_90"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":
    packages, package_dir = _packages()
    ext_modules, cmdclass = _cuda_extensions()
    setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass,
          package_data=PACKAGE_DATA)
