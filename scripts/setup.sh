#!/usr/bin/env bash
# Creates .venv (if missing) with vLLM 0.26.0 (which brings torch 2.11.0) and this package, editable.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -U pip "setuptools>=70,<82" wheel
"${PIP[@]}" install "vllm==0.26.0"
# --no-build-isolation: setup.py needs the installed torch to decide about the CUDA extension.
"${PIP[@]}" install --no-build-isolation -e ".[test,calibrate,bench]"
