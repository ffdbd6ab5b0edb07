"""KV capacity and decode step of whole engines (``vllm.LLM``, dummy weights), one configuration per process.

Each configuration is ``BACKEND:KV_DTYPE[:SELECTION[:LAYOUT[:INDEX]]]``: ``FLASH_ATTN:auto``,
``FLASH_ATTN:fp8``, ``RTPURBO:auto:kvgroup15``, ``RTPURBO:fp8:n1:compact``... ``SELECTION`` is the synthetic
artifact's head selection (``global15``: the global top 15 % of query heads, ``kvgroup15``: 15 % of KV
groups, ``n1``: one retrieval KV head per layer; random heads, as for dummy weights), ``LAYOUT`` RTPURBO's
KV layout (default ``compact``), ``INDEX`` its index keys' storage (``auto``, the default: e4m3 with an
fp8 cache, else the model's dtype; ``model`` or ``fp8_e4m3``: ``--additional-config`` ``index_key_dtype``).

* ``capacity``: the engine starts and reports its KV pool: vLLM's logged KV tokens and maximum
  concurrency (start-up arithmetic, which reserves a chunked prefill's in-flight window), and the
  sequences of ``--context`` tokens the pool holds while they decode (RTPURBO: the pool's bytes over
  :meth:`KVLayout.bytes_per_sequence`, the whole blocks a decoding sequence holds; FLASH_ATTN: tokens
  over the context).
* ``load``: what the pool really holds under load, with ``vllm serve``'s token budget on an H100/H200
  (``--max-num-batched-tokens`` 8192): more requests of ``--context`` distinct random tokens
  than the arithmetic above says fit (``ceil(1.2 * held) + 2``, at most ``--max-seqs``) are sent at
  once, each to generate ``--load-tokens`` tokens; the engine steps until every admitted request
  decodes and the rest wait for ``--stable-steps`` steps. Reported: the requests running then (vLLM's
  ``num_requests_running``: it admits a request only when its whole sequence fits), preemptions, and
  whether every request was admitted (then the count is a lower bound).
* ``replay`` (CPU, no engine): the same count replayed through vLLM's own scheduler and KV-cache manager
  (:mod:`rtpurbo_vllm.bench.capacity_replay`) for a pool of ``--kv-memory-gib`` (what the GPU run
  profiled), with ``vllm serve``'s scheduler settings on an H100/H200 (``--max-num-batched-tokens``
  8192, async scheduling); it also gives vLLM's logged KV tokens for that pool, to check against the GPU's.
* ``step``: per ``--batch`` B, the first B of one set of prompts of ``--context`` random tokens (so
  the prefix cache holds the largest batch's prompts, not every batch's), prefilled once into the
  prefix cache, then generated again with 1 and with ``1 + --steps`` output tokens, ``--repeats`` times
  in turn; the decode step is the median difference over ``--steps`` (every request decodes from the
  first step: the prompts hit the cache), with the smallest and largest beside it. A batch of more
  sequences of ``--context + 1 + --steps`` tokens than the pool holds (they would be preempted and
  prefilled again inside the timed runs) is listed in ``batches_over_pool`` instead of timed.
  ``load`` and ``step`` outputs are not detokenised (as ``vllm bench latency --disable-detokenize``): vLLM primes each request's
  incremental detokenizer with its whole prompt, which its first output token then decodes on the host,
  a cost that grows with the context and has nothing to do with attention. RTPURBO's retrieval heads keep
  about ``--keep`` of the blocks in decode and ``--prefill-top-p`` of them in prefill (both 0.03 by
  default: the paper's decode sparsity; what the prompts' prefill keeps changes neither the KV pool nor
  the decode step, so the ``load`` and ``step`` prompts prefill sparse, which is sooner; the artifact's
  ``top_p`` and ``prefill_top_p``, since dummy weights give flat indexer scores).

The ``capacity`` and ``load`` engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that
the pool's block count and the scheduler's queues can be read from it (``load`` stops after
``--load-seconds``); the ``step`` engine runs as vLLM runs it by default, its engine core
in a process of its own, so the scheduler and output processing overlap the GPU's steps as in a server.
``step --profile`` runs the engine in-process instead and adds, per batch, one more ``1 + --steps`` run
under ``torch.profiler``: its wall time per step beside the GPU kernel time per step (where the two
part, the step waits on the host) and the kernels that take the most time per step.

    python3 -P benchmarks/bench_engine.py capacity --out DIR --configs FLASH_ATTN:auto RTPURBO:auto:kvgroup15
    python3 -P benchmarks/bench_engine.py load --out DIR --configs RTPURBO:auto:n1
    python3 -P benchmarks/bench_engine.py replay --out DIR --configs FLASH_ATTN:auto RTPURBO:auto:n1   # CPU
    python3 -P benchmarks/bench_engine.py step --out DIR --batch 1 4 --configs RTPURBO:auto:global15:full ...

Results: ``DIR/bench_engine.json`` (rows merged across invocations, every invocation's arguments, the last
invocation's environment: card, versions, commit, ``VLLM_*`` settings) and ``DIR/bench_engine.md``;
``python -m rtpurbo_vllm.bench.summary record DIR/bench_engine.json`` takes its headline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from rtpurbo_vllm import outputs
from rtpurbo_vllm.bench.environment import environment
from rtpurbo_vllm.bench.serving import LLAMA3_8B
from rtpurbo_vllm.bench.vllm_results import parse_kv_capacity

SELECTIONS = {"global15": {"ratio": 0.15}, "kvgroup15": {"ratio": 0.15, "by_kv_group": True},
              "n1": {"ratio": None, "kv_heads_per_layer": 1}}
RESULTS_JSON, REPORT_MD = "bench_engine.json", "bench_engine.md"
# The KV-cache block size every engine is given: vLLM's default, set explicitly because after start-up
# vLLM's cache_config.block_size is its smallest KV-cache group's block size, not the one the RTPURBO
# layout was planned from.
BLOCK_SIZE = 16


def parse_config(text: str) -> dict:
    """``BACKEND:KV_DTYPE[:SELECTION[:LAYOUT[:INDEX]]]`` as a dict, its ``name`` with the defaults spelled out
    (``INDEX`` only when not ``auto``); raises ``ValueError`` naming the problem."""
    from rtpurbo_vllm.kv_cache.layout import INDEX_KEY_DTYPES

    parts = text.split(":")
    backend, kv_dtype = (parts + ["auto"])[:2]
    if backend not in ("FLASH_ATTN", "RTPURBO") or kv_dtype not in ("auto", "fp8"):
        raise ValueError(f"bad configuration {text!r}: expected FLASH_ATTN|RTPURBO:auto|fp8[:selection[:layout]]")
    selection = parts[2] if len(parts) > 2 else ("global15" if backend == "RTPURBO" else None)
    layout = parts[3] if len(parts) > 3 else ("compact" if backend == "RTPURBO" else None)
    index = parts[4] if len(parts) > 4 else ("auto" if backend == "RTPURBO" else None)
    if backend == "RTPURBO" and (selection not in SELECTIONS or layout not in ("compact", "full")
                                 or index not in INDEX_KEY_DTYPES):
        raise ValueError(f"bad configuration {text!r}: selection one of {sorted(SELECTIONS)}, layout compact|full, "
                         f"index keys one of {'|'.join(INDEX_KEY_DTYPES)}")
    fields = [backend, kv_dtype, selection, layout] + ([index] if index not in (None, "auto") else [])
    name = ":".join(p for p in fields if p)
    return {"name": name, "backend": backend, "kv_dtype": kv_dtype, "selection": selection, "layout": layout,
            "index_key_dtype": index}


def model_dir(out: Path, context: int, selection: str | None, keep: float, prefill_keep: float) -> Path:
    """A Llama-3-8B-shape folder (config.json, the tiny tokenizer) with a synthetic artifact for ``selection``
    whose decode ``top_p`` is ``keep`` and ``prefill_top_p`` ``prefill_keep``: dummy weights give flat
    indexer scores, on which top-p keeps about that share of the blocks (as ``bench_serving.py --keep``)."""
    from rtpurbo_vllm.artifacts import SparsityParams
    from rtpurbo_vllm.calibration.synthesize import synthesize_artifact
    from rtpurbo_vllm.tiny.tokenizer import save_tokenizer

    path = out / f"model-{context}"
    config = {**LLAMA3_8B, "max_position_embeddings": context + 4096}
    outputs.write_json(path / "config.json", config)
    if not (path / "tokenizer.json").exists():
        save_tokenizer(path)
    if selection is not None:
        synthesize_artifact(path, path / f"rtpurbo-{selection}", **SELECTIONS[selection], seed=0,
                            params=SparsityParams(top_p=keep, prefill_top_p=prefill_keep))
    return path


def engine(cfg: dict, path: Path, context: int, max_num_seqs: int, gpu_memory_utilization: float,
           max_num_batched_tokens: int | None = None):
    """A ``vllm.LLM`` of ``cfg``; ``max_num_batched_tokens`` None leaves vLLM's default (``vllm.LLM``'s)."""
    from vllm import LLM

    kwargs = dict(model=str(path), load_format="dummy", attention_backend=cfg["backend"], max_model_len=context + 2048,
                  block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization,
                  seed=0, enable_prefix_caching=True, max_num_batched_tokens=max_num_batched_tokens)
    if cfg["kv_dtype"] == "fp8":
        kwargs["kv_cache_dtype"] = "fp8"
    if cfg["backend"] == "RTPURBO":
        kwargs["additional_config"] = {"rtpurbo": {"artifact": str(path / f"rtpurbo-{cfg['selection']}"),
                                                   "kv_layout": cfg["layout"],
                                                   "index_key_dtype": cfg["index_key_dtype"]}}
    return LLM(**kwargs)


def held_sequences(llm, cfg: dict, context: int) -> float:
    """Sequences of ``context`` tokens the pool holds while they decode."""
    import torch

    vllm_config = llm.llm_engine.vllm_config
    num_blocks = vllm_config.cache_config.num_gpu_blocks
    if cfg["backend"] == "FLASH_ATTN":
        return num_blocks * BLOCK_SIZE / context
    from rtpurbo_vllm.attention.serving_config import serving_artifact
    from rtpurbo_vllm.kv_cache import KVLayout, index_key_dtype

    kv_dtype = torch.uint8 if cfg["kv_dtype"] == "fp8" else torch.bfloat16
    layout = KVLayout.from_artifact(serving_artifact(vllm_config), name=cfg["layout"], kv_dtype=kv_dtype,
                                    index_dtype=index_key_dtype(cfg["index_key_dtype"], torch.bfloat16, kv_dtype),
                                    block_unit=BLOCK_SIZE)
    return num_blocks * layout.bytes_per_block / layout.bytes_per_sequence(context)


def load_requests(held: float, max_seqs: int) -> int:
    """Requests the ``load`` phase sends: more than ``held`` (the arithmetic) says fit, at most ``max_seqs``."""
    return min(max_seqs, math.ceil(1.2 * held) + 2)


def fill_until_full(llm_engine, scheduler, prompts: list, params, stable_steps: int, time_limit: float) -> dict:
    """Adds every prompt at once, then steps ``llm_engine`` until the scheduler's queues settle
    (:class:`~rtpurbo_vllm.bench.capacity_replay.Settling`). Returns ``held_requests`` (running then),
    ``all_admitted``, ``preemptions`` (summed over the requests), ``steps`` and ``seconds``; on
    ``time_limit`` seconds, the state then and ``timed_out``."""
    from rtpurbo_vllm.bench.capacity_replay import Settling

    for i, prompt in enumerate(prompts):
        llm_engine.add_request(f"load-{i}", prompt, params)
    requests = dict(scheduler.requests)                   # every request, whatever queue it moves to
    start, steps, watch, timed_out = time.perf_counter(), 0, Settling(stable_steps), False
    while True:
        llm_engine.step()
        steps += 1
        if watch.settled(scheduler):
            break
        if time.perf_counter() - start > time_limit:
            timed_out = True
            break
    return {**watch.state(scheduler), "num_requests": len(prompts),
            "preemptions": sum(r.num_preemptions for r in requests.values()), "steps": steps,
            "seconds": round(time.perf_counter() - start, 1), "timed_out": timed_out}


def replay_row(cfg: dict, args) -> dict:
    """The ``replay`` phase's row of one configuration, in this process."""
    import torch

    from rtpurbo_vllm.artifacts import load_artifact
    from rtpurbo_vllm.bench.capacity_replay import ReplaySettings, dense_specs, replay_held, replay_vllm_config
    from rtpurbo_vllm.kv_cache import KVLayout, index_key_dtype
    from rtpurbo_vllm.kv_cache.side_layers import collected_specs

    path = model_dir(args.out, args.context, cfg["selection"], args.keep, args.prefill_top_p)
    pool = {} if args.kv_memory_gib is None else {"kv_memory_bytes": round(args.kv_memory_gib * 2**30)}
    settings = ReplaySettings(context=args.context, max_num_batched_tokens=args.max_num_batched_tokens,
                              kv_cache_dtype=cfg["kv_dtype"], **pool)
    config = replay_vllm_config(path, settings)
    if cfg["backend"] == "FLASH_ATTN":
        specs = dense_specs(config)
    else:
        artifact = load_artifact(path / f"rtpurbo-{cfg['selection']}")
        kv_dtype = torch.uint8 if cfg["kv_dtype"] == "fp8" else torch.bfloat16
        layout = KVLayout.from_artifact(artifact, name=cfg["layout"], kv_dtype=kv_dtype,
                                        index_dtype=index_key_dtype(cfg["index_key_dtype"], torch.bfloat16, kv_dtype))
        names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(layout.num_layers))
        specs = collected_specs(layout, names, cfg["kv_dtype"], config)
    replayed = replay_held(config, specs, settings)
    return {**cfg, "context": args.context, "kv_memory_gib": round(settings.kv_memory_bytes / 2**30, 2),
            "max_num_batched_tokens": args.max_num_batched_tokens, "vllm_kv_tokens": replayed.pop("kv_cache_tokens"),
            "vllm_max_concurrency": replayed.pop("max_concurrency"), "timed_out": False, **replayed}


def run_one(args) -> dict:
    """One configuration in this process (the child side); returns its row."""
    import random

    from vllm.inputs import TokensPrompt

    def random_prompts(count: int, seed: int) -> list:
        rng = random.Random(seed)
        return [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 30000) for _ in range(args.context)])
                for _ in range(count)]

    cfg = parse_config(args.one)
    path = model_dir(args.out, args.context, cfg["selection"], args.keep, args.prefill_top_p)
    load = args.phase == "load"
    max_seqs = args.max_seqs if load else max(args.batch + [8])
    llm = engine(cfg, path, args.context, max_seqs, args.gpu_memory_utilization,
                 args.max_num_batched_tokens if load else None)
    row = {**cfg, "context": args.context, "keep": args.keep, "prefill_top_p": args.prefill_top_p,
           "held_sequences": round(held_sequences(llm, cfg, args.context), 2),
           "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks}
    if args.phase == "capacity":
        return row
    if load:
        prompts = random_prompts(load_requests(row["held_sequences"], max_seqs), seed=0)
        params = fixed_length_params(args.load_tokens)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler      # in-process engine core
        return {**row, "max_num_batched_tokens": args.max_num_batched_tokens,
                **fill_until_full(llm.llm_engine, scheduler, prompts, params, args.stable_steps, args.load_seconds)}

    # A batch whose sequences do not all fit in the pool at their last step would be preempted and
    # prefill again inside the timed runs: such a batch is reported, not timed.
    room = held_sequences(llm, cfg, args.context + 1 + args.steps)
    timed_batches = [b for b in args.batch if b <= room]
    row["batches_over_pool"] = [b for b in args.batch if b > room]
    steps, spread, profiles = {}, {}, {}
    shared = random_prompts(max(timed_batches, default=0), seed=1)
    for batch in timed_batches:
        prompts = shared[:batch]

        def timed(max_tokens):
            start = time.perf_counter()
            llm.generate(prompts, fixed_length_params(max_tokens), use_tqdm=False)
            return time.perf_counter() - start

        timed(1)                                     # prefill into the prefix cache
        pairs = sorted((timed(1 + args.steps) - timed(1)) / args.steps * 1000 for _ in range(args.repeats))
        steps[str(batch)] = round(pairs[len(pairs) // 2], 3)
        spread[str(batch)] = [round(pairs[0], 3), round(pairs[-1], 3)]
        if args.profile:
            profiles[str(batch)] = profiled(lambda: timed(1 + args.steps), args.steps)
    row["decode_step_ms"], row["decode_step_range_ms"] = steps, spread
    if args.profile:
        row["profile"] = profiles
    return row


def fixed_length_params(max_tokens: int):
    """Sampling of ``load`` and ``step`` requests: exactly ``max_tokens`` greedy tokens, not detokenised
    (module docstring)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0,
                          detokenize=False)


def profiled(run, steps: int) -> dict:
    """``run()`` (one generate of ``1 + steps`` tokens, returning its seconds) under ``torch.profiler``:
    :func:`~rtpurbo_vllm.bench.timing.kernel_table` per step of the CUDA kernels it launched (the run's one
    prefill step spread over the steps too)."""
    from rtpurbo_vllm.bench.timing import kernel_table, profile_kernels

    seconds, kernels = profile_kernels(run)
    return kernel_table(kernels, seconds, steps)


def run_child(cfg: str, args) -> dict:
    """Runs one configuration in a fresh process (its GPU memory is freed when it exits)."""
    log = args.out / f"{args.phase}-{cfg.replace(':', '_')}.log"
    argv = [sys.executable, "-P", __file__, args.phase, "--one", cfg, "--out", str(args.out), "--context",
            str(args.context), "--keep", str(args.keep), "--prefill-top-p", str(args.prefill_top_p),
            "--steps", str(args.steps), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--repeats", str(args.repeats), "--batch", *map(str, args.batch), "--max-seqs", str(args.max_seqs),
            "--load-tokens", str(args.load_tokens), "--stable-steps", str(args.stable_steps),
            "--load-seconds", str(args.load_seconds), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            *(["--profile"] if args.profile else [])]
    # The pool's block count and the scheduler's queues / the profiler's view need the engine in this process.
    in_process = args.phase in ("capacity", "load") or args.profile
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_process else dict(os.environ)
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
    text = log.read_text(errors="replace")
    rows = [json.loads(line[len("ROW "):]) for line in text.splitlines() if line.startswith("ROW ")]
    row = rows[-1] if rows else {"name": cfg, "error": f"exit {proc.returncode}, see {log.name}"}
    capacity = parse_kv_capacity(text)
    row["vllm_kv_tokens"], row["vllm_max_concurrency"] = capacity["kv_cache_tokens"], capacity["max_concurrency"]
    return row


def render(results: dict) -> str:
    lines = ["| phase | configuration | vLLM KV tokens | vLLM max concurrency | held sequences | held under load "
             "| decode step (ms) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        ranges = row.get("decode_step_range_ms", {})
        step = ", ".join([f"b{b}: {ms}" + (" ({} - {})".format(*ranges[b]) if b in ranges else "")
                          for b, ms in row.get("decode_step_ms", {}).items()]
                         + [f"b{b}: over the pool" for b in row.get("batches_over_pool", [])])
        load = ""
        if "held_requests" in row:
            load = (f"{'>= ' if row['all_admitted'] else ''}{row['held_requests']} of {row['num_requests']}, "
                    f"{row['preemptions']} preemptions" + (", timed out" if row["timed_out"] else ""))
        lines.append(f"| {row['phase']} | {row['name']} | {row.get('vllm_kv_tokens', '')} | "
                     f"{row.get('vllm_max_concurrency', '')} | {row.get('held_sequences', '')} | {load} | "
                     f"{step or row.get('error', '')} |")
    profiled_rows = [(row["name"], b, p) for row in results["rows"] for b, p in row.get("profile", {}).items()]
    if profiled_rows:
        lines += ["", "| configuration | batch | wall ms / step | GPU kernels ms / step | top kernels (ms / step) |",
                  "| --- | --- | --- | --- | --- |"]
        for name, batch, p in profiled_rows:
            top = "; ".join(f"{k['name'][:40]} {k['ms']}" for k in p["kernels"][:4])
            lines.append(f"| {name} | {batch} | {p['wall_ms']} | {p['gpu_ms']} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("capacity", "load", "replay", "step"))
    parser.add_argument("--configs", nargs="+", default=[])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--keep", metavar="SHARE", type=float, default=0.03,
                        help="the synthetic artifact's decode top_p: about the share of blocks it keeps on dummy "
                             "weights' flat indexer scores (as bench_serving.py --keep)")
    parser.add_argument("--prefill-top-p", metavar="SHARE", type=float, default=0.03,
                        help="the synthetic artifact's prefill_top_p: about the share of blocks a prompt's query "
                             "tiles keep (1: dense retrieval heads)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="(1, 1 + steps) pairs per batch; the median counts")
    parser.add_argument("--profile", action="store_true",
                        help="step: in-process engine, one more run per batch under torch.profiler")
    parser.add_argument("--max-seqs", type=int, default=64, help="load: max_num_seqs, the most requests sent")
    parser.add_argument("--load-tokens", type=int, default=1024, help="load: output tokens of each request")
    parser.add_argument("--stable-steps", type=int, default=16,
                        help="load: steps the running count must hold with requests waiting")
    parser.add_argument("--load-seconds", type=float, default=360,
                        help="load: stop stepping after this long (then the row says timed out)")
    parser.add_argument("--kv-memory-gib", type=float, default=None,
                        help="replay: the KV pool's memory in GiB (default: capacity_replay.ReplaySettings', the "
                             "H200 runs' pool at utilization 0.9)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192,
                        help="load, replay: the scheduler's token budget (default 8192, vllm serve's on H100/H200; "
                             "capacity and step keep vllm.LLM's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--timeout", type=float, default=560)
    args = parser.parse_args(argv)
    try:
        configs = [parse_config(c) for c in args.configs]
        for flag, share in (("--keep", args.keep), ("--prefill-top-p", args.prefill_top_p)):
            if not 0.0 < share <= 1.0:
                raise ValueError(f"{flag} must be in (0, 1], got {share}")
        if min(args.repeats, args.steps, args.max_seqs, args.load_tokens, args.stable_steps, *args.batch) < 1:
            raise ValueError("--repeats, --steps, --batch, --max-seqs, --load-tokens and --stable-steps must be >= 1")
        if args.load_tokens > 2048:
            raise ValueError("--load-tokens must be <= 2048 (the engines' max_model_len is --context + 2048)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.one:
        print("ROW " + json.dumps(run_one(args)), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / RESULTS_JSON
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": []}
    results["environment"] = environment()        # the card, versions, commit and VLLM_* settings
    results.setdefault("invocations", []).append({"argv": list(sys.argv[1:] if argv is None else argv)})
    for cfg in configs:
        measured = replay_row(cfg, args) if args.phase == "replay" else run_child(cfg["name"], args)
        row = {"phase": args.phase, **measured}
        results["rows"] = [r for r in results["rows"] if (r["phase"], r["name"]) != (args.phase, cfg["name"])] + [row]
        outputs.write_json(results_path, results)
        print(json.dumps(row), flush=True)
    outputs.write_bytes(args.out / REPORT_MD, render(results).encode())
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
