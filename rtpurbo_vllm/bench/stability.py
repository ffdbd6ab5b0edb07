"""Stability of RTPURBO under ``vllm serve``: many long requests at once without errors,
every KV block back in the pool afterwards, and the same greedy outputs batched or one at a time.

Two phases (``--phases load identity``, both by default), each with its own ``vllm serve`` on 127.0.0.1
(started, waited for on ``/health``, always stopped; logs in ``OUT/logs``):

1. **load**: the dummy-weight model of :mod:`rtpurbo_vllm.bench.serving` (``--shape``, default the
   Llama-3.2-1B shape, whose prefill of the ~13.5M prompt tokens below fits one 10-minute command
   where the 8B shape's does not) with a synthetic artifact, compact KV layout with one retrieval KV head per layer, prefill chunk 8192,
   ``--no-async-scheduling`` and prefix caching on. ``vllm bench serve`` sends 200 random prompts
   whose lengths vLLM draws uniformly from [4096, 131072] tokens (:func:`random_length_args`), 32
   output tokens each (``--ignore-eos``), all at once (``--request-rate inf``) under a client
   concurrency of 16. Passes when all 200 completed and none failed, and when ``/metrics`` then shows
   ``vllm:kv_cache_usage_perc`` 0 (every block free again; prefix-cached blocks are free and
   evictable, so they count as free) and no running or waiting request. Preemptions, prefix-cache
   hits, duration and throughput are reported. vLLM's random prompts cycle through the tokenizer's
   vocabulary from a random start, so with the tiny model's 366-token vocabulary many prompts share
   long prefixes and prefix caching is exercised as well (the prefill estimate is an upper bound).
2. **identity**: the tiny trained model shipped in this repo (``rtpurbo_vllm/tiny/model``, max 4096
   tokens) with its artifact calibrated under a KV budget of one retrieval KV head per layer
   (``model/rtpurbo-kv1``: 4 sinks + a 256-token window), compact KV layout, so one KV head per layer
   keeps only sinks + window and its window blocks go back to the pool while requests run. Its weights are trained,
   so greedy choices have real margins; on dummy weights every logit is a near-tie and the rounding
   differences between batch shapes flip tokens, which is why this check does not use the load
   phase's model. 24 key-value retrieval prompts (``rtpurbo_vllm.tiny.task.make_prompt``) of 300-3900
   tokens go to ``/v1/completions`` all at once (concurrently, so the engine batches them with chunked
   prefill), then the same prompts one at a time, greedy, 16 tokens each. Passes when every prompt's
   generated tokens are the same both ways except where the two paths part at a top-2 near-tie
   (< ``NEAR_TIE`` nats in either pass: vLLM is not bitwise batch-invariant, so a tie at bf16
   resolution goes either way; a prompt that differs is listed with the first differing token and the
   margins there), and the same pool check holds. ``--identity-backend FLASH_ATTN`` runs the same
   check on vLLM's own backend, the control for how often such ties part. Prefix caching
   is off on this server, so the one-at-a-time pass computes every prompt again instead of reading
   the batched pass's cached KV.

The model, artifact and engine options are the serving benchmark's (with the defaults above) and shape the
load phase's server; ``--seed``, ``--port`` and the start/stop timeouts serve both phases, and
``--command-timeout`` bounds ``vllm bench serve`` and each identity request.

Results go to ``--out``: ``bench_stability.json`` (one section per phase: settings, commands, numbers,
criteria) and ``bench_stability.md``; a phase run again replaces its section, so the phases can run in
separate invocations. The exit code is 0 only if every criterion of the phases run passed.

Run on a GPU machine from the repo root, for example:
    python3 -P benchmarks/bench_stability.py --out results/stability --dry-run    # print the commands
    python3 -P benchmarks/bench_stability.py --out results/stability
    python3 -P benchmarks/bench_stability.py --out results/stability --phases identity
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import random
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rtpurbo_vllm.bench import serving as bs
from rtpurbo_vllm.bench.environment import environment
from rtpurbo_vllm.bench.server import (HOST, INTERRUPTED, SERVER_METRICS, free_port, post_all, server_metrics,
                                       stop_on_sigterm)
from rtpurbo_vllm.bench.vllm_results import parse_kv_capacity, parse_serve_result
from rtpurbo_vllm.outputs import write_text
from rtpurbo_vllm.tiny import tiny_kv1_artifact_dir, tiny_model_dir
from rtpurbo_vllm.tiny.task import Prompt, make_prompt, score

PHASES = ("load", "identity")
BACKEND = "RTPURBO"
RESULTS_JSON, REPORT_MD = "bench_stability.json", "bench_stability.md"
TINY_MAX_MODEL_LEN = 4096            # the tiny model's trained length (its max_position_embeddings is 8192)
TINY_MIN_PROMPT = 64                 # tokens: room for make_prompt's 8 pairs and the query
IDENTITY_LOGPROBS = 2                # top log-probabilities asked per generated token (margins of a difference)
NEAR_TIE = 0.1                       # nats: a top-2 margin below this is a tie at bf16 logit resolution
IDENTITY_BACKENDS = ("RTPURBO", "FLASH_ATTN")
# /metrics after a phase: the defaults of the harness plus the scheduler queues and prefix-cache hits
# (vllm/v1/metrics/loggers.py: gauges vllm:num_requests_running / _waiting, counter vllm:prefix_cache_hits).
POOL_METRICS = {**SERVER_METRICS, "vllm:num_requests_running": "running",
                "vllm:num_requests_waiting": "waiting", "vllm:prefix_cache_hits_total": "prefix_cache_hits"}
# What stops a phase and is recorded as its failure (a server that does not start or dies, HTTP errors,
# a reply that is not what the OpenAI API returns); anything else is a bug and propagates.
PHASE_ERRORS = (RuntimeError, TimeoutError, OSError, ValueError, KeyError)
# The serving benchmark's options of the load phase's model, artifact and engine (their dest names), shared as they are.
SERVER_OPTIONS = tuple(bs.add_server_arguments(argparse.ArgumentParser()))


# ----------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated command line. ``serving`` holds what the serving benchmark needs for the load phase
    (model, artifact, engine flags, ``vllm bench serve`` settings, ``out``, ``port``, ``vllm``, timeouts);
    lengths are tokens."""

    serving: bs.Settings
    phases: tuple[str, ...]
    input_range: tuple[int, int]            # vLLM's sampled prompt lengths of the load phase, inclusive
    identity_prompts: int
    identity_lengths: tuple[int, int]       # prompt lengths of the identity phase, inclusive
    identity_max_tokens: int
    identity_memory: float
    identity_engine_args: tuple[str, ...]
    identity_backend: str
    settle_timeout: float
    dry_run: bool

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> Settings:
        """Checks the parsed flags; a bad value raises ValueError naming the flag."""
        low_k, high_k = args.input_range
        low, high = args.identity_lengths
        checks = [
            (1 <= low_k <= high_k, "--input-range needs 1 <= MIN <= MAX"),
            (TINY_MIN_PROMPT <= low <= high, f"--identity-lengths needs {TINY_MIN_PROMPT} <= MIN <= MAX"),
            (high + args.identity_max_tokens <= TINY_MAX_MODEL_LEN,
             f"--identity-lengths MAX + --identity-max-tokens must be <= {TINY_MAX_MODEL_LEN}"),
            (min(args.identity_prompts, args.identity_max_tokens) >= 1,
             "--identity-prompts and --identity-max-tokens must be >= 1"),
            (0.0 < args.identity_memory <= 1.0, "--identity-memory must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return cls(serving=serving_settings(args), phases=tuple(dict.fromkeys(args.phases)),
                   input_range=(low_k * 1024, high_k * 1024), identity_prompts=args.identity_prompts,
                   identity_lengths=(low, high), identity_max_tokens=args.identity_max_tokens,
                   identity_memory=args.identity_memory,
                   identity_engine_args=tuple(shlex.split(args.identity_engine_args)),
                   identity_backend=args.identity_backend, settle_timeout=args.settle_timeout,
                   dry_run=args.dry_run)

    @property
    def out(self) -> Path:
        return self.serving.out


def serving_settings(args: argparse.Namespace) -> bs.Settings:
    """The serving benchmark's settings for the load phase, checked by it: its model, artifact and engine options
    as given here (:data:`SERVER_OPTIONS`), RTPURBO alone, prefix caching on, no warm-up request, and
    ``max_model_len`` (unless given) for the longest prompt plus the output."""
    serving = bs.build_parser().parse_args(
        ["--out", args.out, "--backends", BACKEND, "--phases", "serve", "--prefix-caching", "--num-warmups", "0",
         "--contexts", str(args.input_range[1]), "--output-len", str(args.output_len),
         "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency)])
    for dest in SERVER_OPTIONS:
        setattr(serving, dest, getattr(args, dest))
    return bs.Settings.from_cli(serving)


# ----------------------------------------------------------------------------------------------------
# Load phase
# ----------------------------------------------------------------------------------------------------

def sampled_input_range(input_len: int, range_ratio: float, num_special: int) -> tuple[int, int]:
    """The inclusive range vLLM 0.26's random dataset draws prompt lengths from
    (``vllm/benchmarks/datasets/utils.py`` ``get_sampling_params``): ``num_special`` (the tokenizer's
    special tokens, added again when the server tokenizes the prompt) comes off ``--random-input-len``,
    then ``[floor(n * (1 - r)), ceil(n * (1 + r))]``."""
    real = max(0, input_len - num_special)
    return math.floor(real * (1 - range_ratio)), math.ceil(real * (1 + range_ratio))


def random_length_args(low: int, high: int, num_special: int) -> tuple[int, float]:
    """``(--random-input-len, input range ratio)`` that make vLLM draw prompt lengths uniformly from
    exactly ``[low, high]`` tokens (``low + high`` even): the midpoint and ``(high - low) / (high + low)``,
    lowered by a few ulps where float rounding would put ``floor(n * (1 - r))`` below ``low``."""
    if (low + high) % 2:
        raise ValueError(f"no --random-range-ratio gives exactly [{low}, {high}]: low + high must be even")
    middle, ratio = (low + high) // 2, (high - low) / (high + low)
    for _ in range(16):
        if sampled_input_range(middle + num_special, ratio, num_special)[0] >= low:
            break
        ratio = math.nextafter(ratio, 0.0)
    assert sampled_input_range(middle + num_special, ratio, num_special) == (low, high), (low, high, ratio)
    return middle + num_special, ratio


def special_tokens(tokenizer_dir: Path) -> int:
    """Special tokens the tokenizer adds to a prompt (``vllm bench serve`` subtracts them from the length)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir)).num_special_tokens_to_add()


@dataclasses.dataclass(frozen=True)
class LoadRun:
    """The ``vllm bench serve`` run of the load phase and the prompt lengths it asks vLLM for."""

    run: bs.BenchRun
    num_prompts: int
    input_len: int                  # --random-input-len: the mean sampled length plus num_special
    range_ratio: float              # input range ratio (output lengths are fixed)
    num_special: int                # the tokenizer's special tokens, added to every prompt by the server

    @property
    def expected_prefill_tokens(self) -> int:
        """Prompt tokens the server prefills: ``num_prompts`` x the mean sampled length plus the special
        tokens (fewer where prefix caching hits)."""
        return self.num_prompts * self.input_len


def load_run(settings: Settings, port: int) -> LoadRun:
    """The load phase's client command: random prompts over ``input_range``, fixed output length, the
    per-request results kept (``--save-detailed``: prompt lengths and errors)."""
    s = settings.serving
    num_special = special_tokens(s.tokenizer_dir)
    input_len, ratio = random_length_args(*settings.input_range, num_special)
    result = s.out / "raw" / "stability-load.json"
    argv = bs.bench_serve_argv(s, port, result, input_len=input_len,
                               range_ratio=json.dumps({"input": ratio, "output": 0.0}),
                               concurrency=s.max_concurrency[0], warmups=s.num_warmups,
                               metadata=[f"attention_backend={BACKEND}", "phase=stability-load"])
    run = bs.BenchRun({"phase": "load"}, [*argv, "--save-detailed"], result, s.out / "logs" / "stability-load.log")
    return LoadRun(run, s.num_prompts, input_len, ratio, num_special)


def describe_load(settings: Settings, plan: LoadRun) -> str:
    """What the load phase serves and sends, in one paragraph."""
    s = settings.serving
    low, high = settings.input_range
    model = s.model_dir if s.model else f"the {s.shape} shape"
    return (f"RTPURBO serving {model} (dummy weights, synthetic artifact: {s.kv_layout} KV layout, "
            f"{s.kv_heads_per_layer} retrieval KV head(s) per layer), prefix caching on, prefill chunk "
            f"{s.max_num_batched_tokens}, engine args {shlex.join(s.engine_args) or 'none'}, max_model_len "
            f"{s.max_model_len:,}. `vllm bench serve`: {s.num_prompts} random prompts, lengths uniform in "
            f"[{low:,}, {high:,}] tokens as vLLM samples them (--random-input-len {plan.input_len} with "
            f"{plan.num_special} special token(s), input range ratio {plan.range_ratio!r}; the server adds the "
            f"special tokens), {s.output_len} output tokens each, all sent at once under client concurrency "
            f"{s.max_concurrency[0]}. Expected prefill: {plan.expected_prefill_tokens:,} tokens (fewer where "
            f"prefix caching hits).")


def parse_load_result(path: Path) -> dict[str, Any]:
    """The serving benchmark's numbers of a ``--save-result --save-detailed`` JSON, plus the prompt lengths
    (``input_lens``: min, max, mean tokens) and the distinct request errors with their counts."""
    data = json.loads(path.read_text())
    row = parse_serve_result(path)
    lengths = data.get("input_lens") or []
    if lengths:
        row.update(min_input_len=min(lengths), max_input_len=max(lengths), mean_input_len=sum(lengths) / len(lengths))
    errors = Counter(e for e in data.get("errors") or [] if e)
    row["errors"] = [{"error": e, "count": n} for e, n in errors.most_common(5)]
    return row


def describe_bench(bench: dict[str, Any]) -> str:
    """One line on the ``vllm bench serve`` run: requests, time, prompt tokens and rates."""
    if "duration" not in bench:
        return bench.get("error", "no result")
    prefill = bench.get("total_input_tokens", 0) / bench["duration"] if bench["duration"] else float("nan")
    lengths = (f"; prompt lengths {bench['min_input_len']:,}-{bench['max_input_len']:,} (mean "
               f"{bench['mean_input_len']:,.0f})" if "min_input_len" in bench else "")
    return (f"{bench.get('completed')} completed, {bench.get('failed')} failed in {bench['duration']:.1f} s; "
            f"{bench.get('total_input_tokens', 0):,} prompt tokens ({prefill:,.0f} tokens/s), "
            f"{bench.get('request_throughput', float('nan')):.2f} requests/s, "
            f"{bench.get('output_throughput', float('nan')):.1f} output tokens/s, median TTFT "
            f"{bench.get('median_ttft_ms', float('nan')):.0f} ms" + lengths)


def run_load(settings: Settings, section: dict[str, Any], port: int) -> None:
    """The load phase into ``section``: model folder and artifact, server, ``vllm bench serve``, the
    metrics once the server is idle."""
    s = settings.serving
    bs.write_model_dir(s)
    plan = load_run(settings, port)
    section.update(description=describe_load(settings, plan), settings=s.comparable(),
                   plan={"input_range": list(settings.input_range), "input_len": plan.input_len,
                         "range_ratio": plan.range_ratio, "num_special": plan.num_special,
                         "expected_prefill_tokens": plan.expected_prefill_tokens})
    print(f"[load] {section['description']}", flush=True)
    section["artifact"] = bs.write_artifact(s)
    print(f"[load] {bs.describe_artifact(section['artifact'])}", flush=True)
    log = s.out / "logs" / "server-load.log"
    with bs.recorded_server(section["commands"], bs.serve_command(s, BACKEND, port), port, log, "load", s):
        section["capacity"] = parse_kv_capacity(log.read_text(errors="replace"))
        section["bench"] = bs.run_bench(s, section, plan.run, parse_load_result)
        print(f"[load] {describe_bench(section['bench'])}", flush=True)
        section["after"] = settled_metrics(port, settings.settle_timeout)
        print(f"[load] /metrics after the run: {section['after']}", flush=True)


def load_criteria(settings: Settings, section: dict[str, Any]) -> list[dict[str, Any]]:
    """Every request completed and none failed; then the pool checks."""
    bench, want = section.get("bench"), settings.serving.num_prompts
    if bench is None:
        requests = criterion("requests", False, "vllm bench serve did not run")
    else:
        requests = criterion("requests", bench.get("completed") == want and bench.get("failed") == 0
                             and "error" not in bench,
                             f"{bench.get('completed')} of {want} completed, {bench.get('failed')} failed"
                             + "".join(f"; {e['count']}x {e['error'][:200]}" for e in bench.get("errors", []))
                             + (f"; {bench['error']}" if "error" in bench else ""))
    return [requests, *pool_criteria(section.get("after", {}))]


# ----------------------------------------------------------------------------------------------------
# Identity phase
# ----------------------------------------------------------------------------------------------------

def identity_prompts(settings: Settings) -> list[Prompt]:
    """``[identity_prompts]`` key-value retrieval prompts, lengths uniform in ``identity_lengths`` tokens
    (``<s>`` included), deterministic in ``--seed``."""
    rng = random.Random(settings.serving.seed)
    return [make_prompt(rng.randrange(2**31), rng.randint(*settings.identity_lengths))
            for _ in range(settings.identity_prompts)]


def identity_serve_command(settings: Settings, port: int) -> list[str]:
    """``vllm serve`` of the tiny trained model, prefix caching off; RTPURBO with its KV-budget artifact and
    the compact KV layout, FLASH_ATTN (the control) dense."""
    s = settings.serving
    rtpurbo = (["--additional-config", json.dumps(identity_rtpurbo_config())]
               if settings.identity_backend == BACKEND else [])
    return [*s.vllm, "serve", str(tiny_model_dir()), "--host", HOST, "--port", str(port),
            "--served-model-name", bs.SERVED_NAME, "--disable-uvicorn-access-log",
            "--attention-backend", settings.identity_backend,
            "--max-model-len", str(TINY_MAX_MODEL_LEN), "--gpu-memory-utilization", str(settings.identity_memory),
            "--no-enable-prefix-caching", "--generation-config", "vllm", "--seed", str(s.seed),
            *rtpurbo, *settings.identity_engine_args]


def identity_rtpurbo_config() -> dict:
    """The identity server's ``--additional-config``: the tiny model's KV-budget artifact, compact layout."""
    return {"rtpurbo": {"artifact": str(tiny_kv1_artifact_dir()), "kv_layout": bs.MEMORY_SAVING_LAYOUT}}


def describe_identity(settings: Settings, lengths: list[int]) -> str:
    """What the identity phase serves and sends, in one paragraph."""
    served = ("RTPURBO serving the tiny trained model (artifact rtpurbo-kv1, compact KV layout"
              if settings.identity_backend == BACKEND else
              f"{settings.identity_backend} serving the tiny trained model (dense, the control")
    return (f"{served}, prefix caching off, gpu-memory-utilization {settings.identity_memory}, engine args "
            f"{shlex.join(settings.identity_engine_args) or 'none'}). {len(lengths)} key-value retrieval prompts of "
            f"{min(lengths):,}-{max(lengths):,} tokens, {settings.identity_max_tokens} greedy tokens each: all at "
            f"once, then one at a time.")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One greedy completion: its text, its generated tokens and, per token, the top log-probabilities
    (``[max_tokens]`` dicts token -> log-probability)."""

    text: str
    tokens: tuple[str, ...]
    top_logprobs: tuple[dict[str, float], ...]


def complete_all(port: int, prompts: list[str], *, max_tokens: int, timeout: float,
                 concurrency: int) -> list[Completion]:
    """``/v1/completions`` for each prompt, at most ``concurrency`` at once: greedy, ``max_tokens`` tokens
    (EOS ignored), top-2 log-probabilities."""
    bodies = [{"model": bs.SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
               "ignore_eos": True, "logprobs": IDENTITY_LOGPROBS} for prompt in prompts]
    completions = []
    for reply in post_all(port, "/v1/completions", bodies, concurrency=concurrency, timeout=timeout):
        choice = reply["choices"][0]
        logprobs = choice.get("logprobs") or {}
        completions.append(Completion(choice["text"], tuple(logprobs.get("tokens") or ()),
                                      tuple(top or {} for top in logprobs.get("top_logprobs") or ())))
    return completions


def first_difference(a: Completion, b: Completion) -> int:
    """Index of the first generated token that differs (the shorter length if one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), min(len(a.tokens), len(b.tokens)))


def top2_margin(completion: Completion, position: int) -> float | None:
    """Top-1 minus top-2 log-probability at generated token ``position`` (None where not reported)."""
    if position >= len(completion.top_logprobs):
        return None
    values = sorted(completion.top_logprobs[position].values(), reverse=True)
    return values[0] - values[1] if len(values) >= 2 else None


def compare(prompts: list[Prompt], batched: list[Completion], sequential: list[Completion]) -> dict[str, Any]:
    """Batched against one-at-a-time completions, prompt by prompt: counts, the retrieval answers the
    batched pass got right, and one row per prompt whose text or tokens differ (its index, length, first
    differing token and the top-2 margins there)."""
    differ = []
    for index, (prompt, a, b) in enumerate(zip(prompts, batched, sequential)):
        if (a.text, a.tokens) == (b.text, b.tokens):
            continue
        at = first_difference(a, b)
        differ.append({"index": index, "prompt_tokens": len(prompt.ids), "token": at,
                       "batched": a.text, "sequential": b.text,
                       "batched_margin": top2_margin(a, at), "sequential_margin": top2_margin(b, at)})
    return {"prompts": len(prompts), "identical": len(prompts) - len(differ), "differ": differ,
            "correct_answers": sum(score(p.answer_text, a.text) for p, a in zip(prompts, batched))}


def describe_comparison(comparison: dict[str, Any]) -> str:
    """``N/M identical`` and one clause per prompt that differs."""
    line = f"{comparison['identical']}/{comparison['prompts']} prompts identical batched and one at a time"
    for row in comparison["differ"]:
        margins = ", ".join(f"{k} top-2 margin {row[f'{k}_margin']:.4f}" for k in ("batched", "sequential")
                            if row[f"{k}_margin"] is not None)
        line += (f"; prompt {row['index']} ({row['prompt_tokens']} tokens) differs at generated token "
                 f"{row['token']}{f' ({margins})' if margins else ''}: batched {row['batched']!r}, one at a time "
                 f"{row['sequential']!r}")
    return line


def run_identity(settings: Settings, section: dict[str, Any], port: int) -> None:
    """The identity phase into ``section``: tiny-model server, the prompts all at once, then one at a
    time, the metrics once the server is idle, the comparison."""
    s = settings.serving
    prompts = identity_prompts(settings)
    texts, lengths = [p.text for p in prompts], [len(p.ids) for p in prompts]
    section.update(description=describe_identity(settings, lengths), prompt_tokens=lengths,
                   settings={"identity_prompts": settings.identity_prompts,
                             "identity_lengths": list(settings.identity_lengths),
                             "identity_max_tokens": settings.identity_max_tokens, "seed": s.seed,
                             "identity_memory": settings.identity_memory,
                             "identity_engine_args": list(settings.identity_engine_args),
                             "identity_backend": settings.identity_backend})
    print(f"[identity] {section['description']}", flush=True)
    ask = functools.partial(complete_all, port, max_tokens=settings.identity_max_tokens, timeout=s.command_timeout)
    with bs.recorded_server(section["commands"], identity_serve_command(settings, port), port,
                            s.out / "logs" / "server-identity.log", "identity", s):
        start = time.monotonic()
        batched = ask(texts, concurrency=len(texts))
        middle = time.monotonic()
        sequential = [ask([text], concurrency=1)[0] for text in texts]
        section["seconds"] = {"batched": round(middle - start, 2), "sequential": round(time.monotonic() - middle, 2)}
        section["after"] = settled_metrics(port, settings.settle_timeout)
        print(f"[identity] /metrics after the requests: {section['after']}", flush=True)
    section["comparison"] = compare(prompts, batched, sequential)
    print(f"[identity] {describe_comparison(section['comparison'])}", flush=True)


def parts_at_near_tie(row: dict[str, Any]) -> bool:
    """Whether a differing prompt's paths part where the top-2 log-probabilities of either pass lie
    within ``NEAR_TIE`` (a tie at bf16 logit resolution, decided by rounding order)."""
    margins = [row[k] for k in ("batched_margin", "sequential_margin") if row[k] is not None]
    return bool(margins) and min(margins) < NEAR_TIE


def identity_criteria(settings: Settings, section: dict[str, Any]) -> list[dict[str, Any]]:
    """Every prompt's greedy output the same batched and alone, except where the two paths part at a
    near-tie (neither vLLM's batched steps nor its FLASH_ATTN are bitwise batch-invariant unless
    ``VLLM_BATCH_INVARIANT``: a tie at bf16 resolution goes either way); then the pool checks."""
    comparison = section.get("comparison")
    ok = comparison is not None and all(parts_at_near_tie(row) for row in comparison["differ"])
    detail = describe_comparison(comparison) if comparison else "no comparison (the phase did not finish)"
    if comparison and comparison["differ"] and ok:
        detail = f"each difference starts at a top-2 near-tie (< {NEAR_TIE} nats): {detail}"
    return [criterion("identical greedy outputs", ok, detail), *pool_criteria(section.get("after", {}))]


# ----------------------------------------------------------------------------------------------------
# Shared by the phases: pool check, criteria
# ----------------------------------------------------------------------------------------------------

def settled_metrics(port: int, timeout: float) -> dict[str, float]:
    """``POOL_METRICS`` from ``/metrics``, read again every 0.5 s until KV usage, running and waiting
    requests are all 0 or ``timeout`` seconds have passed (the gauges follow the engine's last step)."""
    deadline = time.monotonic() + timeout
    metrics = server_metrics(port, POOL_METRICS)
    while any(metrics.get(k) != 0 for k in ("kv_cache_usage", "running", "waiting")) and time.monotonic() < deadline:
        time.sleep(0.5)
        metrics = server_metrics(port, POOL_METRICS)
    return metrics


def pool_criteria(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """KV usage 0 (every block back in the pool) and no running or waiting request, from the metrics
    read after a phase; a metric that could not be read fails its criterion."""
    usage, running, waiting = (metrics.get(k) for k in ("kv_cache_usage", "running", "waiting"))
    return [criterion("KV blocks back in the pool", usage == 0,
                      f"vllm:kv_cache_usage_perc {usage}" if usage is not None else "no vllm:kv_cache_usage_perc"),
            criterion("no request left", running == 0 and waiting == 0,
                      f"{running:g} running, {waiting:g} waiting" if None not in (running, waiting)
                      else "no vllm:num_requests_running / vllm:num_requests_waiting")]


def criterion(name: str, passed: bool, detail: str) -> dict[str, Any]:
    """One pass/fail line of the report."""
    return {"name": name, "passed": bool(passed), "detail": detail}


def phase_criteria(settings: Settings, phase: str, section: dict[str, Any]) -> list[dict[str, Any]]:
    """The phase's own criteria, after one for an error that stopped it."""
    stopped = [criterion("ran to the end", False, section["error"])] if "error" in section else []
    return stopped + {"load": load_criteria, "identity": identity_criteria}[phase](settings, section)


# ----------------------------------------------------------------------------------------------------
# Results and report
# ----------------------------------------------------------------------------------------------------

def load_results(out: Path) -> dict[str, Any]:
    """The results file in ``out`` (its other phases are kept), or a new one."""
    path = out / RESULTS_JSON
    return json.loads(path.read_text()) if path.is_file() else {"environment": None, "phases": {}}


def save(out: Path, results: dict[str, Any]) -> None:
    """Writes the results JSON (atomically)."""
    write_text(out / RESULTS_JSON, json.dumps(results, indent=2))


def render_markdown(results: dict[str, Any]) -> str:
    """The report: verdict, criteria per phase, the phases' settings and numbers, every command."""
    env, phases = results.get("environment") or {}, results["phases"]
    rows = [(phase, c) for phase, section in phases.items() for c in section.get("criteria", [])]
    verdict = "PASSED" if rows and all(c["passed"] for _, c in rows) else "FAILED"
    lines = [f"# Stability under load: {verdict}", "",
             f"Card: {env.get('device')}; vLLM {env.get('versions', {}).get('vllm')}, torch "
             f"{env.get('versions', {}).get('torch')}, commit {env.get('commit')}.", "",
             "| phase | criterion | result | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {phase} | {c['name']} | {'pass' if c['passed'] else 'FAIL'} | "
              f"{' '.join(c['detail'].split()).replace('|', '/')} |" for phase, c in rows]
    if "load" in phases:
        load = phases["load"]
        after = load.get("after", {})
        lines += ["", "## Load", "", load.get("description", ""), "", describe_bench(load.get("bench", {})) + ".",
                  f"KV cache: {_count(load.get('capacity', {}).get('kv_cache_tokens'))} tokens; after the run: "
                  f"{_count(after.get('preemptions'))} preemptions, {_count(after.get('prefix_cache_hits'))} "
                  "prefix-cache hit tokens."]
    if "identity" in phases:
        identity = phases["identity"]
        comparison, seconds = identity.get("comparison"), identity.get("seconds", {})
        lines += ["", "## Identity", "", identity.get("description", "")]
        if comparison:
            lines += ["", f"{describe_comparison(comparison)}. Retrieval answers right (batched pass): "
                          f"{comparison['correct_answers']}/{comparison['prompts']}. Batched pass "
                          f"{seconds.get('batched')} s, one at a time {seconds.get('sequential')} s."]
    lines += ["", "## Commands", "", "```bash"]
    lines += [c["command"] for section in phases.values() for c in section.get("commands", [])]
    return "\n".join(lines + ["```", ""])


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def write_report(out: Path, results: dict[str, Any]) -> str:
    """Writes the markdown report next to the results JSON; returns it."""
    text = render_markdown(results)
    write_text(out / REPORT_MD, text)
    return text


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", metavar="PHASE", nargs="+", choices=PHASES, default=list(PHASES),
                        help="load and/or identity, run in this order (default both)")
    bs.add_server_arguments(parser)                                   # the load phase's server (SERVER_OPTIONS)
    parser.set_defaults(shape="llama3.2-1b", kv_layout=bs.MEMORY_SAVING_LAYOUT, kv_heads_per_layer=1, max_num_batched_tokens=8192,
                        engine_args="--no-async-scheduling")

    load = parser.add_argument_group("load phase: vllm bench serve")
    load.add_argument("--num-prompts", metavar="N", type=int, default=200, help="default 200")
    load.add_argument("--input-range", metavar=("MIN_K", "MAX_K"), type=int, nargs=2, default=[4, 128],
                      help="prompt lengths, uniform, in K = 1024 tokens (default 4 128)")
    load.add_argument("--output-len", metavar="N", type=int, default=32, help="output tokens (default 32)")
    load.add_argument("--max-concurrency", metavar="C", type=int, default=16, help="client concurrency (default 16)")

    ident = parser.add_argument_group("identity phase: the tiny trained model")
    ident.add_argument("--identity-prompts", metavar="N", type=int, default=24, help="default 24")
    ident.add_argument("--identity-lengths", metavar=("MIN", "MAX"), type=int, nargs=2, default=[300, 3900],
                       help="prompt lengths in tokens, uniform (default 300 3900)")
    ident.add_argument("--identity-max-tokens", metavar="N", type=int, default=16,
                       help="greedy tokens per prompt (default 16)")
    ident.add_argument("--identity-memory", metavar="SHARE", type=float, default=0.15,
                       help="its --gpu-memory-utilization (default 0.15)")
    ident.add_argument("--identity-engine-args", metavar="ARGS", default="",
                       help="more flags for its vllm serve, one shell-quoted string (default none)")
    ident.add_argument("--identity-backend", choices=IDENTITY_BACKENDS, default=BACKEND,
                       help="attention backend of its server: RTPURBO, or FLASH_ATTN as the dense control that "
                            "shows how batch-invariant vLLM itself is on the same prompts (default %(default)s)")

    run = parser.add_argument_group("running")
    run.add_argument("--settle-timeout", metavar="S", type=float, default=10,
                     help="seconds to wait for /metrics to show an idle server with every block free (default 10)")
    run.add_argument("--out", metavar="DIR", default="results/stability",
                     help="folder for the JSON, markdown, logs and raw results (default results/stability)")
    run.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    return parser


def print_dry_run(settings: Settings, port: int) -> None:
    """What each phase would serve and send, and its commands."""
    if "load" in settings.phases:
        plan = load_run(settings, port)
        print(f"# load: {describe_load(settings, plan)}")
        print(shlex.join(bs.serve_command(settings.serving, BACKEND, port)))
        print(shlex.join(plan.run.argv))
    if "identity" in settings.phases:
        lengths = [len(p.ids) for p in identity_prompts(settings)]
        print(f"\n# identity: {describe_identity(settings, lengths)}")
        print(shlex.join(identity_serve_command(settings, port)))
        print(f"# then POST http://{HOST}:{port}/v1/completions per prompt, batched and one at a time")


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_cli(build_parser().parse_args(argv))
    port = settings.serving.port or free_port()
    if settings.dry_run:
        print_dry_run(settings, port)
        return 0
    stop_on_sigterm()
    results = load_results(settings.out)
    results["environment"] = environment()
    runners = {"load": run_load, "identity": run_identity}
    try:
        for phase in settings.phases:
            section = results["phases"][phase] = {
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "argv": list(sys.argv[1:] if argv is None else argv), "commands": []}
            try:
                runners[phase](settings, section, port)
            except PHASE_ERRORS as exc:
                section["error"] = f"{type(exc).__name__}: {exc}"
                print(f"[{phase}] FAILED: {section['error']}", flush=True)
            except KeyboardInterrupt:
                section["error"] = INTERRUPTED
                raise
            finally:
                section["criteria"] = phase_criteria(settings, phase, section)
                save(settings.out, results)
    finally:
        save(settings.out, results)
        print(write_report(settings.out, results))
    ran = [c for phase in settings.phases for c in results["phases"][phase]["criteria"]]
    return 0 if all(c["passed"] for c in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
