"""First requests against steady state under ``vllm serve``: what a freshly started server's first
requests cost beyond what the same requests cost once it is warm (Triton compiling kernels on first use,
lazy loading of CUDA modules, ...), per attention backend.

For each backend (``--backends``, default RTPURBO and FLASH_ATTN), one after the other, a fresh
``vllm serve`` of the tiny trained model shipped in this repository (``rtpurbo_vllm/tiny/model``; RTPURBO
with its own artifact and the default KV layout; prefix caching off), with a new, empty Triton cache
folder (``TRITON_CACHE_DIR``; ``--triton-cache shared`` keeps the machine's), so that every Triton
kernel the server runs is compiled by that server: at start-up, or at a first request. Once
``/health`` answers, ``--rounds`` rounds (default 3) each send ``--prompts`` (default 120) short
key-value retrieval prompts (lengths uniform in ``--lengths``, default 64-512 tokens, new prompts every
round) to ``/v1/completions`` all at once, ``--max-tokens`` (default 16) greedy tokens each, and time
the round from the first request sent to the last reply. Round 1 is the first requests; the median of
the later rounds is the steady state.

Reported per backend: seconds from the start of ``vllm serve`` to a healthy server, the duration the
RTPURBO warm-up logged (``rtpurbo_vllm.attention.warmup``; the cost moved from the first requests to
start-up), each round's seconds and first / steady, where each round's time went (``round_phases``: per
request the mean seconds vLLM's ``/metrics`` counted in the queue, in prefill and in decode, and its
time to first token and end to end from the request's arrival at the API server, over the round) and (fresh Triton cache) the kernels Triton compiled after the server was healthy, by name
(``compiled_after_startup``: what the first requests paid for). Criterion: for every backend, round 1 within
``--max-first-ratio`` (default 1.5) x the steady state. Results go to ``--out``:
``bench_first_requests.json`` (a backend run again replaces its entry) and ``bench_first_requests.md``;
server logs in ``OUT/logs``. The exit code is 0 only if every criterion passed.

Run on a GPU machine from the repo root, for example:
    python3 -P benchmarks/bench_first_requests.py --out results/first_requests --dry-run
    python3 -P benchmarks/bench_first_requests.py --out results/first_requests
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rtpurbo_vllm.bench.environment import environment
from rtpurbo_vllm.bench.server import (HOST, INTERRUPTED, free_port, post_all, running_server, server_metrics,
                                       stop_on_sigterm, vllm_command)
from rtpurbo_vllm.outputs import write_json, write_text
from rtpurbo_vllm.tiny import tiny_model_dir
from rtpurbo_vllm.tiny.task import make_prompt

BACKENDS = ("RTPURBO", "FLASH_ATTN")
SERVED_NAME = "rtpurbo-first-requests"
MAX_MODEL_LEN = 4096                 # the tiny model's trained length
MIN_PROMPT = 64                      # tokens: room for make_prompt's pairs and query
RESULTS_JSON, REPORT_MD = "bench_first_requests.json", "bench_first_requests.md"
WARMUP_LOG = re.compile(r"RTPURBO warm-up: .* in ([0-9.]+) s")
# vLLM's per-request histograms: the growth of their sums over a round says where its time went. Queue,
# prefill and decode are the engine's phases; time to first token and end to end are counted by the API
# server from the request's arrival, so end to end minus the phases is the time spent outside the engine
# (the API server's input and output processing, and the wait before the engine takes the request in).
PHASE_METRICS = {"vllm:request_queue_time_seconds_sum": "queue_s", "vllm:request_prefill_time_seconds_sum": "prefill_s",
                 "vllm:request_decode_time_seconds_sum": "decode_s",
                 "vllm:time_to_first_token_seconds_sum": "first_token_s",
                 "vllm:e2e_request_latency_seconds_sum": "end_to_end_s"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", metavar="DIR", default="results/first_requests", help="results folder")
    parser.add_argument("--backends", metavar="NAME", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--prompts", metavar="N", type=int, default=120, help="prompts per round (default 120)")
    parser.add_argument("--rounds", metavar="N", type=int, default=3, help="rounds, >= 2 (default 3)")
    parser.add_argument("--lengths", metavar=("MIN", "MAX"), type=int, nargs=2, default=[64, 512],
                        help="prompt lengths in tokens, uniform (default 64 512)")
    parser.add_argument("--max-tokens", metavar="N", type=int, default=16, help="greedy tokens per prompt")
    parser.add_argument("--triton-cache", choices=("fresh", "shared"), default="fresh",
                        help="fresh: each server compiles into a new empty TRITON_CACHE_DIR (default); "
                             "shared: the machine's Triton cache")
    parser.add_argument("--max-first-ratio", metavar="R", type=float, default=1.5,
                        help="criterion: round 1 at most R x the steady state (default 1.5)")
    parser.add_argument("--memory", metavar="SHARE", type=float, default=0.15, help="--gpu-memory-utilization")
    parser.add_argument("--engine-args", metavar="ARGS", default="", help="more vllm serve flags, one string")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--vllm", metavar="CMD", default=shlex.join(vllm_command()), help="the vllm command")
    parser.add_argument("--startup-timeout", metavar="S", type=float, default=300)
    parser.add_argument("--request-timeout", metavar="S", type=float, default=300)
    parser.add_argument("--stop-timeout", metavar="S", type=float, default=30)
    parser.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    return parser


def check(args: argparse.Namespace) -> None:
    """Raises ValueError naming the flag of a bad value."""
    low, high = args.lengths
    for ok, message in [(MIN_PROMPT <= low <= high, f"--lengths needs {MIN_PROMPT} <= MIN <= MAX"),
                        (high + args.max_tokens <= MAX_MODEL_LEN,
                         f"--lengths MAX + --max-tokens must be <= {MAX_MODEL_LEN}"),
                        (args.rounds >= 2, "--rounds must be >= 2 (round 1 against the later ones)"),
                        (min(args.prompts, args.max_tokens) >= 1, "--prompts and --max-tokens must be >= 1"),
                        (args.max_first_ratio >= 1.0, "--max-first-ratio must be >= 1")]:
        if not ok:
            raise ValueError(message)


def serve_command(args: argparse.Namespace, backend: str, port: int) -> list[str]:
    return [*shlex.split(args.vllm), "serve", str(tiny_model_dir()), "--host", HOST, "--port", str(port),
            "--served-model-name", SERVED_NAME, "--disable-uvicorn-access-log", "--attention-backend", backend,
            "--max-model-len", str(MAX_MODEL_LEN), "--gpu-memory-utilization", str(args.memory),
            "--no-enable-prefix-caching", "--generation-config", "vllm", "--seed", str(args.seed),
            *shlex.split(args.engine_args)]


def round_bodies(args: argparse.Namespace, round_index: int) -> list[dict[str, Any]]:
    """Round ``round_index``'s requests: new prompts every round, deterministic in ``--seed``."""
    rng = random.Random(args.seed * 1000 + round_index)
    return [{"model": SERVED_NAME, "prompt": make_prompt(rng.randrange(2**31), rng.randint(*args.lengths)).text,
             "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True} for _ in range(args.prompts)]


def compiled_kernels(cache: Path | None) -> set[str]:
    """The kernels compiled into a Triton cache folder, as ``hash/name`` (one folder per compiled
    variant holding ``name.json`` beside the binaries); empty without a folder."""
    if cache is None:
        return set()
    return {f"{f.parent.name}/{f.stem}" for f in cache.glob("*/*.json") if not f.name.startswith("__grp__")}


def round_phases(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Mean seconds per request in each phase of :data:`PHASE_METRICS` over a round, from the metrics read
    before and after it (a phase the server does not report is left out)."""
    return {key: round((after[key] - before.get(key, 0.0)) / requests, 4) for key in after}


def run_backend(args: argparse.Namespace, backend: str, port: int, out: Path) -> dict[str, Any]:
    """One fresh server of ``backend``: start-up time, its rounds, the RTPURBO warm-up's logged duration."""
    argv, log = serve_command(args, backend, port), out / "logs" / f"server-{backend}.log"
    env = cache = None
    if args.triton_cache == "fresh":
        cache = out / "triton_cache" / backend
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        env = {"TRITON_CACHE_DIR": str(cache)}
    row: dict[str, Any] = {"command": shlex.join(argv), "log": str(log), "triton_cache": args.triton_cache}
    print(f"[{backend}] starting: {row['command']}", flush=True)
    start = time.monotonic()
    with running_server(argv, port, log, out, args.startup_timeout, args.stop_timeout, env=env):
        row["startup_s"] = round(time.monotonic() - start, 2)
        at_startup = compiled_kernels(cache)
        rounds, phases = [], []
        for index in range(args.rounds):
            bodies = round_bodies(args, index)
            before = server_metrics(port, PHASE_METRICS)
            begin = time.monotonic()
            post_all(port, "/v1/completions", bodies, concurrency=len(bodies), timeout=args.request_timeout)
            rounds.append(round(time.monotonic() - begin, 3))
            phases.append(round_phases(before, server_metrics(port, PHASE_METRICS), len(bodies)))
            print(f"[{backend}] round {index + 1}: {len(bodies)} prompts in {rounds[-1]:.2f} s", flush=True)
        late = sorted({name.split("/", 1)[1] for name in compiled_kernels(cache) - at_startup})
    found = WARMUP_LOG.findall(log.read_text(errors="replace"))
    steady = statistics.median(rounds[1:])
    row.update(warmup_s=[float(s) for s in found], rounds_s=rounds, round_phases=phases, first_s=rounds[0],
               steady_s=steady,
               first_over_steady=round(rounds[0] / steady, 3) if steady > 0 else None,
               compiled_at_startup=len(at_startup), compiled_after_startup=late if cache else None)
    return row


def criteria(results: dict[str, Any], max_ratio: float) -> list[dict[str, Any]]:
    rows = []
    for backend, row in results["backends"].items():
        ratio = row.get("first_over_steady")
        passed = "error" not in row and ratio is not None and ratio <= max_ratio
        detail = row.get("error") or (f"round 1 {row['first_s']:.2f} s, steady {row['steady_s']:.2f} s "
                                      f"({ratio}x); start-up {row['startup_s']:.0f} s, RTPURBO warm-up "
                                      f"{row['warmup_s'] or 'not logged'}; Triton kernels compiled after "
                                      f"start-up: {row.get('compiled_after_startup')}")
        rows.append({"name": f"{backend}: first requests within {max_ratio}x steady state", "passed": passed,
                     "detail": detail})
    return rows


def render_markdown(results: dict[str, Any]) -> str:
    env = results.get("environment") or {}
    verdict = "PASSED" if results["criteria"] and all(c["passed"] for c in results["criteria"]) else "FAILED"
    lines = [f"# First requests against steady state: {verdict}", "",
             f"Card: {env.get('device')}; vLLM {env.get('versions', {}).get('vllm')}, commit {env.get('commit')}. "
             f"{results['settings']['prompts']} prompts per round, all at once, tiny model.", "",
             "| backend | start-up s | warm-up s | round 1 s | steady s | first / steady | Triton cache | "
             "compiled after start-up |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for backend, row in results["backends"].items():
        if "error" in row:
            lines.append(f"| {backend} | error: {' '.join(row['error'].split())[:200]} | | | | | | |")
            continue
        lines.append(f"| {backend} | {row['startup_s']:.0f} | {', '.join(map(str, row['warmup_s'])) or '-'} | "
                     f"{row['first_s']:.2f} | {row['steady_s']:.2f} | {row['first_over_steady']} | "
                     f"{row['triton_cache']} | {', '.join(row['compiled_after_startup'] or []) or '-'} |")
    lines += ["", "Per request, mean ms in vLLM's queue / prefill / decode phases, then its time to first token / "
              "end to end (from arrival at the API server), per round:", ""]
    for backend, row in results["backends"].items():
        cells = ["/".join(f"{1000 * phases[key]:.0f}" if key in phases else "-" for key in PHASE_METRICS.values())
                 for phases in row.get("round_phases", [])]
        lines.append(f"- {backend}: {', '.join(cells) or '-'}")
    lines += ["", *(f"- {'pass' if c['passed'] else 'FAIL'}: {c['name']}: {c['detail']}" for c in results["criteria"])]
    lines += ["", "```bash", *(row["command"] for row in results["backends"].values() if "command" in row), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check(args)
    port = args.port or free_port()
    out = Path(args.out)
    if args.dry_run:
        for backend in args.backends:
            print(shlex.join(serve_command(args, backend, port)))
        print(f"# then {args.rounds} rounds of {args.prompts} prompts to http://{HOST}:{port}/v1/completions")
        return 0
    stop_on_sigterm()
    path = out / RESULTS_JSON
    results = json.loads(path.read_text()) if path.is_file() else {"backends": {}}
    results.update(environment=environment(), settings={k: v for k, v in vars(args).items() if k != "dry_run"})
    try:
        for backend in args.backends:
            try:
                results["backends"][backend] = run_backend(args, backend, port, out)
            except (RuntimeError, TimeoutError, OSError) as exc:
                results["backends"][backend] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"[{backend}] FAILED: {results['backends'][backend]['error']}", flush=True)
            except KeyboardInterrupt:
                results["backends"][backend] = {"error": INTERRUPTED}
                raise
    finally:
        results["criteria"] = criteria(results, args.max_first_ratio)
        write_json(path, results)
        report = render_markdown(results)
        write_text(out / REPORT_MD, report)
        print(report)
    return 0 if all(c["passed"] for c in results["criteria"]) else 1


if __name__ == "__main__":
    sys.exit(main())
