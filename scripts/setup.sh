#!/usr/bin/env bash
# Creates .venv (if missing) with vLLM 0.26.0 (which brings torch 2.11.0) and this package, editable.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# vLLM brings ~8 GB (torch's CUDA build and its nvidia-* wheels); --no-cache-dir keeps pip from also keeping
# a second copy of every wheel in its cache, so a machine with ~10 GB free is enough.
if ! .venv/bin/python -c "import vllm" 2>/dev/null; then
  free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 10 ]; then
    echo "scripts/setup.sh: only ${free_gb} GB free here; installing vLLM 0.26.0 needs ~10 GB" >&2
  fi
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check --no-cache-dir -q)
echo "scripts/setup.sh: checking .venv (pip, setuptools, vllm==0.26.0; the first run downloads ~8 GB)"
"${PIP[@]}" install -U pip "setuptools>=77,<82" wheel
"${PIP[@]}" install "vllm==0.26.0"
echo "scripts/setup.sh: installing rtpurbo-vllm (editable)"
# --no-build-isolation: setup.py needs the installed torch to decide about the CUDA extension.
# setuptools always adds a 10-line notice to an editable install (folders named like the package may
# shadow it); it is informational and says nothing about this project, so it is not shown.
PYTHONWARNINGS="ignore:Editable installation" \
  "${PIP[@]}" install --no-build-isolation -e ".[test,calibrate,bench]"
echo "scripts/setup.sh: .venv is ready"
