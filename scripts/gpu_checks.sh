#!/usr/bin/env bash
# GPU checks on the lent machine, after the vLLM bundle is staged and sourced (see
# ../shared/device/README.md): installs this package, then runs the end-to-end engine tests, the
# GPU kernel/prefill tests and the one-layer benchmark. Logs and results go under $OUT.
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
# -P: keep the repo root (and its triton_kernels/ folder) off sys.path.
timeout 240 python3 -P -m pytest -x -q -s -rs tests/e2e 2>&1 | tee "$OUT/e2e.log" | grep -vE "^(INFO|DEBUG|WARNING)"
timeout 100 python3 -P -m pytest -q -rs -m gpu tests/attention tests/kernels 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 150 python3 -P benchmarks/bench_attention.py ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench.log"
