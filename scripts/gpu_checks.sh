#!/usr/bin/env bash
# GPU checks on the lent machine, after the vLLM bundle is staged and sourced and this package is
# installed (see ../shared/device/README.md and docs/BENCHMARKS.md). One stage per call, so each fits
# in one device command; logs and results go under $OUT.
#
#   bash scripts/gpu_checks.sh tests [kernels]  # GPU kernel/prefill tests (+ vllm.LLM engine tests)
#   bash scripts/gpu_checks.sh cudagraph  # full CUDA graphs of decode steps: FULL vs PIECEWISE vs eager tokens
#   bash scripts/gpu_checks.sh serve [pytest args]   # vllm serve, tiny model: accuracy, preemption, TP=2, V1
#   bash scripts/gpu_checks.sh layer [args]  # benchmarks/bench_attention.py (one layer vs FA3)
#   bash scripts/gpu_checks.sh topp [KEY=V1,V2 ...]  # benchmarks/bench_block_topp.py: decode block top-p per setting
#   bash scripts/gpu_checks.sh serving BACKEND [extra bench_serving args]   # vllm bench serve, 8B dummy
#   bash scripts/gpu_checks.sh ttft [K...] [flags]  # TTFT at concurrency 1, FLASH_ATTN and RTPURBO (default 32K, 128K)
#   bash scripts/gpu_checks.sh decode     # TPOT/ITL of decode alone at 128K, c1, FLASH_ATTN and RTPURBO (primed)
#   bash scripts/gpu_checks.sh latency BACKEND [flags]  # decode step, 128K batch 4, engine only (`vllm bench latency`)
#   (decode step at batch 4, engine only, and other two-GPU runs: scripts/gpu_pair.sh, one backend per GPU)
#   bash scripts/gpu_checks.sh kvsplit N  # RTPURBO, compact KV layout, N retrieval KV heads per layer: capacity, 8 x 128K
#   bash scripts/gpu_checks.sh capacity   # KV capacity: FLASH_ATTN, compact layout with 2 KV heads/layer, global top 15 %
#   bash scripts/gpu_checks.sh eval [tiny|long] [RTPURBO server args]  # rtpurbo-eval --compare, RTPURBO vs
#                                         # FLASH_ATTN servers: tiny model at 1K/2K, or the long-context model at 4K/8K/16K
#   bash scripts/gpu_checks.sh stability [extra bench_stability args]  # 200 x 4K-128K requests (1B dummy): no
#                                         # errors, blocks freed; tiny model: batched = one-at-a-time greedy outputs (ties aside)
#                                         # (phases merge: after a timeout, `stability --phases identity` finishes)
#   bash scripts/gpu_checks.sh stability-control   # the identity check on FLASH_ATTN (the control)
#   bash scripts/gpu_checks.sh firstreq [extra bench_first_requests args]  # first requests on a fresh server
#                                         # (fresh Triton cache) vs steady state, RTPURBO and FLASH_ATTN
#   bash scripts/gpu_checks.sh throughput WORKLOAD BACKENDS [args]  # bench_throughput.py, e.g. long-decodes RTPURBO
#   bash scripts/gpu_checks.sh engine capacity|load|step CONFIG... [-- FLAGS]  # bench_engine.py: vllm.LLM KV
#                                         # pool, requests held under load (one config per call), or decode step,
#                                         # e.g. engine step RTPURBO:auto:global15:full RTPURBO:auto:global15:compact,
#                                         # engine step FLASH_ATTN:fp8 -- --profile --batch 4 (flags after --)
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 VLLM_WORKER_MULTIPROC_METHOD=spawn
stage=${1:?stage: tests | cudagraph | serve | layer | topp | serving | ttft | decode | latency | kvsplit | capacity | eval | stability | stability-control | firstreq | throughput | engine}
shift
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
# -P: keep the repo root (and its top-level triton_kernels/ folder) off sys.path.
case "$stage" in
  tests)
    timeout 420 python3 -P -m pytest -q -rs -m gpu tests/attention tests/kernels 2>&1 \
      | tail -15 | tee "$OUT/gpu_tests.log"
    [ "${1:-}" = kernels ] && exit 0
    timeout 300 python3 -P -m pytest -q -s -rs tests/e2e/test_engine_gpu.py 2>&1 | tee "$OUT/e2e_engine.log" \
      | grep -vE "^(INFO|DEBUG|WARNING|\(EngineCore)" | tail -30 ;;
  cudagraph)
    timeout 580 python3 -P -m pytest -q -s -rs tests/e2e/test_cudagraph_gpu.py 2>&1 | tee "$OUT/e2e_cudagraph.log" \
      | grep -vE "^(INFO|DEBUG|WARNING|\(EngineCore)" | tail -30 ;;
  serve)
    RTPURBO_E2E_LOGS="$OUT/serve_logs" timeout 580 python3 -P -m pytest -q -s -rs tests/e2e/test_serve_tiny_gpu.py "$@" \
      2>&1 | tee "$OUT/e2e_serve.log" | grep -vE "^(INFO|DEBUG|WARNING)" | tail -30 ;;
  layer)
    timeout 560 python3 -P benchmarks/bench_attention.py --prefill 32 128 512 1024 --decode 32 128 512 \
      --batch 1 32 --repeats 5 --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_attention.log" ;;
  topp)
    # Every combination of the given block_topp settings (default: the stats kernel's), stats and select
    # kernels timed apart, at 128K and 512K, batch 1 and 4 (~1 min per 10 settings).
    [ $# -eq 0 ] && set -- stats_blocks_per_prog=2,4,8
    timeout 560 python3 -P benchmarks/bench_block_topp.py --contexts 128 512 --batch 1 4 --sweep "$@" 2>&1 \
      | tee "$OUT/bench_block_topp.log" | tail -40 ;;
  serving)
    backend=${1:?serving needs a backend: FLASH_ATTN or RTPURBO}
    shift
    keep="$HOME/rtpurbo_serving"      # outlives one call, so FLASH_ATTN and RTPURBO runs merge
    timeout 570 python3 -P benchmarks/bench_serving.py --out "$keep" --backends "$backend" --phases serve \
      --contexts 32 128 --max-concurrency 1 4 "$@" 2>&1 | tee "$OUT/bench_serving_$backend.log" | tail -40
    cp -r "$keep" "$OUT/serving" ;;
  decode)
    # TPOT/ITL of decode alone, both backends at 128K, one request at a time (~6 min): the prompts primed into
    # the prefix cache first. Not concurrency 4: at 128K-token prompts the API server's per-request work
    # staggers concurrent requests by seconds (never more than 2 decoding together); the batch-4
    # decode step comes from `vllm bench latency` at two output lengths (the latency stage).
    keep="$HOME/rtpurbo_decode"
    timeout 570 python3 -P benchmarks/bench_serving.py --out "$keep" --phases serve --decode-only --contexts 128 \
      --max-concurrency 1 --output-len 512 "$@" 2>&1 | tee "$OUT/bench_decode.log" | tail -30
    cp -r "$keep" "$OUT/decode" ;;
  latency)
    # The batch-4 decode step from `vllm bench latency` (vLLM's own engine process), one backend per call
    # (~5 min; rows merge across calls): 4 x 128K random token ids, 1 and 257 output tokens, a fresh engine
    # for each. Flags go to bench_serving.py (e.g. --engine-args="--kv-cache-dtype fp8"). Beside `engine step`.
    backend=${1:?latency needs a backend: FLASH_ATTN or RTPURBO}
    shift
    keep="$HOME/rtpurbo_latency"
    timeout 570 python3 -P benchmarks/bench_serving.py --out "$keep" --backends "$backend" --phases latency \
      --latency-context 128 --latency-batch 4 --latency-output-len 1 257 --latency-iters 1 "$@" 2>&1 \
      | tee "$OUT/bench_latency_$backend.log" | tail -30
    mkdir -p "$OUT/latency"; cp "$keep"/bench_serving.* "$OUT/latency/"; tar czf "$OUT/latency/logs.tgz" -C "$keep" logs raw ;;
  ttft)
    # TTFT (fresh prefill) at concurrency 1, both backends, contexts in K (default 32 128; ~5 min), 2 prompts
    # per point. Each set of contexts gets its own folder: max_model_len follows the longest.
    # Flags after the contexts go to bench_serving.py (e.g. --prefill-top-p 0.03 --backends RTPURBO).
    contexts=(); while [ $# -gt 0 ] && [[ $1 != -* ]]; do contexts+=("$1"); shift; done
    [ ${#contexts[@]} -eq 0 ] && contexts=(32 128)
    keep="$HOME/rtpurbo_ttft_$(IFS=-; echo "${contexts[*]}")"
    timeout 570 python3 -P benchmarks/bench_serving.py --out "$keep" --phases serve --contexts "${contexts[@]}" \
      --max-concurrency 1 --num-prompts 2 "$@" 2>&1 | tee "$OUT/bench_$(basename "$keep").log" | tail -30
    cp -r "$keep" "$OUT/$(basename "$keep")" ;;
  kvsplit)
    n=${1:?kvsplit needs N, the retrieval KV heads per layer}
    shift
    keep="$HOME/rtpurbo_kvsplit_$n"
    timeout 570 python3 -P benchmarks/bench_serving.py --out "$keep" --backends RTPURBO --phases serve \
      --kv-layout compact --kv-heads-per-layer "$n" --contexts 128 --max-concurrency 8 --num-prompts 8 \
      --max-num-batched-tokens 8192 --engine-args=--no-async-scheduling "$@" 2>&1 \
      | tee "$OUT/bench_serving_split_$n.log" | tail -40
    cp -r "$keep" "$OUT/kvsplit_$n" ;;
  capacity)
    # KV capacity only (servers start, report, stop): FLASH_ATTN and the compact layout with 2 retrieval KV
    # heads per layer, then the compact layout with the global top 15 % of query heads (uneven per layer).
    common=(--phases capacity --kv-layout compact --contexts 128 --max-num-batched-tokens 8192
            --engine-args=--no-async-scheduling)
    timeout 280 python3 -P benchmarks/bench_serving.py --out "$HOME/rtpurbo_capacity_kv2" \
      --backends FLASH_ATTN RTPURBO --kv-heads-per-layer 2 "${common[@]}" 2>&1 | tee "$OUT/capacity_kv2.log" | tail -5
    timeout 200 python3 -P benchmarks/bench_serving.py --out "$HOME/rtpurbo_capacity_top15" \
      --backends RTPURBO --ratio 0.15 "${common[@]}" 2>&1 | tee "$OUT/capacity_top15.log" | tail -5
    cp -r "$HOME/rtpurbo_capacity_kv2" "$OUT/capacity_kv2"; cp -r "$HOME/rtpurbo_capacity_top15" "$OUT/capacity_top15" ;;
  eval)
    which=${1:-tiny}; shift $(( $# > 0 ? 1 : 0 ))
    case "$which" in
      tiny) model=rtpurbo_vllm/tiny/model max_len=4096 lengths=1k,2k ;;
      long) model=rtpurbo_vllm/tiny/long_model max_len=17408 lengths=4k,8k,16k ;;
      *) echo "eval: the model is tiny or long, got $which" >&2; exit 2 ;;
    esac
    rtpurbo_args=("$@")     # e.g. --additional-config '{"rtpurbo": {"prefill_top_p": 0.95}}'
    # One after the other (a server profiling its memory while another starts on the same GPU misreads
    # it); on a 2-GPU machine each server gets its own GPU.
    gpus=$(nvidia-smi -L | wc -l) servers=()
    for spec in RTPURBO:8000:0 FLASH_ATTN:8001:$((gpus > 1 ? 1 : 0)); do
      IFS=: read -r backend port gpu <<< "$spec"
      extra=(); [ "$backend" = RTPURBO ] && extra=("${rtpurbo_args[@]}")
      CUDA_VISIBLE_DEVICES=$gpu setsid python3 -P -m vllm.entrypoints.cli.main serve "$model" \
        --attention-backend "$backend" --port "$port" --max-model-len "$max_len" --gpu-memory-utilization 0.15 \
        --seed 0 "${extra[@]}" > "$OUT/server_$backend.log" 2>&1 &
      servers+=($!)
      timeout 300 bash -c "until curl -sf http://127.0.0.1:$port/health > /dev/null; do sleep 2; done"
    done
    timeout 400 python3 -P -m rtpurbo_vllm.eval.cli --compare rtpurbo=http://127.0.0.1:8000 \
      flash=http://127.0.0.1:8001 --tokenizer "$model" --lengths "$lengths" --samples 50 --out "$OUT/eval" \
      --no-progress --metadata "model=$which" 2>&1 | tee "$OUT/eval.log" | tail -30
    # Each server with its engine processes (own session via setsid), so the next stage finds the GPUs free.
    for pid in "${servers[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
    for _ in $(seq 60); do kill -0 "${servers[@]}" 2>/dev/null || break; sleep 1; done
    for pid in "${servers[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done; wait ;;
  stability)
    keep="$HOME/rtpurbo_stability"    # outlives one call, so phases run in separate calls merge
    timeout 570 python3 -P benchmarks/bench_stability.py --out "$keep" --stop-timeout 20 "$@" 2>&1 \
      | tee "$OUT/bench_stability.log" | grep -vE "^(INFO|DEBUG|WARNING|\(EngineCore)" | tail -40
    cp -r "$keep" "$OUT/stability" ;;
  stability-control)
    # The identity check on vLLM's own FLASH_ATTN (dense): how often batched and one-at-a-time greedy paths
    # part at ties without RTPURBO (~2 min).
    timeout 300 python3 -P benchmarks/bench_stability.py --out "$OUT/stability_flash_attn" --stop-timeout 20 \
      --phases identity --identity-backend FLASH_ATTN "$@" 2>&1 | tee "$OUT/bench_stability_flash_attn.log" \
      | grep -vE "^(INFO|DEBUG|WARNING|\(EngineCore)" | tail -20 ;;
  firstreq)
    # Tiny model, one fresh server per backend with an empty Triton cache (~4 min): 3 rounds of 120 short
    # prompts sent at once; round 1 (the first requests) against the later rounds, start-up and RTPURBO
    # warm-up seconds. The compiled kernels stay on the machine, the report and server logs come back.
    keep="$HOME/rtpurbo_first_requests"
    timeout 570 python3 -P benchmarks/bench_first_requests.py --out "$keep" --stop-timeout 20 "$@" 2>&1 \
      | tee "$OUT/bench_first_requests.log" | grep -vE "^(INFO|DEBUG|WARNING|\((APIServer|EngineCore))" | tail -30
    mkdir -p "$OUT/first_requests"; cp -r "$keep"/bench_first_requests.* "$keep/logs" "$OUT/first_requests/" ;;
  engine)
    phase=${1:?engine needs a phase: capacity, load or step}
    shift
    keep="$HOME/rtpurbo_engine"      # rows merge across calls
    configs=(); while [ $# -gt 0 ] && [ "$1" != -- ]; do configs+=("$1"); shift; done
    [ $# -gt 0 ] && shift            # the flags after --
    timeout 590 python3 -P benchmarks/bench_engine.py "$phase" --out "$keep" --configs "${configs[@]}" "$@" 2>&1 \
      | tee "$OUT/bench_engine_$phase.log" | tail -20
    mkdir -p "$OUT/engine_logs"; cp "$keep"/bench_engine.* "$OUT/"; cp "$keep"/*.log "$OUT/engine_logs/" ;;
  throughput)
    # benchmarks/bench_throughput.py: one workload, the given backends (comma-separated) one after the other;
    # rows merge into $HOME/rtpurbo_throughput across calls, so call once per backend to stay under 10 minutes.
    workload=${1:?throughput needs a workload: long-prompts or long-decodes}
    backends=${2:?throughput needs backends, e.g. FLASH_ATTN,FLASH_ATTN-fp8,RTPURBO}
    shift 2
    keep="$HOME/rtpurbo_throughput"
    timeout 590 python3 -P benchmarks/bench_throughput.py --out "$keep" --workload "$workload" --backends "$backends" \
      "$@" 2>&1 | tee "$OUT/bench_throughput_${workload}_${backends//,/_}.log" \
      | grep -vE "^(INFO|DEBUG|WARNING|\((APIServer|EngineCore))" | tail -30
    mkdir -p "$OUT/throughput"    # the report and the logs; the datasets (tens of MB) stay on the machine
    cp "$keep"/bench_throughput.* "$OUT/throughput/"; tar czf "$OUT/throughput/logs_raw.tgz" -C "$keep" logs raw ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
