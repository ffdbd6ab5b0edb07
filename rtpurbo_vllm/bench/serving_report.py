"""The serving benchmark's report (:mod:`rtpurbo_vllm.bench.serving`): the markdown tables, the decode
step from two ``vllm bench latency`` output lengths, the KV-capacity comparison and the plot, all from
the results dict (``bench_serving.json``). Ratios are oriented so that > 1 means RTPURBO is better."""

from __future__ import annotations

from typing import Any

BACKENDS = ("FLASH_ATTN", "RTPURBO")                  # the baseline first
# Values of additional-config rtpurbo.kv_layout: every KV head for every token, and the memory-saving
# layout (full history only for retrieval KV heads).
FULL_LAYOUT, MEMORY_SAVING_LAYOUT = "full", "compact"


def describe_prediction(pred: dict[str, Any]) -> str:
    """One line on the predicted KV capacity (printed, and in the report)."""
    line = (f"Predicted KV capacity of --kv-layout compact vs FLASH_ATTN at {pred['context']:,} tokens: "
            f"{pred['compact_vllm_capacity_ratio']:.2f}x (KVLayout.vllm_capacity_ratio: {pred['full_kv_heads']}/"
            f"{pred['kv_heads']} full KV heads in {pred['full_units']} full units, window reserve for "
            f"{pred['max_in_flight_tokens']:,} in-flight tokens; {pred['compact_capacity_ratio']:.2f}x held by "
            f"decoding sequences)")
    if pred["kv_layout"] != MEMORY_SAVING_LAYOUT:
        line += f"; this run uses --kv-layout {pred['kv_layout']} (every KV head kept: about 1x)"
    return line + "."


def describe_artifact(artifact: dict[str, Any]) -> str:
    """The lines printed (and put in the report) about the artifact and the kept-block share."""
    p = artifact["params"]
    shares = ", ".join(f"{int(t) // 1024}K {v:.3f}" for t, v in artifact["kept_block_share_flat"].items())
    budget = artifact.get("kv_heads_per_layer")
    prediction = f"\n{describe_prediction(artifact['predicted_capacity'])}" if artifact.get("predicted_capacity") else ""
    return (f"Synthetic artifact {artifact['path']}: {artifact['retrieval_heads']} of {artifact['query_heads']} "
            f"query heads are retrieval heads (ratio {artifact['ratio']}, by KV group: {artifact['by_kv_group']}, "
            f"KV heads per layer: {budget if budget is not None else 'no budget'}); "
            f"local heads see {p['sink_tokens']} sinks + a window of {p['window']} tokens; block top-p "
            f"{p['top_p']} over {p['block_size']}-token blocks; sequences under {p['dense_threshold']} tokens "
            f"run dense.\nKept-block share of the retrieval heads at decode: set through top-p, not measured. "
            f"Dummy weights make every indexer score ~0, so top-p keeps about top_p of the blocks: {shares} "
            f"(block_topp_ref on flat scores). The serving path does not report the share it really kept."
            + prediction)


def capacity_comparison(results: dict[str, Any]) -> str:
    """Measured KV capacity (ratio of the servers' max concurrency) next to the prediction."""
    fa, rtp = (results["capacity"].get(b, {}) for b in BACKENDS)
    measured = (rtp["max_concurrency"] / fa["max_concurrency"]
                if rtp.get("max_concurrency") and fa.get("max_concurrency") else None)
    pred = (results.get("artifact") or {}).get("predicted_capacity")
    text = (f"KV capacity RTPURBO ({rtp.get('kv_layout', '?')} layout) / FLASH_ATTN: measured "
            + (f"{measured:.2f}x (max concurrency {rtp['max_concurrency']:.2f} / {fa['max_concurrency']:.2f})"
               if measured else "n/a (needs both servers' max-concurrency lines)"))
    if pred:
        expected = (pred["compact_vllm_capacity_ratio"]
                    if rtp.get("kv_layout", pred["kv_layout"]) == MEMORY_SAVING_LAYOUT else None)
        text += (f"; predicted {expected:.2f}x (KVLayout.vllm_capacity_ratio)" if expected else
                 f"; predicted about 1x for the full layout ({pred['compact_vllm_capacity_ratio']:.2f}x with "
                 f"--kv-layout compact)")
    return text


def failures(results: dict[str, Any]) -> list[str]:
    """One line per failed server or bench run."""
    servers = [f"{b} server: FAILED, {c['error']}" for b, c in results["capacity"].items() if "error" in c]
    return servers + [f"{r['backend']} {summary(r)}" for r in results["serve"] + results["latency"] if "error" in r]


def summary(row: dict[str, Any]) -> str:
    """One line per finished row."""
    shape = f"{row['context'] // 1024}K " + (f"c={row['concurrency']}" if "concurrency" in row else
                                             f"batch={row['batch']} out={row['output_len']}")
    if "error" in row:
        return f"{shape}: FAILED, {row['error']}"
    if "avg_latency_s" in row:
        return f"{shape}: latency {row['avg_latency_s']:.3f} s"
    return (f"{shape}: TTFT {row.get('median_ttft_ms', float('nan')):.1f} ms, TPOT "
            f"{row.get('median_tpot_ms', float('nan')):.2f} ms, {row.get('output_throughput', float('nan')):.1f} "
            f"out tok/s, {row.get('completed')} completed, {row.get('failed')} failed")


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "" if value is None else format(value, spec)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else ""


def _row(rows: list[dict[str, Any]], **key) -> dict[str, Any]:
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items()) and "error" not in r), {})


def render_markdown(results: dict[str, Any]) -> str:
    """The report: settings, the serve table per context, the latency table, KV capacity, commands.
    Ratios are oriented so that > 1 means RTPURBO is better (FA/RTP for times, RTP/FA otherwise)."""
    env, s = results.get("environment", {}), results["settings"]
    fa, rtp = (results["capacity"].get(b, {}) for b in BACKENDS)
    lines = ["# Serving benchmark: FLASH_ATTN vs RTPURBO", "",
             f"Card: {env.get('device')}; vLLM {env.get('versions', {}).get('vllm')}, torch "
             f"{env.get('versions', {}).get('torch')}, commit {env.get('commit')}.",
             f"Model: {s['model']} (`--load-format dummy`), tokenizer {s['tokenizer']}; max_model_len "
             f"{s['max_model_len']:,}, prefill chunk {s['max_num_batched_tokens']}, gpu-memory-utilization "
             f"{s['gpu_memory_utilization']}, prefix caching {'on' if s.get('prefix_caching') else 'off'}, extra "
             f"engine args {s['engine_args'] or 'none'}.",
             ""]
    if results.get("artifact"):
        lines += [describe_artifact(results["artifact"]), ""]
    primed = ("; decode only: each context's prompts were sent once before, unmeasured, so TPOT has no prefill "
              "in it and TTFT times a prefix-cache hit" if s.get("decode_only") else "")
    lines += [f"## `vllm bench serve` (random prompts, {s['num_prompts']} per point, output {s['output_len']} "
              f"tokens; TTFT, TPOT and ITL are medians{primed})", "",
              "| context | max conc. | TTFT FA (ms) | TTFT RTP (ms) | speedup | TPOT FA (ms) | TPOT RTP (ms) | "
              "speedup | ITL FA (ms) | ITL RTP (ms) | speedup | out tok/s FA | out tok/s RTP | ratio | "
              "KV tokens FA | KV tokens RTP | ratio | max conc. FA | max conc. RTP |",
              "|" + " --- |" * 19]
    for context, conc in sorted({(r["context"], r["concurrency"]) for r in results["serve"]}):
        a, b = (_row(results["serve"], backend=x, context=context, concurrency=conc) for x in BACKENDS)
        cells = [f"{context // 1024}K", str(conc),
                 _fmt(a.get("median_ttft_ms")), _fmt(b.get("median_ttft_ms")),
                 _ratio(a.get("median_ttft_ms"), b.get("median_ttft_ms")),
                 _fmt(a.get("median_tpot_ms")), _fmt(b.get("median_tpot_ms")),
                 _ratio(a.get("median_tpot_ms"), b.get("median_tpot_ms")),
                 _fmt(a.get("median_itl_ms")), _fmt(b.get("median_itl_ms")),
                 _ratio(a.get("median_itl_ms"), b.get("median_itl_ms")),
                 _fmt(a.get("output_throughput")), _fmt(b.get("output_throughput")),
                 _ratio(b.get("output_throughput"), a.get("output_throughput")),
                 _fmt(fa.get("kv_cache_tokens"), ","), _fmt(rtp.get("kv_cache_tokens"), ","),
                 _ratio(rtp.get("kv_cache_tokens"), fa.get("kv_cache_tokens")),
                 _fmt(fa.get("max_concurrency"), ".2f"), _fmt(rtp.get("max_concurrency"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "TPOT is each request's mean gap between output tokens (so it takes in any stall of the "
              "request: another request's prefill, the API server tokenizing a long prompt), ITL the median "
              "of all those gaps: the decode step itself.",
              "", "KV tokens and max concurrency are the servers' own log lines (`GPU KV cache size`, `Maximum "
              f"concurrency for {s['max_model_len']:,} tokens per request`), one value per server, so the same "
              "on every row."]
    if rtp:
        lines += ["", capacity_comparison(results) + "."]
    lines += ["", f"## `vllm bench latency` (random token ids, mean of {s['latency_iters']} runs after "
              f"{s['latency_warmup']} warm-up; seconds per batch: prefill of the batch plus its decode steps)", "",
              "| context | batch | output | FA (s) | RTP (s) | speedup |", "| --- | --- | --- | --- | --- | --- |"]
    for context, batch, output_len in sorted({(r["context"], r["batch"], r["output_len"]) for r in results["latency"]}):
        a, b = (_row(results["latency"], backend=x, context=context, batch=batch, output_len=output_len)
                for x in BACKENDS)
        lines.append(f"| {context // 1024}K | {batch} | {output_len} | {_fmt(a.get('avg_latency_s'))} | "
                     f"{_fmt(b.get('avg_latency_s'))} | {_ratio(a.get('avg_latency_s'), b.get('avg_latency_s'))} |")
    steps = decode_steps(results["latency"])
    if steps:
        lines += ["", "### Decode step from two output lengths (engine only: no API server, no other request's "
                  "prefill)", "",
                  "(latency(long) - latency(short)) / (long - short): the two runs share their prefill, so this is "
                  "the mean time of one decode step of the whole batch, i.e. TPOT at that batch size.", "",
                  "| context | batch | outputs | decode step FA (ms) | decode step RTP (ms) | speedup |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for (context, batch, lengths), by_backend in sorted(steps.items()):
            a, b = (by_backend.get(x) for x in BACKENDS)
            lines.append(f"| {context // 1024}K | {batch} | {lengths[0]} -> {lengths[1]} | {_fmt(a)} | {_fmt(b)} | "
                         f"{_ratio(a, b)} |")
    if failures(results):
        lines += ["", "## Failed runs", ""] + [f"- {line}" for line in failures(results)]
    lines += ["", "## Commands", "", "```bash"] + [c["command"] for c in results["commands"]] + ["```", ""]
    return "\n".join(lines)


def decode_step_ms(short: dict[str, Any], long: dict[str, Any]) -> float:
    """Milliseconds per decode step from two ``vllm bench latency`` rows of one backend, context and batch that
    differ only in output length: (latency(long) - latency(short)) / (long - short)."""
    return 1e3 * (long["avg_latency_s"] - short["avg_latency_s"]) / (long["output_len"] - short["output_len"])


def decode_steps(rows: list[dict[str, Any]]) -> dict[tuple[int, int, tuple[int, int]], dict[str, float]]:
    """:func:`decode_step_ms` per (context, batch, (shortest, longest output)) and backend, wherever a backend has
    finished rows at two or more output lengths."""
    steps: dict[tuple[int, int, tuple[int, int]], dict[str, float]] = {}
    for backend, context, batch in sorted({(r["backend"], r["context"], r["batch"]) for r in rows}):
        done = sorted((r for r in rows if "error" not in r and (r["backend"], r["context"], r["batch"]) ==
                       (backend, context, batch)), key=lambda r: r["output_len"])
        if len(done) >= 2:
            lengths = (done[0]["output_len"], done[-1]["output_len"])
            steps.setdefault((context, batch, lengths), {})[backend] = decode_step_ms(done[0], done[-1])
    return steps


def figure(results: dict[str, Any]):
    """TTFT, TPOT and output throughput against context for both backends, and latency per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    panels = (("median_ttft_ms", "median TTFT (ms)"), ("median_tpot_ms", "median TPOT (ms)"),
              ("output_throughput", "output tokens/s"))
    ok = [r for r in results["serve"] if "error" not in r]
    for ax, (field, label) in zip(axes, panels):
        for backend in BACKENDS:
            for conc in sorted({r["concurrency"] for r in ok}):
                pts = sorted((r["context"], r[field]) for r in ok
                             if r["backend"] == backend and r["concurrency"] == conc and field in r)
                if pts:
                    ax.plot([c // 1024 for c, _ in pts], [v for _, v in pts], marker="o",
                            label=f"{backend} conc {conc}")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["context"] // 1024 for r in ok})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"vllm bench serve: {label}")
        if ax.lines:
            ax.legend()
    lat = [r for r in results["latency"] if "error" not in r]
    shapes = sorted({(r["context"], r["batch"], r["output_len"]) for r in lat})
    for i, backend in enumerate(BACKENDS):
        values = [_row(lat, backend=backend, context=c, batch=b, output_len=o).get("avg_latency_s", 0.0)
                  for c, b, o in shapes]
        axes[3].bar([x + 0.4 * i for x in range(len(shapes))], values, width=0.4, label=backend)
    axes[3].set_xticks([x + 0.2 for x in range(len(shapes))], [f"{c // 1024}K b{b} o{o}" for c, b, o in shapes])
    axes[3].set_ylabel("seconds per batch")
    axes[3].set_title("vllm bench latency")
    if shapes:
        axes[3].legend()
    fig.tight_layout()
    return fig
