"""End to end on one card: FLASH_ATTN against RTPURBO under ``vllm serve``, ``vllm bench serve`` and
``vllm bench latency``, with dummy weights and a synthetic RTPurbo artifact.

For each backend (FLASH_ATTN first, then RTPURBO) it

1. starts ``vllm serve`` on 127.0.0.1 (``--load-format dummy``, prefix caching off so repeated random
   prompts cannot hit the cache; ``--prefix-caching`` turns it on), waits for ``/health`` (bounded),
   and reads the KV capacity from the server's log: ``GPU KV cache size: N tokens`` and ``Maximum
   concurrency for M tokens per request: Cx``, and prints RTPURBO's max concurrency over FLASH_ATTN's
   next to the ratio the compact KV layout predicts for the artifact (``KVLayout.vllm_capacity_ratio``;
   ``--kv-layout``, ``--kv-heads-per-layer``);
2. runs ``vllm bench serve`` (random dataset) at each input length and max concurrency and collects
   TTFT, TPOT, ITL and throughput from its ``--save-result`` JSON (``--decode-only``: each context's
   prompts are sent once first, unmeasured, so the measured runs find their KV in the prefix cache and
   time decode alone); then stops the server (SIGTERM, SIGKILL after a timeout, also on errors and
   Ctrl-C);
3. runs ``vllm bench latency`` (random token ids) at one input length for each batch size and output
   length, from its ``--output-json`` (each run starts its own engine, so the server must be stopped
   first). Two output lengths (``--latency-output-len 1 513``) also give the decode step alone,
   engine-side: the runs differ only in their decode steps, so ``(latency(513) - latency(1)) / 512``
   is the batch's TPOT with no API server in the way (at 128K-token prompts the API server's
   per-request work staggers concurrent requests by seconds, so ``vllm bench serve`` at concurrency 4
   never has 4 requests decoding together).

The model defaults to a Llama-3-8B-shape ``config.json`` written by this script (32 layers, 32 query /
8 KV heads, d = 128, vocabulary 128256); ``--shape llama3.2-1b`` writes a Llama-3.2-1B shape instead
(16 layers, 32 query / 8 KV heads, d = 64, hidden 2048). Prompts are random tokens in every case:
``vllm bench serve`` needs a tokenizer to make text prompts, and by default it gets the tiny test model's
word-level tokenizer (``rtpurbo_vllm/tiny/model``, 268 words, written from
:mod:`rtpurbo_vllm.tiny.tokenizer` when that folder is absent), so prompts are random word sequences;
``--tokenizer`` takes another.

**Kept-block share.** The artifact is synthetic (random retrieval heads, random indexer, see
``rtpurbo-calibrate synthesize``). Dummy weights are uniform in +-1e-3, so pre-RoPE queries and keys
are ~1e-5 and every indexer score is ~1e-9: the indexer softmax is flat, block masses are equal, and
block top-p keeps the fewest blocks that reach ``top_p`` of the mass, i.e. about ``top_p`` of the blocks.
So the share is controlled through the artifact's ``top_p`` (``--keep``, default 0.03: the paper measures
> 97% decode sparsity at 512K), and the script prints the share that top-p keeps on flat scores at each
context (``block_topp_ref``, sink and current block included). The serving path does not report the
share it actually kept, so it is not measured here. Which blocks are kept (the flat tie-break keeps the
first ones) does not matter for timing. Prefill (TTFT) depends on ``--prefill-top-p``: at 1 (the
default, as in a calibrated artifact) retrieval heads run dense; below 1 each query tile of a retrieval
head keeps its sinks, its diagonal blocks and about that share of the blocks before it. Local heads see
sinks + window either way.

Results go to ``--out``: ``bench_serving.json`` (one dict: environment, settings, artifact, KV capacity,
rows, every command with its log), ``bench_serving.md`` (tables and ratios) and ``bench_serving.png``.
Several invocations into the same ``--out`` merge (rows with the same backend and shape are replaced), so
a long sweep can be split into shorter commands; settings that change the numbers must match.
Runs made in parallel into separate folders (one backend per GPU: ``scripts/gpu_pair.sh``) are joined
with ``--merge DIR...``.

Run on a GPU machine from the repo root, for example:
    python3 -P benchmarks/bench_serving.py --out results/serving --dry-run     # print the commands
    python3 -P benchmarks/bench_serving.py --out results/serving --contexts 32 128 256
    python3 -P benchmarks/bench_serving.py --out results/serving --backends RTPURBO --phases latency
    python3 -P benchmarks/bench_serving.py --out results/serving --report-only
    python3 -P benchmarks/bench_serving.py --out results/fa --merge results/rtp   # one table of both
    python3 -P benchmarks/bench_serving.py --out results/lat --phases latency --contexts 128 --latency-batch 4 \
        --latency-output-len 1 513                                                  # decode step at batch 4
    python3 -P benchmarks/bench_serving.py --out results/kv1 --kv-layout compact --kv-heads-per-layer 1 --contexts 128
    python3 -P benchmarks/bench_serving.py --out results/kv --kv-layout compact --phases capacity   # startup only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from rtpurbo_vllm.bench.environment import environment
from rtpurbo_vllm.bench.server import (
    HOST,
    INTERRUPTED,
    Child,
    free_port,
    run_command,
    running_server,
    server_metrics,
    stop_on_sigterm,
    vllm_command,
)
from rtpurbo_vllm.bench.serving_report import (
    BACKENDS,
    FULL_LAYOUT,
    MEMORY_SAVING_LAYOUT,
    capacity_comparison,
    describe_artifact,
    describe_prediction,
    failures,
    figure,
    render_markdown,
    summary,
)
from rtpurbo_vllm.bench.vllm_results import SERVE_METRICS, parse_kv_capacity, parse_latency_result, parse_serve_result
from rtpurbo_vllm.outputs import write_figure, write_json, write_text

PHASES = ("serve", "latency", "capacity")
SERVED_NAME = "rtpurbo-bench"
RESULTS_JSON, REPORT_MD, PLOT_PNG = "bench_serving.json", "bench_serving.md", "bench_serving.png"
TOKENIZER_HEADROOM = 128          # tokens of max_model_len beyond the longest request (round-trip mismatch)
DEFAULT_RATIO = 0.15              # rtpurbo-calibrate's default share of retrieval heads
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
LLAMA32_1B = {**LLAMA3_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
              "tie_word_embeddings": True}
SHAPES = {"llama3-8b": LLAMA3_8B, "llama3.2-1b": LLAMA32_1B}     # --shape: config.json of the dummy model
# Settings that change the numbers: results made with other values are never merged into one file.
COMPARABLE = ("model", "tokenizer", "max_model_len", "top_p", "prefill_top_p", "ratio", "by_kv_group",
              "kv_heads_per_layer", "seed", "kv_layout", "prefix_caching", "decode_only",
              "gpu_memory_utilization", "max_num_batched_tokens", "engine_args", "output_len", "num_prompts",
              "num_warmups", "latency_output_len", "latency_iters", "latency_warmup")



# ----------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated command line; token counts are tokens (the CLI takes K = 1024 tokens)."""

    out: Path
    model: Path | None
    shape: str
    tokenizer: Path | None
    vllm: tuple[str, ...]
    ratio: float | None
    by_kv_group: bool
    kv_heads_per_layer: int | None
    top_p: float
    prefill_top_p: float
    seed: int
    kv_layout: str
    prefix_caching: bool
    decode_only: bool
    backends: tuple[str, ...]
    phases: tuple[str, ...]
    port: int
    max_model_len: int
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    engine_args: tuple[str, ...]
    startup_timeout: float
    stop_timeout: float
    command_timeout: float
    contexts: tuple[int, ...]
    output_len: int
    num_prompts: int
    max_concurrency: tuple[int, ...]
    num_warmups: int
    latency_context: int
    latency_batch: tuple[int, ...]
    latency_output_len: tuple[int, ...]
    latency_iters: int
    latency_warmup: int
    fresh: bool
    dry_run: bool
    report_only: bool
    merge: tuple[Path, ...]

    def sparsity_params(self):
        """The synthetic artifact's ``SparsityParams``: ``top_p`` and ``prefill_top_p`` from the command line."""
        from rtpurbo_vllm.artifacts import SparsityParams

        return SparsityParams(top_p=self.top_p, prefill_top_p=self.prefill_top_p)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> Settings:
        """Checks the parsed flags; a bad value raises ValueError naming the flag."""
        contexts = tuple(k * 1024 for k in args.contexts)
        latency_context = args.latency_context * 1024
        # The longest request of the phases that run (a latency-only run is not sized by --contexts).
        serving = {"serve", "capacity"} & set(args.phases)
        needed = max([*(c + args.output_len for c in contexts if serving),
                      *([latency_context + max(args.latency_output_len)] if "latency" in args.phases else [])])
        max_model_len = args.max_model_len or needed + TOKENIZER_HEADROOM
        top_p = args.top_p if args.top_p is not None else args.keep
        # --ratio defaults to 0.15; a per-layer KV budget alone takes every query head of its KV groups.
        ratio = args.ratio if args.ratio is not None or args.kv_heads_per_layer is not None else DEFAULT_RATIO
        checks = [
            (min(contexts) > 0, "--contexts must be positive"),
            (latency_context > 0, "--latency-context must be positive"),
            (0.0 < top_p <= 1.0, "--keep / --top-p must be in (0, 1]"),
            (0.0 < args.prefill_top_p <= 1.0, "--prefill-top-p must be in (0, 1]"),
            (ratio is None or 0.0 < ratio <= 1.0, "--ratio must be in (0, 1]"),
            (args.kv_heads_per_layer is None or args.kv_heads_per_layer >= 1, "--kv-heads-per-layer must be >= 1"),
            (min(args.output_len, args.num_prompts, *args.latency_output_len, args.latency_iters) >= 1,
             "--output-len, --num-prompts, --latency-output-len and --latency-iters must be >= 1"),
            (min(args.max_concurrency) >= 1 and min(args.latency_batch) >= 1,
             "--max-concurrency and --latency-batch must be >= 1"),
            (min(args.num_warmups, args.latency_warmup) >= 0, "--num-warmups and --latency-warmup must be >= 0"),
            (max_model_len >= needed, f"--max-model-len {max_model_len} is below the longest request ({needed})"),
            (0.0 < args.gpu_memory_utilization <= 1.0, "--gpu-memory-utilization must be in (0, 1]"),
            (args.model is None or (Path(args.model) / "config.json").is_file(),
             f"--model {args.model} has no config.json"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # Absolute paths: the children run in OUT.
        return cls(
            out=Path(args.out).resolve(), model=Path(args.model).resolve() if args.model else None, shape=args.shape,
            tokenizer=Path(args.tokenizer).resolve() if args.tokenizer else None,
            vllm=tuple(shlex.split(args.vllm)), ratio=ratio,
            by_kv_group=args.by_kv_group, kv_heads_per_layer=args.kv_heads_per_layer, top_p=top_p,
            prefill_top_p=args.prefill_top_p, seed=args.seed,
            kv_layout=args.kv_layout, prefix_caching=args.prefix_caching or args.decode_only,
            decode_only=args.decode_only,
            backends=tuple(args.backends),
            phases=tuple(args.phases), port=args.port, max_model_len=max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization, max_num_batched_tokens=args.max_num_batched_tokens,
            engine_args=tuple(shlex.split(args.engine_args)), startup_timeout=args.startup_timeout,
            stop_timeout=args.stop_timeout, command_timeout=args.command_timeout, contexts=contexts,
            output_len=args.output_len, num_prompts=args.num_prompts, max_concurrency=tuple(args.max_concurrency),
            num_warmups=args.num_warmups, latency_context=latency_context, latency_batch=tuple(args.latency_batch),
            latency_output_len=tuple(sorted(set(args.latency_output_len))), latency_iters=args.latency_iters,
            latency_warmup=args.latency_warmup, fresh=args.fresh, dry_run=args.dry_run,
            report_only=args.report_only, merge=tuple(Path(d).resolve() for d in args.merge))

    @property
    def model_dir(self) -> Path:
        """The model folder served: ``--model``, else the ``--shape`` folder this script writes."""
        return self.model if self.model is not None else self.out / f"{self.shape}-dummy"

    @property
    def artifact_dir(self) -> Path:
        """Where the synthetic artifact is written (never inside a user's model folder)."""
        return self.out / "rtpurbo-synthetic"

    @property
    def tokenizer_dir(self) -> Path:
        """``--tokenizer``; else ``--model``; else the tiny model's folder, or a copy of its tokenizer."""
        from rtpurbo_vllm.tiny import tiny_model_dir

        if self.tokenizer is not None:
            return self.tokenizer
        if self.model is not None:
            return self.model
        tiny = tiny_model_dir()
        return tiny if (tiny / "tokenizer.json").is_file() else self.out / "tiny-tokenizer"

    def comparable(self) -> dict[str, Any]:
        """The settings that must match for two invocations' rows to share one results file."""
        values = {"model": str(self.model_dir), "tokenizer": str(self.tokenizer_dir),
                  "engine_args": list(self.engine_args), "latency_output_len": list(self.latency_output_len)}
        return {k: values.get(k, getattr(self, k)) for k in COMPARABLE}


# ----------------------------------------------------------------------------------------------------
# Model folder, tokenizer, artifact
# ----------------------------------------------------------------------------------------------------

def shape_config(settings: Settings) -> dict[str, Any]:
    """The ``config.json`` of the ``--shape`` dummy model, long enough for ``max_model_len``."""
    return {**SHAPES[settings.shape], "max_position_embeddings": settings.max_model_len}


def write_model_dir(settings: Settings) -> None:
    """Writes the ``--shape`` ``config.json`` (:func:`shape_config`) and, when the tiny model folder is
    absent, the tiny tokenizer. A ``--model`` folder is left untouched."""
    if settings.model is None:
        write_json(settings.model_dir / "config.json", shape_config(settings))
    if settings.tokenizer_dir == settings.out / "tiny-tokenizer":
        from rtpurbo_vllm.tiny.tokenizer import save_tokenizer

        save_tokenizer(settings.tokenizer_dir)


def write_artifact(settings: Settings) -> dict[str, Any]:
    """Writes the synthetic artifact for ``settings.model_dir`` and describes it, with the kept-block
    share that top-p selects on flat indexer scores at each context (see the module docstring)."""
    from rtpurbo_vllm.calibration.synthesize import synthesize_artifact

    from rtpurbo_vllm.artifacts import load_artifact

    params = settings.sparsity_params()
    path = synthesize_artifact(settings.model_dir, settings.artifact_dir, **selection(settings), seed=settings.seed,
                               params=params)
    config = json.loads((path / "rtpurbo_config.json").read_text())
    heads = sum(len(layer) for layer in config["retrieval_heads"])
    total = config["model"]["num_layers"] * config["model"]["num_heads"]
    contexts = sorted({*settings.contexts, settings.latency_context})
    return {"path": str(path), "params": config["params"], "retrieval_heads": heads, "query_heads": total,
            "ratio": settings.ratio, "by_kv_group": settings.by_kv_group,
            "kv_heads_per_layer": settings.kv_heads_per_layer,
            "kept_block_share_flat": {str(t): kept_share_on_flat_scores(t, params) for t in contexts},
            "predicted_capacity": predict_capacity(settings, load_artifact(path))}


def selection(settings: Settings) -> dict[str, Any]:
    """The head-selection arguments of ``synthesize_artifact``."""
    return {"ratio": settings.ratio, "count": None, "by_kv_group": settings.by_kv_group,
            "kv_heads_per_layer": settings.kv_heads_per_layer}


def model_hf_config(settings: Settings):
    """The transformers config of the served model (a ``--shape`` model needs no folder)."""
    from transformers import AutoConfig

    if settings.model is not None:
        return AutoConfig.from_pretrained(settings.model)
    config = shape_config(settings)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def max_in_flight_tokens(settings: Settings) -> int:
    """vLLM 0.26's ``VllmConfig.max_in_flight_tokens``: 2 batches of ``max_num_batched_tokens`` with async
    scheduling (its default, one GPU), 1 with ``--no-async-scheduling`` in ``--engine-args``."""
    batches = 1 if "--no-async-scheduling" in settings.engine_args else 2
    return batches * settings.max_num_batched_tokens


def engine_block_size(settings: Settings) -> int:
    """vLLM's KV block size: ``--block-size`` from ``--engine-args`` (either spelling), else 16."""
    args = list(settings.engine_args)
    for i, arg in enumerate(args):
        if arg == "--block-size" and i + 1 < len(args):
            return int(args[i + 1])
        if arg.startswith("--block-size="):
            return int(arg.split("=", 1)[1])
    return 16


def predict_capacity(settings: Settings, artifact=None) -> dict[str, Any]:
    """What the compact KV layout should give against FLASH_ATTN's cache for ``artifact`` (default: the
    synthetic artifact of ``settings``, built in memory): ``KVLayout.vllm_capacity_ratio`` at
    ``max_model_len``, the ratio of the two servers' "Maximum concurrency" lines for the same KV memory,
    and ``KVLayout.capacity_ratio``, what decoding sequences hold (bf16; one rank)."""
    import torch

    from rtpurbo_vllm.kv_cache.layout import FULL, KVLayout

    if artifact is None:
        from rtpurbo_vllm.calibration.synthesize import synthetic_artifact

        artifact = synthetic_artifact(model_hf_config(settings), **selection(settings), seed=settings.seed,
                                      params=settings.sparsity_params())
    p, in_flight = artifact.params, max_in_flight_tokens(settings)
    plan = KVLayout.from_artifact(artifact, kv_dtype=torch.bfloat16, block_unit=engine_block_size(settings))
    full = plan.units[FULL]
    return {"kv_layout": settings.kv_layout, "context": settings.max_model_len, "max_in_flight_tokens": in_flight,
            "full_kv_heads": sum(len(artifact.layout.retrieval_kv_heads(l)) for l in range(plan.num_layers)),
            "kv_heads": plan.num_kv_heads * plan.num_layers, "full_units": f"{full.count} x {full.slots}",
            "compact_vllm_capacity_ratio": round(plan.vllm_capacity_ratio(settings.max_model_len, in_flight), 3),
            "compact_capacity_ratio": round(plan.capacity_ratio(settings.max_model_len), 3)}


def kept_share_on_flat_scores(num_tokens: int, params) -> float:
    """Share of ``ceil(num_tokens / block_size)`` blocks that block top-p keeps when every indexer score
    is equal (dummy weights), forced sink and current blocks included."""
    import torch

    from rtpurbo_vllm.triton_kernels.block_topp import block_topp_ref

    keep = block_topp_ref(torch.zeros(1, num_tokens), params.top_p, params.block_size, params.sink_tokens)
    return keep.float().mean().item()


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BenchRun:
    """One ``vllm bench`` command: the row key it fills, its argv, its result file and its log."""

    key: dict[str, Any]
    argv: list[str]
    result: Path
    log: Path


def engine_flags(settings: Settings, backend: str) -> list[str]:
    """Engine flags shared by ``vllm serve`` and ``vllm bench latency`` (``EngineArgs``)."""
    flags = ["--load-format", "dummy", "--dtype", "bfloat16", "--tokenizer", str(settings.tokenizer_dir),
             "--attention-backend", backend, "--max-model-len", str(settings.max_model_len),
             "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
             "--max-num-batched-tokens", str(settings.max_num_batched_tokens),
             "--enable-prefix-caching" if settings.prefix_caching else "--no-enable-prefix-caching",
             "--generation-config", "vllm", "--seed", str(settings.seed)]
    if backend == "RTPURBO":
        options = {"artifact": str(settings.artifact_dir), "kv_layout": settings.kv_layout}
        flags += ["--additional-config", json.dumps({"rtpurbo": options})]
    return flags + list(settings.engine_args)


def serve_command(settings: Settings, backend: str, port: int) -> list[str]:
    """``vllm serve`` for one backend, listening on 127.0.0.1 only."""
    return [*settings.vllm, "serve", str(settings.model_dir), "--host", HOST, "--port", str(port),
            "--served-model-name", SERVED_NAME, "--disable-uvicorn-access-log", *engine_flags(settings, backend)]


def bench_serve_runs(settings: Settings, backend: str, port: int) -> list[BenchRun]:
    """``vllm bench serve`` against the running server, one per (context, max concurrency). With
    ``decode_only`` each context starts with a priming run of its prompts, all at once (same seed, so
    the same prompts as the measured runs; key ``prime``), which leaves their KV in the prefix cache:
    the measured runs (no warm-up requests, the priming run was one) then prefill one block per
    request, so their TPOT is decode alone (no other request's prefill in between) and their TTFT a
    cache hit."""
    runs = []
    for context in settings.contexts:
        metadata = [f"attention_backend={backend}", f"context={context}"]
        points = [(c, False) for c in settings.max_concurrency]
        if settings.decode_only:
            points = [(settings.num_prompts, True), *points]
        for concurrency, prime in points:
            name = f"serve-{backend}-{context // 1024}K-" + ("prime" if prime else f"c{concurrency}")
            result = settings.out / "raw" / f"{name}.json"
            argv = bench_serve_argv(settings, port, result, input_len=context, range_ratio="0",
                                    concurrency=concurrency, metadata=metadata,
                                    warmups=0 if settings.decode_only and not prime else settings.num_warmups)
            key = {"backend": backend, "context": context}
            runs.append(BenchRun({**key, "prime": True} if prime else {**key, "concurrency": concurrency}, argv,
                                 result, settings.out / "logs" / f"{name}.log"))
    return runs


def bench_serve_argv(settings: Settings, port: int, result: Path, *, input_len: int, range_ratio: str,
                     concurrency: int, metadata: list[str], warmups: int) -> list[str]:
    """One ``vllm bench serve`` (random dataset, ``num_prompts`` prompts of ``input_len`` tokens widened by
    ``range_ratio``, vLLM's ``--random-range-ratio`` as given; ``output_len`` tokens each, greedy, all sent
    at once under ``concurrency``, after ``warmups`` warm-up requests) whose ``--save-result`` JSON is
    ``result``; ``metadata`` is ``KEY=VALUE`` strings stored in that JSON."""
    return [*settings.vllm, "bench", "serve", "--backend", "openai", "--host", HOST, "--port", str(port),
            "--endpoint", "/v1/completions", "--model", SERVED_NAME,
            "--tokenizer", str(settings.tokenizer_dir), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(settings.output_len),
            "--random-range-ratio", range_ratio, "--num-prompts", str(settings.num_prompts),
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos",
            "--temperature", "0", "--num-warmups", str(warmups),
            "--percentile-metrics", ",".join(SERVE_METRICS), "--metric-percentiles", "50,90,99",
            "--seed", str(settings.seed), "--disable-tqdm", "--save-result",
            "--result-dir", str(result.parent), "--result-filename", result.name, "--metadata", *metadata]


def bench_latency_runs(settings: Settings, backend: str) -> list[BenchRun]:
    """``vllm bench latency`` (its own engine), one per batch size and output length at ``latency_context``.
    Two output lengths time decode alone: the runs differ only in their decode steps (see
    :func:`decode_step_ms`)."""
    runs = []
    for batch in settings.latency_batch:
        for output_len in settings.latency_output_len:
            name = f"latency-{backend}-{settings.latency_context // 1024}K-b{batch}-o{output_len}"
            result = settings.out / "raw" / f"{name}.json"
            argv = [*settings.vllm, "bench", "latency", "--model", str(settings.model_dir),
                    "--input-len", str(settings.latency_context), "--output-len", str(output_len),
                    "--batch-size", str(batch), "--num-iters-warmup", str(settings.latency_warmup),
                    "--num-iters", str(settings.latency_iters), "--disable-detokenize", "--output-json", str(result),
                    *engine_flags(settings, backend)]
            key = {"backend": backend, "context": settings.latency_context, "batch": batch, "output_len": output_len}
            runs.append(BenchRun(key, argv, result, settings.out / "logs" / f"{name}.log"))
    return runs


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------

def new_results(settings: Settings) -> dict[str, Any]:
    return {"settings": settings.comparable(), "artifact": None, "capacity": {}, "serve": [], "latency": [],
            "commands": [], "invocations": []}


def read_results(path: Path) -> dict[str, Any]:
    """A results JSON, brought up to date: files from before an option existed were made with its default,
    and files from before several latency output lengths hold one length for the whole file."""
    results = json.loads(path.read_text())
    results["settings"] = {"kv_heads_per_layer": None, "prefix_caching": False, "decode_only": False,
                           **results["settings"]}
    if isinstance(results["settings"]["latency_output_len"], int):
        output_len = results["settings"]["latency_output_len"]
        results["settings"]["latency_output_len"] = [output_len]
        results["latency"] = [{"output_len": output_len, **row} for row in results["latency"]]
    return results


def differing_settings(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The :data:`COMPARABLE` settings in which two results files (or a file and this run) differ, sorted."""
    return sorted(k for k in COMPARABLE if mine.get(k) != theirs.get(k))


def load_results(settings: Settings) -> dict[str, Any]:
    """The results file in ``--out`` to merge into (a fresh one with ``--fresh`` or when absent)."""
    path = settings.out / RESULTS_JSON
    if settings.fresh or not path.is_file():
        return new_results(settings)
    results = read_results(path)
    if results["settings"] != settings.comparable():
        differ = differing_settings(results["settings"], settings.comparable())
        raise ValueError(f"{path} was made with other settings ({', '.join(differ)}); pass the same values, "
                         "--fresh to start over, or another --out")
    return results


ROW_KEYS = ("backend", "context", "concurrency", "prime", "batch", "output_len")   # what names a row's point


def merge_results(into: dict[str, Any], other: dict[str, Any], source: Path) -> None:
    """Merges the results of another ``--out`` (a parallel run, e.g. the other backend on another GPU) into
    ``into``: its rows replace those of the same point, its servers' capacity and its commands are added.
    The settings must be equal apart from the folder the script wrote the dummy model into."""
    mine, theirs = into["settings"], other["settings"]
    same_model = Path(mine["model"]).name == Path(theirs["model"]).name
    differ = [k for k in differing_settings(mine, theirs) if k != "model" or not same_model]
    if differ:
        raise ValueError(f"{source / RESULTS_JSON} was made with other settings ({', '.join(differ)}); "
                         "only runs of one configuration merge")
    for part in ("serve", "latency"):
        for row in other[part]:
            put_row(into[part], row, {k: row[k] for k in ROW_KEYS if k in row})
    into["capacity"].update(other["capacity"])
    into["artifact"] = into["artifact"] or other["artifact"]
    into["commands"] += other["commands"]
    into["invocations"] += other["invocations"]


def put_row(rows: list[dict[str, Any]], row: dict[str, Any], key: dict[str, Any]) -> None:
    """Replaces the row with the same key (backend and shape), or appends ``row``."""
    rows[:] = [r for r in rows if any(r.get(k) != v for k, v in key.items())] + [row]


def save(settings: Settings, results: dict[str, Any]) -> None:
    write_text(settings.out / RESULTS_JSON, json.dumps(results, indent=2))   # vLLM's numbers may hold NaN


@contextlib.contextmanager
def recorded_server(commands: list[dict[str, Any]], argv: list[str], port: int, log: Path, label: str,
                    settings: Settings) -> Iterator[Child]:
    """:func:`running_server` for ``argv`` (log ``log``) with its command, log and run time appended to
    ``commands`` (``"server": True``); prints ``[label] starting`` and ``[label] healthy after N s``."""
    record = {"command": shlex.join(argv), "log": str(log), "server": True}
    commands.append(record)
    print(f"[{label}] starting: {record['command']}", flush=True)
    start = time.monotonic()
    try:
        with running_server(argv, port, log, settings.out, settings.startup_timeout,
                            settings.stop_timeout) as server:
            print(f"[{label}] healthy after {time.monotonic() - start:.0f} s", flush=True)
            yield server
    finally:
        record["seconds"] = round(time.monotonic() - start, 1)



def run_bench(settings: Settings, results: dict[str, Any], run: BenchRun,
              parse: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Runs one ``vllm bench`` command and turns its result file into a row (``error`` on failure)."""
    run.result.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        run.result.unlink()
    start = time.monotonic()
    rc = run_command(run.argv, run.log, settings.out, settings.command_timeout, settings.stop_timeout)
    seconds = time.monotonic() - start
    results["commands"].append({"command": shlex.join(run.argv), "log": str(run.log), "rc": rc,
                                "seconds": round(seconds, 1)})
    row = {**run.key, "log": str(run.log)}
    if rc == 0 and run.result.is_file():
        row.update(parse(run.result))
        if row.get("failed") or row.get("completed") == 0:      # numbers over part of the requests mislead
            row["error"] = f"{row.get('failed')} requests failed, {row.get('completed')} completed; see {run.log}"
    else:
        row["error"] = f"exit code {rc}; see {run.log}"
    return row


def run_backend(settings: Settings, results: dict[str, Any], backend: str, port: int) -> None:
    """The serve phase (one server, every bench serve run; the capacity phase alone starts the server for
    its KV-capacity lines only) and the latency phase for one backend. A server that fails is recorded under
    ``capacity`` with an ``error`` and the run goes on with the next phase; one interrupted (Ctrl-C, a
    timeout's SIGTERM) is recorded the same way before the interrupt ends the run."""
    if "serve" in settings.phases or "capacity" in settings.phases:
        log = settings.out / "logs" / f"server-{backend}.log"
        start = time.monotonic()
        try:
            with recorded_server(results["commands"], serve_command(settings, backend, port), port, log, backend,
                                 settings) as server:
                results["capacity"][backend] = {**parse_kv_capacity(log.read_text(errors="replace")),
                                                "max_model_len": settings.max_model_len, "log": str(log),
                                                "kv_layout": settings.kv_layout if backend == "RTPURBO" else FULL_LAYOUT,
                                                "startup_s": round(time.monotonic() - start, 1)}
                print(f"[{backend}] KV capacity: {results['capacity'][backend]}", flush=True)
                if backend == "RTPURBO":
                    print(f"[{backend}] {capacity_comparison(results)}", flush=True)
                for run in bench_serve_runs(settings, backend, port) if "serve" in settings.phases else []:
                    if not server.alive():
                        raise RuntimeError(f"the {backend} server exited; last lines of {log}:\n{server.tail()}")
                    row = run_bench(settings, results, run, parse_serve_result)
                    if run.key.get("prime"):        # its numbers include the prefills: only failures count
                        if "error" in row:
                            print(f"[{backend}] priming run failed: {row['error']}", flush=True)
                        continue
                    put_row(results["serve"], row, run.key)
                    save(settings, results)
                    print(f"[{backend}] {summary(row)}", flush=True)
                time.sleep(1.0)                     # one more stats interval after the last request
                results["capacity"][backend]["after_runs"] = server_metrics(port)
                print(f"[{backend}] after the runs: {results['capacity'][backend]['after_runs']}", flush=True)
        except (RuntimeError, TimeoutError, OSError, KeyboardInterrupt) as exc:
            error = INTERRUPTED if isinstance(exc, KeyboardInterrupt) else str(exc)
            results["capacity"][backend] = {**results["capacity"].get(backend, {}), "error": error, "log": str(log)}
            print(f"[{backend}] server FAILED: {error}", flush=True)
            if isinstance(exc, KeyboardInterrupt):
                raise
        finally:
            save(settings, results)
    if "latency" in settings.phases:
        for run in bench_latency_runs(settings, backend):
            row = run_bench(settings, results, run, parse_latency_result)
            row.update(parse_kv_capacity(run.log.read_text(errors="replace")))
            put_row(results["latency"], row, run.key)
            save(settings, results)
            print(f"[{backend}] {summary(row)}", flush=True)


def write_report(settings: Settings, results: dict[str, Any]) -> str:
    """Writes the markdown report and the plot next to the results JSON; returns the markdown."""
    text = render_markdown(results)
    write_text(settings.out / REPORT_MD, text)
    write_figure(settings.out / PLOT_PNG, figure(results))
    return text


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def add_server_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """The options of the served dummy-weight model, its synthetic artifact and its engine (shared with
    ``bench_stability.py``, which changes some defaults with ``set_defaults``); returns their ``dest``
    names."""
    model = parser.add_argument_group("model")
    art = parser.add_argument_group("RTPURBO artifact (synthetic)")
    keep = art.add_mutually_exclusive_group()
    srv = parser.add_argument_group("engine")
    actions = [
        model.add_argument("--model", metavar="DIR", default=None,
                           help="model folder with config.json, served with dummy weights; its "
                                "max_position_embeddings must cover --max-model-len (default: a --shape folder "
                                "written to OUT/SHAPE-dummy)"),
        model.add_argument("--shape", choices=tuple(SHAPES), default="llama3-8b",
                           help="config.json of the dummy model written when --model is not given "
                                "(default %(default)s)"),
        model.add_argument("--tokenizer", metavar="PATH", default=None,
                           help="tokenizer for the prompts and the servers (default: --model if given, else the "
                                "tiny model's word-level tokenizer; prompts are random tokens either way)"),
        model.add_argument("--vllm", metavar="CMD", default=shlex.join(vllm_command()),
                           help="the vllm command, shell-quoted (default: this Python -P -m "
                                "vllm.entrypoints.cli.main)"),
        art.add_argument("--ratio", metavar="SHARE", type=float, default=None,
                         help="share of query heads drawn as retrieval heads (default 0.15, as rtpurbo-calibrate; "
                              "with --kv-heads-per-layer: every query head of the chosen KV groups)"),
        art.add_argument("--by-kv-group", action="store_true", help="draw whole KV groups of retrieval heads"),
        art.add_argument("--kv-heads-per-layer", metavar="N", type=int, default=None,
                         help="per-layer KV budget of the synthetic artifact (rtpurbo-calibrate "
                              "--kv-heads-per-layer): retrieval heads only in N KV groups of every layer, so "
                              "--kv-layout compact keeps N KV heads per layer in full (default %(default)s; None is "
                              "no budget)"),
        art.add_argument("--kv-layout", choices=(FULL_LAYOUT, MEMORY_SAVING_LAYOUT), default=MEMORY_SAVING_LAYOUT,
                         help="RTPURBO's KV-cache layout (additional-config rtpurbo.kv_layout): compact (the "
                              "backend's default) keeps full history only for retrieval KV heads; full keeps every "
                              "KV head for every token (default %(default)s)"),
        keep.add_argument("--keep", metavar="SHARE", type=float, default=0.03,
                          help="kept-block share of the retrieval heads at decode, set as the artifact's top-p "
                               "(dummy weights give flat indexer scores, so top-p keeps about this share; "
                               "default %(default)s)"),
        keep.add_argument("--top-p", metavar="P", type=float, default=None,
                          help="the artifact's block top-p, passed through as given (instead of --keep)"),
        art.add_argument("--prefill-top-p", metavar="P", type=float, default=1.0,
                         help="the artifact's prefill_top_p: 1 runs retrieval heads dense in prefill; below 1 a "
                              "query tile keeps about this share of the blocks before it on flat (dummy-weight) "
                              "scores, as --keep does at decode (default %(default)s)"),
        art.add_argument("--seed", metavar="INT", type=int, default=0,
                         help="seed of the artifact, the engines and the prompts (default %(default)s)"),
        srv.add_argument("--port", metavar="PORT", type=int, default=0,
                         help="port of vllm serve on 127.0.0.1 (default: a free one)"),
        srv.add_argument("--max-model-len", metavar="TOKENS", type=int, default=0,
                         help="max_model_len of every engine (default: longest request + 128); keep it fixed when "
                              "splitting a sweep over several invocations"),
        srv.add_argument("--gpu-memory-utilization", metavar="SHARE", type=float, default=0.9,
                         help="vLLM's --gpu-memory-utilization (default %(default)s)"),
        srv.add_argument("--max-num-batched-tokens", metavar="TOKENS", type=int, default=16384,
                         help="prefill chunk, the same for serve and latency (default %(default)s)"),
        srv.add_argument("--engine-args", metavar="ARGS", default="",
                         help="more flags for every engine, one shell-quoted string, "
                              "e.g. --engine-args=\"--enforce-eager\" (default %(default)r)"),
        srv.add_argument("--startup-timeout", metavar="S", type=float, default=900,
                         help="seconds to wait for /health (default %(default)s)"),
        srv.add_argument("--stop-timeout", metavar="S", type=float, default=60,
                         help="seconds between SIGTERM and SIGKILL when stopping a process (default %(default)s)"),
        srv.add_argument("--command-timeout", metavar="S", type=float, default=3600,
                         help="seconds one vllm bench command may run (default %(default)s)"),
    ]
    return [action.dest for action in actions]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    runs = parser.add_argument_group("runs")
    runs.add_argument("--backends", metavar="NAME", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                      help="attention backends, run in this order (default FLASH_ATTN RTPURBO)")
    runs.add_argument("--phases", metavar="PHASE", nargs="+", choices=PHASES, default=["serve", "latency"],
                      help="serve (vllm serve + vllm bench serve), latency (vllm bench latency) and/or capacity "
                           "(vllm serve started for its KV-capacity lines, then stopped; default serve latency)")
    runs.add_argument("--prefix-caching", action="store_true",
                      help="serve with prefix caching on (default off, so repeated random prompts cannot hit it)")
    runs.add_argument("--decode-only", action="store_true",
                      help="TPOT of decode alone: prefix caching on, and each context's prompts sent once, all at "
                           "once and unmeasured, before its measured runs (which then skip warm-ups), so those "
                           "find the prompts' KV cached (their TTFT is a cache hit)")

    srvb = parser.add_argument_group("vllm bench serve")
    srvb.add_argument("--contexts", metavar="K", type=int, nargs="+", default=[32, 128, 256],
                      help="input lengths in K tokens (default 32 128 256)")
    srvb.add_argument("--output-len", metavar="N", type=int, default=128, help="output tokens (default 128)")
    srvb.add_argument("--num-prompts", metavar="N", type=int, default=4, help="prompts per point (default 4)")
    srvb.add_argument("--max-concurrency", metavar="C", type=int, nargs="+", default=[1],
                      help="client max concurrency, one run each (default 1)")
    srvb.add_argument("--num-warmups", metavar="N", type=int, default=1,
                      help="warm-up requests before each point (default 1: first-call kernel compilation)")

    lat = parser.add_argument_group("vllm bench latency")
    lat.add_argument("--latency-context", metavar="K", type=int, default=128,
                     help="input length in K tokens (default 128)")
    lat.add_argument("--latency-batch", metavar="B", type=int, nargs="+", default=[1, 4],
                     help="batch sizes, one engine start each (default 1 4)")
    lat.add_argument("--latency-output-len", metavar="N", type=int, nargs="+", default=[128],
                     help="output tokens, one run each (default 128); two lengths also give the decode step alone")
    lat.add_argument("--latency-iters", metavar="N", type=int, default=3, help="timed iterations (default 3)")
    lat.add_argument("--latency-warmup", metavar="N", type=int, default=1, help="warm-up iterations (default 1)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default="results/serving",
                     help="folder for the JSON, markdown, PNG, logs and raw vLLM results (default results/serving)")
    out.add_argument("--fresh", action="store_true", help="start a new results file instead of merging")
    out.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    out.add_argument("--report-only", action="store_true",
                     help="rewrite the markdown and PNG from the results JSON in --out; run nothing")
    out.add_argument("--merge", metavar="DIR", nargs="+", default=[],
                     help="merge the results JSON of these folders (runs of the same settings made in parallel, "
                          "e.g. one backend per GPU) into --out's, then rewrite the report; run nothing")
    return parser


def print_dry_run(settings: Settings, port: int) -> None:
    print(f"# model folder: {settings.model_dir}" + ("" if settings.model else " (config.json written here)"))
    print(f"# tokenizer: {settings.tokenizer_dir}")
    if "RTPURBO" in settings.backends:
        params = settings.sparsity_params()
        shares = ", ".join(f"{t // 1024}K {kept_share_on_flat_scores(t, params):.3f}"
                           for t in sorted({*settings.contexts, settings.latency_context}))
        print(f"# synthetic artifact -> {settings.artifact_dir}: synthesize_artifact(ratio={settings.ratio}, "
              f"by_kv_group={settings.by_kv_group}, kv_heads_per_layer={settings.kv_heads_per_layer}, "
              f"seed={settings.seed}, top_p={settings.top_p}, prefill_top_p={settings.prefill_top_p})")
        print(f"# kept-block share on flat (dummy-weight) indexer scores: {shares}; not measured by serving")
        print(f"# {describe_prediction(predict_capacity(settings))}")
    for backend in settings.backends:
        if "serve" in settings.phases or "capacity" in settings.phases:
            print(f"\n# {backend}: server (waits for http://{HOST}:{port}/health), then the clients")
            print(shlex.join(serve_command(settings, backend, port)))
            for run in bench_serve_runs(settings, backend, port) if "serve" in settings.phases else []:
                print(shlex.join(run.argv))
        if "latency" in settings.phases:
            print(f"\n# {backend}: latency (server stopped)")
            for run in bench_latency_runs(settings, backend):
                print(shlex.join(run.argv))


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_cli(build_parser().parse_args(argv))
    if settings.merge:
        results = read_results(settings.out / RESULTS_JSON)
        for folder in settings.merge:
            merge_results(results, read_results(folder / RESULTS_JSON), folder)
        save(settings, results)
        print(write_report(settings, results))
        return 0
    if settings.report_only:
        print(write_report(settings, read_results(settings.out / RESULTS_JSON)))
        return 0
    port = settings.port or free_port()
    if settings.dry_run:
        print_dry_run(settings, port)
        return 0
    stop_on_sigterm()
    results = load_results(settings)
    env = environment()
    results["environment"] = env
    results["invocations"].append({"started": datetime.datetime.now().isoformat(timespec="seconds"),
                                   "argv": list(sys.argv[1:] if argv is None else argv), "environment": env})
    write_model_dir(settings)
    if "RTPURBO" in settings.backends:
        results["artifact"] = write_artifact(settings)
        print(describe_artifact(results["artifact"]), flush=True)
    save(settings, results)
    try:
        for backend in settings.backends:
            run_backend(settings, results, backend, port)
    finally:
        save(settings, results)
        print(write_report(settings, results))
    return 1 if failures(results) else 0


if __name__ == "__main__":
    sys.exit(main())
