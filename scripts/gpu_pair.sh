#!/usr/bin/env bash
# One benchmarks/bench_serving.py configuration on a 2-GPU machine, FLASH_ATTN on GPU 0 and RTPURBO on GPU 1 at
# the same time (half the wall time of gpu_checks.sh's one-after-the-other stages), then one merged report.
# Run after the vLLM bundle is staged and sourced and this package is installed (docs/BENCHMARKS.md).
#
#   bash scripts/gpu_pair.sh NAME SECONDS [bench_serving args...]
#
# NAME names the folders ($HOME/rtp_NAME_BACKEND, kept between calls so a later call merges into them);
# SECONDS bounds each backend's run. Defaults to the serve phase; pass --phases to change it. Examples:
#   bash scripts/gpu_pair.sh ttft 270 --contexts 32 128 --max-concurrency 1 --num-prompts 2
#   bash scripts/gpu_pair.sh decode 480 --decode-only --contexts 128 --max-concurrency 1 --output-len 512
#   bash scripts/gpu_pair.sh step 520 --phases latency --contexts 128 --latency-context 128 --latency-batch 4 \
#       --latency-output-len 1 513 --latency-iters 1
# Out ($OUT): NAME_BACKEND.log, NAME_BACKEND.tgz (vLLM logs and raw results), NAME.json / NAME.md (merged).
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 VLLM_WORKER_MULTIPROC_METHOD=spawn
name=${1:?NAME}; limit=${2:?SECONDS}; shift 2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
backends=(FLASH_ATTN RTPURBO)
for gpu in 0 1; do
  b=${backends[$gpu]}
  ( CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 -P benchmarks/bench_serving.py --out "$HOME/rtp_${name}_$b" \
      --backends "$b" --phases serve "$@" > "$OUT/${name}_$b.log" 2>&1
    echo "$name $b rc=$?" >> "$OUT/${name}_$b.log"
    tar czf "$OUT/${name}_$b.tgz" -C "$HOME/rtp_${name}_$b" logs raw ) &
done
wait
merged="$HOME/rtp_${name}_FLASH_ATTN"
python3 -P benchmarks/bench_serving.py --out "$merged" --merge "$HOME/rtp_${name}_RTPURBO" > "$OUT/$name.md"
cp "$merged/bench_serving.json" "$OUT/$name.json"
for b in "${backends[@]}"; do tail -1 "$OUT/${name}_$b.log"; done
grep -B2 -A12 '^| context' "$OUT/$name.md" | head -60
