"""What the benchmarks read from vLLM: the KV-capacity lines of an engine log and the result files of
``vllm bench serve --save-result`` and ``vllm bench latency --output-json``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# vLLM 0.26 logs the KV capacity in vllm/v1/core/kv_cache_utils.py (get_kv_cache_configs):
#   logger.info_once("GPU KV cache size: %s tokens", f"{num_tokens:,}")
#   logger.info_once("Maximum concurrency for %s tokens per request: %.2fx", f"{max_model_len:,}", max_concurrency)
KV_CACHE_RE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
CONCURRENCY_RE = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")
# Fields of `vllm bench serve --save-result` (vllm/benchmarks/serve.py: benchmark() and main_async()).
SERVE_FIELDS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput")
SERVE_METRICS = ("ttft", "tpot", "itl", "e2el")


def parse_kv_capacity(log_text: str) -> dict[str, Any]:
    """KV capacity from an engine log (the last occurrence; None where a line is missing).

    Returns:
        ``kv_cache_tokens`` (int), ``max_concurrency`` (float, requests of ``concurrency_request_tokens``).
    """
    kv = KV_CACHE_RE.findall(log_text)
    conc = CONCURRENCY_RE.findall(log_text)
    return {"kv_cache_tokens": int(kv[-1].replace(",", "")) if kv else None,
            "max_concurrency": float(conc[-1][1]) if conc else None,
            "concurrency_request_tokens": int(conc[-1][0].replace(",", "")) if conc else None}



def parse_serve_result(path: Path) -> dict[str, Any]:
    """The numbers kept from a ``vllm bench serve --save-result`` JSON (times in ms)."""
    data = json.loads(path.read_text())
    row = {k: data[k] for k in SERVE_FIELDS if k in data}
    for metric in SERVE_METRICS:
        for stat in ("mean", "median", "p90", "p99"):
            key = f"{stat}_{metric}_ms"
            if key in data:
                row[key] = data[key]
    return row


def parse_latency_result(path: Path) -> dict[str, Any]:
    """The numbers kept from a ``vllm bench latency --output-json`` file (seconds per batch)."""
    data = json.loads(path.read_text())
    percentiles = {str(k): v for k, v in data["percentiles"].items()}
    return {"avg_latency_s": data["avg_latency"], "p50_latency_s": percentiles.get("50"),
            "p90_latency_s": percentiles.get("90"), "iterations": len(data["latencies"])}

