"""Serving throughput of fixed long-context workloads through vLLM's own client, ``vllm bench serve``.

Each run serves one backend (``vllm serve``, dummy weights, the model, artifact and engine options of
:mod:`rtpurbo_vllm.bench.serving`) and sends one workload's fixed requests all at once (request rate
inf, no client concurrency limit): the same prompts, in the same order, for every backend (they are
drawn from ``--seed`` and written to ``OUT/datasets/WORKLOAD.jsonl``, vLLM's ``custom`` dataset: one
``{"prompt", "output_tokens"}`` per line, sent as they are: no chat template, no shuffle, EOS ignored;
vLLM reads it with pandas, part of ``vllm[bench]``).

Workloads (lengths in tokens, K = 1024; the prompt's ``<s>`` included):

- ``long-prompts`` (prefill-bound): 64 requests, input lengths log-uniform in [16K, 128K], 512 output
  tokens each; prefix caching off.
- ``long-decodes`` (decode- and memory-bound): 8 shared documents of 64K-128K tokens; 64 requests, each
  one document (request ``i`` reads document ``i % 8``) followed by a short distinct question, 1024
  output tokens each; prefix caching on, so each document is prefilled about once and the requests'
  KV blocks are shared.

Backends: ``FLASH_ATTN``, ``FLASH_ATTN-fp8`` (``--kv-cache-dtype fp8``), ``RTPURBO``, ``RTPURBO-fp8``.
Prompts are words of the tiny model's word-level tokenizer (one token each), so their lengths are
exact whatever the dummy model.

Reported per workload and backend: output and total tokens/s, median and p99 TTFT and TPOT (from the
``--save-result`` JSON), preemptions (``/metrics`` after the run), the most requests running at once
(``/metrics`` read every 0.5 s during the run) and the server's KV capacity (its log). Ratios are
against ``FLASH_ATTN`` and ``FLASH_ATTN-fp8``, > 1 when the backend is better.

Results go to ``--out``: ``bench_throughput.json`` (environment, settings, one row per workload and
backend, every command with its log), ``bench_throughput.md`` and ``bench_throughput.png``. Each
invocation merges its rows into ``--out`` (a row of the same workload and backend is replaced), so
one backend per command fits a 10-minute limit; ``--merge DIR...`` joins folders made in parallel.

Run on a GPU machine from the repository root, for example:
    python3 -P benchmarks/bench_throughput.py --workload long-decodes --backends RTPURBO --out results/tp
    python3 -P benchmarks/bench_throughput.py --workload long-prompts long-decodes \\
        --backends FLASH_ATTN,FLASH_ATTN-fp8,RTPURBO --out results/tp
    python3 -P benchmarks/bench_throughput.py --out results/tp --merge results/tp-gpu1
    python3 -P benchmarks/bench_throughput.py --out results/tp --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rtpurbo_vllm.bench import serving as bs
from rtpurbo_vllm.bench.environment import environment
from rtpurbo_vllm.bench.server import HOST, INTERRUPTED, free_port, metric_peaks, server_metrics, stop_on_sigterm
from rtpurbo_vllm.bench.vllm_results import parse_kv_capacity, parse_serve_result
from rtpurbo_vllm.outputs import write_figure, write_text

K = 1024
RESULTS_JSON, REPORT_MD, PLOT_PNG = "bench_throughput.json", "bench_throughput.md", "bench_throughput.png"
# Backend name -> (vLLM attention backend, extra engine flags).
BACKENDS = {"FLASH_ATTN": ("FLASH_ATTN", ()), "FLASH_ATTN-fp8": ("FLASH_ATTN", ("--kv-cache-dtype", "fp8")),
            "RTPURBO": ("RTPURBO", ()), "RTPURBO-fp8": ("RTPURBO", ("--kv-cache-dtype", "fp8"))}
BASELINES = ("FLASH_ATTN", "FLASH_ATTN-fp8")
# /metrics: sampled during the run for their peak, and read after it.
PEAK_METRICS = {"vllm:num_requests_running": "max_running", "vllm:num_requests_waiting": "max_waiting"}
AFTER_METRICS = {"vllm:num_preemptions_total": "preemptions", "vllm:prefix_cache_hits_total": "prefix_cache_hits"}
QUESTION_WORDS = 32             # words (tokens) of a long-decodes question: "query", the request number, words
MAX_CONTEXT = 128 * K           # the longest prompt of either workload


@dataclasses.dataclass(frozen=True)
class Workload:
    """A fixed set of requests (see the module docstring)."""

    name: str
    num_requests: int
    output_len: int
    prefix_caching: bool
    num_documents: int = 0                      # long-decodes: documents shared by the requests
    lengths: tuple[int, int] = (16 * K, 128 * K)  # prompt (long-prompts) or document (long-decodes) lengths


WORKLOADS = {
    "long-prompts": Workload("long-prompts", num_requests=64, output_len=512, prefix_caching=False),
    "long-decodes": Workload("long-decodes", num_requests=64, output_len=1024, prefix_caching=True, num_documents=8,
                             lengths=(64 * K, MAX_CONTEXT - QUESTION_WORDS)),
}


def words() -> list[str]:
    """The words prompts are made of: one token each in the tiny model's word-level tokenizer (which
    would split digits and punctuation into several)."""
    from rtpurbo_vllm.tiny.tokenizer import FILLER_WORDS

    return list(FILLER_WORDS)


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    """An integer drawn log-uniformly from ``[low, high]``."""
    return min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))


def make_requests(workload: Workload, seed: int, num_requests: int | None = None) -> list[dict[str, Any]]:
    """The workload's requests, ``{"prompt": text, "output_tokens": n, "prompt_tokens": n}`` each (the
    first ``num_requests`` of them when given), deterministic in ``seed``. A prompt of ``n`` tokens is
    ``n - 1`` words (the tokenizer adds ``<s>``)."""
    rng, vocab = random.Random(seed), words()

    def text(tokens: int) -> str:
        return " ".join(rng.choices(vocab, k=tokens - 1))

    count = workload.num_requests if num_requests is None else num_requests
    if workload.num_documents == 0:
        lengths = [log_uniform(rng, *workload.lengths) for _ in range(workload.num_requests)][:count]
        prompts = [(text(n), n) for n in lengths]
    else:
        documents = [(text(n), n) for n in (rng.randint(*workload.lengths) for _ in range(workload.num_documents))]
        prompts = []
        for i in range(count):
            doc, tokens = documents[i % workload.num_documents]
            number = [vocab[i % len(vocab)], vocab[i // len(vocab) % len(vocab)]]      # distinct per request
            question = " ".join(["query", *number, *rng.choices(vocab, k=QUESTION_WORDS - 3)])
            prompts.append((f"{doc} {question}", tokens + QUESTION_WORDS))
    return [{"prompt": p, "output_tokens": workload.output_len, "prompt_tokens": n} for p, n in prompts]


# ----------------------------------------------------------------------------------------------------
# Settings and commands
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated command line; ``serving`` holds the model, artifact and engine options."""

    serving: bs.Settings
    workloads: tuple[str, ...]
    backends: tuple[str, ...]
    num_requests: int | None
    num_warmups: int
    dry_run: bool
    report_only: bool
    merge: tuple[Path, ...]

    @property
    def out(self) -> Path:
        return self.serving.out


def parse_backends(text: str) -> tuple[str, ...]:
    """``--backends``: names separated by commas (or spaces), each one of :data:`BACKENDS`."""
    names = tuple(dict.fromkeys(n for n in text.replace(",", " ").split() if n))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown or text!r}; choose from {', '.join(BACKENDS)}")
    return names


def settings_from_cli(args: argparse.Namespace) -> Settings:
    """Checks the parsed flags (a bad value raises ValueError naming the flag) and builds the serving
    settings: ``max_model_len`` (unless given) for the longest prompt plus the longest output of any
    workload, so that runs of either workload share one results folder."""
    output_len = max(w.output_len for w in WORKLOADS.values())
    serving = bs.build_parser().parse_args(
        ["--out", args.out, "--phases", "serve", "--contexts", str(MAX_CONTEXT // K), "--output-len", str(output_len),
         "--num-warmups", str(args.num_warmups)])
    for dest in SERVER_OPTIONS:
        setattr(serving, dest, getattr(args, dest))
    if args.num_requests is not None and args.num_requests < 1:
        raise ValueError("--num-requests must be >= 1")
    if args.num_warmups < 0:
        raise ValueError("--num-warmups must be >= 0")
    return Settings(serving=bs.Settings.from_cli(serving), workloads=tuple(dict.fromkeys(args.workload)),
                    backends=args.backends, num_requests=args.num_requests, num_warmups=args.num_warmups,
                    dry_run=args.dry_run, report_only=args.report_only,
                    merge=tuple(Path(d).resolve() for d in args.merge))


def engine_settings(settings: Settings, workload: Workload, backend: str) -> bs.Settings:
    """The serving settings of one server: the workload's prefix caching, the backend's engine flags."""
    extra = BACKENDS[backend][1]
    return dataclasses.replace(settings.serving, prefix_caching=workload.prefix_caching,
                               engine_args=(*settings.serving.engine_args, *extra))


def dataset_path(settings: Settings, workload: Workload) -> Path:
    return settings.out / "datasets" / f"{workload.name}.jsonl"


def write_dataset(settings: Settings, workload: Workload) -> list[dict[str, Any]]:
    """Writes the workload's requests as vLLM's ``custom`` JSONL dataset; returns them."""
    requests = make_requests(workload, settings.serving.seed, settings.num_requests)
    write_text(dataset_path(settings, workload), "".join(json.dumps(r) + "\n" for r in requests))
    return requests


def bench_command(settings: Settings, workload: Workload, backend: str, port: int, result: Path,
                  num_requests: int) -> list[str]:
    """``vllm bench serve`` of the workload's dataset: every request at once, in file order, its own
    output length, EOS ignored, greedy; TTFT/TPOT/ITL medians and p99; the ``--save-result`` JSON is
    ``result``."""
    s = settings.serving
    return [*s.vllm, "bench", "serve", "--backend", "openai", "--host", HOST, "--port", str(port),
            "--endpoint", "/v1/completions", "--model", bs.SERVED_NAME, "--tokenizer", str(s.tokenizer_dir),
            "--dataset-name", "custom", "--dataset-path", str(dataset_path(settings, workload)),
            "--custom-output-len", "-1", "--skip-chat-template", "--disable-shuffle",
            "--num-prompts", str(num_requests), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
            "--num-warmups", str(settings.num_warmups), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--seed", str(s.seed), "--disable-tqdm", "--save-result",
            "--result-dir", str(result.parent), "--result-filename", result.name,
            "--metadata", f"backend={backend}", f"workload={workload.name}"]


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------

def run_one(settings: Settings, results: dict[str, Any], workload: Workload, backend: str, port: int) -> dict:
    """Serves ``backend``, sends the workload once and returns its row (``error`` on a failure)."""
    s = engine_settings(settings, workload, backend)
    requests = write_dataset(settings, workload)
    name = f"{workload.name}-{backend}"
    log, result = s.out / "logs" / f"server-{name}.log", s.out / "raw" / f"{name}.json"
    run = bs.BenchRun({"workload": workload.name, "backend": backend},
                      bench_command(settings, workload, backend, port, result, len(requests)), result,
                      s.out / "logs" / f"bench-{name}.log")
    row: dict[str, Any] = {**run.key, "requests": len(requests),
                           "prompt_tokens": sum(r["prompt_tokens"] for r in requests)}
    try:
        with bs.recorded_server(results["commands"], bs.serve_command(s, BACKENDS[backend][0], port), port, log,
                                name, s):
            row.update(parse_kv_capacity(log.read_text(errors="replace")))
            with metric_peaks(port, PEAK_METRICS) as peaks:
                row.update(bs.run_bench(s, results, run, parse_serve_result))
            time.sleep(1.0)                       # one more stats interval after the last request
            row.update(peaks, **server_metrics(port, AFTER_METRICS))
    except (RuntimeError, TimeoutError, OSError) as exc:
        row["error"] = f"server: {exc}"
    print(f"[{name}] {describe(row)}", flush=True)
    return row


def describe(row: dict[str, Any]) -> str:
    """One line per row."""
    if "error" in row:
        return f"FAILED: {row['error']}"
    return (f"{row.get('output_throughput', float('nan')):.1f} output tok/s, "
            f"{row.get('total_token_throughput', float('nan')):.1f} total tok/s, median TTFT "
            f"{row.get('median_ttft_ms', float('nan')):.0f} ms, median TPOT {row.get('median_tpot_ms', float('nan')):.1f} "
            f"ms, {row.get('preemptions', float('nan')):.0f} preemptions, at most "
            f"{row.get('max_running', float('nan')):.0f} running; {row.get('completed')} completed, "
            f"{row.get('failed')} failed")


# ----------------------------------------------------------------------------------------------------
# Results and report
# ----------------------------------------------------------------------------------------------------

def new_results(settings: Settings) -> dict[str, Any]:
    return {"settings": settings.serving.comparable(), "environment": None, "rows": [], "commands": [],
            "invocations": []}


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """The settings that must match to merge, less those a workload or backend sets per server."""
    return {k: v for k, v in results["settings"].items() if k not in ("prefix_caching", "model")}


def merge_rows(into: dict[str, Any], other: dict[str, Any], source: Path) -> None:
    """Adds the rows and commands of ``other`` (a results file of the same settings) to ``into``; a row of
    the same workload and backend is replaced."""
    if comparable(into) != comparable(other):
        differ = sorted(k for k in comparable(into) if comparable(into)[k] != comparable(other).get(k))
        raise ValueError(f"{source} was made with other settings ({', '.join(differ)}); only runs of one "
                         "configuration merge (or use another --out)")
    for row in other["rows"]:
        bs.put_row(into["rows"], row, {"workload": row["workload"], "backend": row["backend"]})
    into["commands"] += other["commands"]
    into["invocations"] += other["invocations"]
    into["environment"] = into["environment"] or other["environment"]


def load_results(settings: Settings) -> dict[str, Any]:
    """The results file of ``--out`` (a new one when absent), checked against this run's settings."""
    path = settings.out / RESULTS_JSON
    results = new_results(settings)
    if path.is_file():
        merge_rows(results, json.loads(path.read_text()), path)
    return results


def save(settings: Settings, results: dict[str, Any]) -> None:
    write_text(settings.out / RESULTS_JSON, json.dumps(results, indent=2))      # vLLM's numbers may hold NaN


def _row(results: dict[str, Any], workload: str, backend: str) -> dict[str, Any]:
    return next((r for r in results["rows"] if (r["workload"], r["backend"]) == (workload, backend)
                 and "error" not in r), {})


def _num(value: float | None, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def ratio(results: dict[str, Any], workload: str, backend: str, baseline: str, field: str) -> float | None:
    """``field`` of ``backend`` over ``baseline``'s in one workload (None where either is missing)."""
    a, b = _row(results, workload, backend).get(field), _row(results, workload, baseline).get(field)
    return a / b if a and b else None


def render_markdown(results: dict[str, Any]) -> str:
    """One table per workload (every backend), then failures and the commands."""
    env, s = results.get("environment") or {}, results["settings"]
    lines = ["# Serving throughput: fixed long-context workloads through `vllm bench serve`", "",
             f"Card: {env.get('device')}; vLLM {env.get('versions', {}).get('vllm')}, torch "
             f"{env.get('versions', {}).get('torch')}, commit {env.get('commit')}.",
             f"Model: {s['model']} (`--load-format dummy`); max_model_len {s['max_model_len']:,}, prefill chunk "
             f"{s['max_num_batched_tokens']}, gpu-memory-utilization {s['gpu_memory_utilization']}; RTPURBO: "
             f"{s['kv_layout']} KV layout, top-p {s['top_p']}, retrieval-head ratio {s['ratio']}, KV heads per layer "
             f"{s['kv_heads_per_layer']}; seed {s['seed']}. Request rate inf; TTFT and TPOT in ms.", ""]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in results["rows"])]
    for workload in workloads:
        spec = WORKLOADS[workload]
        lines += [f"## {workload}", "", describe_workload(spec), "",
                  "| backend | output tok/s | total tok/s | vs FLASH_ATTN | vs FLASH_ATTN-fp8 | TTFT p50 | TTFT p99 | "
                  "TPOT p50 | TPOT p99 | preemptions | max running | KV tokens | completed | failed |",
                  "|" + " --- |" * 14]
        for backend in BACKENDS:
            r = _row(results, workload, backend)
            if not r:
                continue
            vs = [ratio(results, workload, backend, base, "output_throughput") for base in BASELINES]
            lines.append("| " + " | ".join([
                backend, _num(r.get("output_throughput")), _num(r.get("total_token_throughput")),
                *(f"{v:.2f}x" if v else "" for v in vs),
                _num(r.get("median_ttft_ms"), ".0f"), _num(r.get("p99_ttft_ms"), ".0f"),
                _num(r.get("median_tpot_ms"), ".2f"), _num(r.get("p99_tpot_ms"), ".2f"),
                _num(r.get("preemptions"), ".0f"), _num(r.get("max_running"), ".0f"),
                _num(r.get("kv_cache_tokens"), ","), str(r.get("completed", "")), str(r.get("failed", ""))]) + " |")
        lines.append("")
    failed = [r for r in results["rows"] if "error" in r]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {r['workload']} {r['backend']}: {r['error']}" for r in failed] + [""]
    lines += ["## Commands", "", "```bash"] + [c["command"] for c in results["commands"]] + ["```", ""]
    return "\n".join(lines)


def describe_workload(workload: Workload) -> str:
    if workload.num_documents:
        return (f"{workload.num_requests} requests over {workload.num_documents} shared documents of "
                f"{workload.lengths[0] // K}K-{(workload.lengths[1] + QUESTION_WORDS) // K}K tokens (prefix caching on) "
                f"with a distinct {QUESTION_WORDS}-token question each, {workload.output_len} output tokens each.")
    return (f"{workload.num_requests} requests, input lengths log-uniform in {workload.lengths[0] // K}K-"
            f"{workload.lengths[1] // K}K tokens (prefix caching off), {workload.output_len} output tokens each.")


def figure(results: dict[str, Any]):
    """The plot: output tokens/s per backend, one panel per workload (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in results["rows"])]
    fig, axes = plt.subplots(1, max(1, len(workloads)), figsize=(6 * max(1, len(workloads)), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        names = [b for b in BACKENDS if _row(results, workload, b)]
        ax.bar(names, [_row(results, workload, b).get("output_throughput", 0.0) for b in names])
        ax.set_ylabel("output tokens/s")
        ax.set_title(workload)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig


def write_report(settings: Settings, results: dict[str, Any]) -> str:
    """The markdown report (returned) and the plot, written next to the results JSON."""
    write_figure(settings.out / PLOT_PNG, figure(results))
    text = render_markdown(results)
    write_text(settings.out / REPORT_MD, text)
    return text


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", metavar="NAME", nargs="+", choices=tuple(WORKLOADS), default=["long-decodes"],
                        help=f"workloads, run in this order: {', '.join(WORKLOADS)} (default long-decodes)")
    parser.add_argument("--backends", metavar="LIST", type=parse_backends, default=("FLASH_ATTN", "RTPURBO"),
                        help=f"backends separated by commas, run in this order: {', '.join(BACKENDS)} "
                             "(default FLASH_ATTN,RTPURBO)")
    parser.add_argument("--num-requests", metavar="N", type=int, default=None,
                        help="send only the first N requests of each workload (default: all; for quick checks)")
    parser.add_argument("--num-warmups", metavar="N", type=int, default=0,
                        help="warm-up requests of vllm bench serve before the measured run, besides its start-up test request "
                             "(default %(default)s)")
    bs.add_server_arguments(parser)
    parser.add_argument("--out", metavar="DIR", default="results/throughput",
                        help="folder for the JSON, markdown, PNG, datasets, logs and raw results; rows merge into "
                             "its results file (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --out's JSON")
    parser.add_argument("--merge", metavar="DIR", nargs="+", default=[],
                        help="merge the results of these folders into --out's, then rewrite the report; run nothing")
    return parser


SERVER_OPTIONS = tuple(bs.add_server_arguments(argparse.ArgumentParser()))


def print_dry_run(settings: Settings, port: int) -> None:
    for name in settings.workloads:
        workload = WORKLOADS[name]
        print(f"# {name}: {describe_workload(workload)} Dataset: {dataset_path(settings, workload)}")
        for backend in settings.backends:
            s = engine_settings(settings, workload, backend)
            result = s.out / "raw" / f"{name}-{backend}.json"
            print(shlex.join(bs.serve_command(s, BACKENDS[backend][0], port)))
            print(shlex.join(bench_command(settings, workload, backend, port, result,
                                           settings.num_requests or workload.num_requests)))


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_cli(build_parser().parse_args(argv))
    if settings.merge or settings.report_only:         # the folder's own settings, whatever this command line says
        path = settings.out / RESULTS_JSON
        results = json.loads(path.read_text()) if path.is_file() else new_results(settings)
        for folder in settings.merge:
            merge_rows(results, json.loads((folder / RESULTS_JSON).read_text()), folder / RESULTS_JSON)
        save(settings, results)
        print(write_report(settings, results))
        return 0
    port = settings.serving.port or free_port()
    if settings.dry_run:
        print_dry_run(settings, port)
        return 0
    stop_on_sigterm()
    results = load_results(settings)
    results["environment"] = environment()
    results["invocations"].append({"started": datetime.datetime.now().isoformat(timespec="seconds"),
                                   "argv": list(sys.argv[1:] if argv is None else argv)})
    bs.write_model_dir(settings.serving)
    if any(BACKENDS[b][0] == "RTPURBO" for b in settings.backends):
        print(bs.describe_artifact(bs.write_artifact(settings.serving)), flush=True)
    failed = False
    try:
        for name in settings.workloads:
            for backend in settings.backends:
                key = {"workload": name, "backend": backend}
                try:
                    row = run_one(settings, results, WORKLOADS[name], backend, port)
                except KeyboardInterrupt:
                    bs.put_row(results["rows"], {**key, "error": INTERRUPTED}, key)
                    raise
                failed |= "error" in row
                bs.put_row(results["rows"], row, key)
                save(settings, results)
    finally:
        save(settings, results)
        print(write_report(settings, results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
