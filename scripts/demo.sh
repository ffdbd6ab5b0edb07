#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job on the CPU: the calibrated tiny model
# answers long-context retrieval prompts with dense attention and with RTPurbo attention.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rtpurbo-demo "$@"
