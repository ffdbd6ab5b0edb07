"""A fake ``vllm`` command for the benchmark scripts' tests (no GPU, no vLLM import), run as
``python fake_vllm.py serve ...``, ``... bench serve ...`` or ``... bench latency ...``:

- ``serve``: prints vLLM's KV-capacity log lines and serves on 127.0.0.1: ``/health``, ``/metrics``
  (idle: no preemption, KV usage 0, nothing running or waiting; each completion served adds 1, 2, 3, 4
  and 8 ms to the queue, prefill, decode, time-to-first-token and end-to-end histograms' sums) and ``POST /v1/completions``: greedy
  completions derived from the prompt alone (one hex digit of its SHA-1 per token), with top-2
  log-probabilities, so the same prompt always gets the same answer;
- ``bench serve``: writes a ``--save-result`` JSON (``--save-detailed`` adds ``input_lens`` and
  ``errors``), all ``--num-prompts`` completed (of the ``custom`` dataset's JSONL, at most its lines);
- ``bench latency``: writes an ``--output-json`` file.

Environment switches of the tests:

- ``FAKE_SERVER_EXIT``: ``serve`` exits with code 2 at once;
- ``FAKE_FAIL``: ``bench serve`` for RTPURBO exits 1 at a 2K context and reports one failed request at 1K;
- ``FAKE_FAILED_REQUESTS=N``: ``bench serve`` reports N failed requests;
- ``FAKE_KV_USAGE=X``: ``/metrics`` reports ``vllm:kv_cache_usage_perc`` X;
- ``FAKE_RUNNING=N``: ``/metrics`` reports ``vllm:num_requests_running`` N;
- ``FAKE_FLIP_PROMPT=SHA1``: the first completion of the prompt with this SHA-1 differs at generated token
  ``FLIP_AT`` with a top-2 margin of ``FAKE_FLIP_MARGIN`` (default 0.01, a near-tie), later ones do not.
"""

import hashlib
import http.server
import json
import os
import sys
import threading

FLIP_AT = 3


def value(argv, flag):
    return argv[argv.index(flag) + 1]


def print_capacity(argv):
    backend = value(argv, "--attention-backend")
    print("(EngineCore pid=1) INFO 11-28 10:00:00 [kv_cache_utils.py:2177] GPU KV cache size: %s tokens"
          % f"{400000 if backend == 'FLASH_ATTN' else 380000:,}")
    print("(EngineCore pid=1) INFO 11-28 10:00:00 [kv_cache_utils.py:2179] Maximum concurrency for %s tokens "
          "per request: %.2fx" % (f"{int(value(argv, '--max-model-len')):,}", 1.5), flush=True)


def metrics_text(served):
    usage = float(os.environ.get("FAKE_KV_USAGE", "0"))
    running = float(os.environ.get("FAKE_RUNNING", "0"))
    phases = [f'vllm:{name}_seconds_sum{{engine="0"}} {ms * served / 1000}'
              for name, ms in (("request_queue_time", 1), ("request_prefill_time", 2), ("request_decode_time", 3),
                               ("time_to_first_token", 4), ("e2e_request_latency", 8))]
    return "\n".join(['vllm:num_preemptions_total{engine="0"} 0.0', f'vllm:kv_cache_usage_perc{{engine="0"}} {usage}',
                      f'vllm:num_requests_running{{engine="0"}} {running}', 'vllm:num_requests_waiting{engine="0"} 0.0',
                      'vllm:prefix_cache_hits_total{engine="0"} 1234.0', *phases, ""]).encode()


def completion(prompt, max_tokens, flipped):
    """An OpenAI completions reply: tokens " <hex digit>" from the prompt's SHA-1; ``flipped`` swaps the
    token at ``FLIP_AT`` for " X", ``FAKE_FLIP_MARGIN`` above the original token."""
    digest = hashlib.sha1(prompt.encode()).hexdigest()
    tokens = [" " + digest[i % len(digest)] for i in range(max_tokens)]
    top = [{t: -0.1, " Y": -2.5} for t in tokens]
    if flipped and max_tokens > FLIP_AT:
        margin = float(os.environ.get("FAKE_FLIP_MARGIN", "0.01"))
        top[FLIP_AT] = {" X": -0.69, tokens[FLIP_AT]: -0.69 - margin}
        tokens[FLIP_AT] = " X"
    return {"choices": [{"index": 0, "text": "".join(tokens), "logprobs": {
        "tokens": tokens, "token_logprobs": [max(t.values()) for t in top], "top_logprobs": top}}]}


def serve(argv):
    assert value(argv, "--host") == "127.0.0.1"
    if os.environ.get("FAKE_SERVER_EXIT"):
        sys.exit(2)
    print_capacity(argv)
    seen, served, lock = set(), [], threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, status, body=b""):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            body = {"/health": b"", "/metrics": metrics_text(len(served))}.get(self.path)
            self.reply(404) if body is None else self.reply(200, body)

        def do_POST(self):
            if self.path != "/v1/completions":
                return self.reply(404)
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            key = hashlib.sha1(request["prompt"].encode()).hexdigest()
            with lock:
                first = key not in seen
                seen.add(key)
                served.append(key)
            flipped = first and key == os.environ.get("FAKE_FLIP_PROMPT")
            self.reply(200, json.dumps(completion(request["prompt"], request["max_tokens"], flipped)).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(value(argv, "--port"))), Handler)
    server.serve_forever()


def bench_serve(argv):
    backend = [m for m in argv if m.startswith(("attention_backend=", "backend="))][0].split("=")[1]
    prompts = int(value(argv, "--num-prompts"))
    if value(argv, "--dataset-name") == "custom":             # JSONL of {"prompt", "output_tokens", ...}
        with open(value(argv, "--dataset-path")) as f:
            rows = [json.loads(line) for line in f][:prompts]
        prompts, context = len(rows), sum(len(r["prompt"].split()) + 1 for r in rows) // len(rows)
    else:
        context = int(value(argv, "--random-input-len"))
        json.loads(value(argv, "--random-range-ratio"))        # a number or vLLM's {"input": r, "output": r}
    if context == 2048 and backend == "RTPURBO" and os.environ.get("FAKE_FAIL"):
        sys.exit(1)
    failed = int(os.environ.get("FAKE_FAILED_REQUESTS", "0"))
    failed += int(context == 1024 and backend == "RTPURBO" and bool(os.environ.get("FAKE_FAIL")))
    ttft, tpot = (100.0, 5.0) if backend.startswith("RTPURBO") else (200.0, 10.0)
    result = {"completed": prompts - failed, "failed": failed, "duration": 1.0, "output_throughput": 1000.0 / tpot,
              "total_token_throughput": 2000.0 / tpot, "p99_ttft_ms": 2 * ttft * context / 1024, "p99_tpot_ms": 2 * tpot,
              "total_input_tokens": prompts * context, "request_throughput": float(prompts),
              "median_ttft_ms": ttft * context / 1024, "median_tpot_ms": tpot, "median_itl_ms": tpot}
    if "--save-detailed" in argv:
        result["input_lens"] = [context - 1 + i for i in range(prompts)]
        result["errors"] = ["Bad Request: prompt too long"] * failed + [""] * (prompts - failed)
    os.makedirs(value(argv, "--result-dir"), exist_ok=True)
    with open(os.path.join(value(argv, "--result-dir"), value(argv, "--result-filename")), "w") as f:
        json.dump(result, f)


def bench_latency(argv):
    print_capacity(argv)
    prefill, step = (1.0, 0.004) if "--additional-config" in argv else (2.0, 0.01)     # seconds
    avg = int(value(argv, "--batch-size")) * prefill + int(value(argv, "--output-len")) * step
    with open(value(argv, "--output-json"), "w") as f:
        json.dump({"avg_latency": avg, "latencies": [avg], "percentiles": {"50": avg, "90": avg}}, f)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "serve":
        serve(args)
    elif args[:2] == ["bench", "serve"]:
        bench_serve(args)
    elif args[:2] == ["bench", "latency"]:
        bench_latency(args)
    else:
        sys.exit(f"fake vllm: unknown command {args}")
