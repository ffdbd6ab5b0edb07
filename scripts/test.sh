#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. GPU tests (marked `gpu`) are skipped
# where no CUDA device exists; Triton kernels run under the interpreter (TRITON_INTERPRET=1).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cpu_only=()
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
  # Without a GPU the tests spread over the CPU's cores (pytest-xdist, at most 4 processes), and the
  # session ends by compiling every Triton launch the tests made for sm_90 (tests/conftest.py). On a GPU
  # machine they run in one process: the GPU tests share the GPU one at a time.
  cpu_only=(--numprocesses auto --maxprocesses 4 --compile-launches)
fi
# `pytest`, not `python -m pytest`: the latter would put the repo root (and its triton_kernels/
# folder) on sys.path as a top-level package.
exec .venv/bin/pytest ${cpu_only[@]+"${cpu_only[@]}"} "$@"
