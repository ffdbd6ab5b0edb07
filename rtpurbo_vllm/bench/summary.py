"""``docs/results/summary.json``: the latest measured value of every headline figure, and the tables of
``README.md`` and ``docs/BENCHMARKS.md`` generated from it.

Format: ``{"metrics": {NAME: {"ratio", "rtpurbo", "baseline", "baseline_backend", "unit", "card", "date",
"command"}}}`` with NAME one of :data:`METRICS`. ``ratio`` > 1 means RTPURBO is better: baseline time over
RTPURBO time (``ms``, ``s``), RTPURBO over baseline (``tokens``, ``tok/s``); for ``points`` (accuracy) it
is the points RTPURBO loses, lower is better. A metric never measured is absent.

The benchmarks' result files are turned into entries by :func:`from_bench_attention`,
:func:`from_bench_serving`, :func:`from_bench_throughput` and :func:`from_bench_engine`; the command line
records them and rewrites the generated tables (between ``<!-- summary:NAME -->`` and
``<!-- /summary:NAME -->``):

    python -m rtpurbo_vllm.bench.summary record OUT/bench_throughput.json --date 2026-12-05
    python -m rtpurbo_vllm.bench.summary write      # the tables from the JSON
    python -m rtpurbo_vllm.bench.summary check      # exit 1 when a table or an entry disagrees
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from rtpurbo_vllm.outputs import write_json, write_text

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_JSON = ROOT / "docs" / "results" / "summary.json"
README, BENCHMARKS = ROOT / "README.md", ROOT / "docs" / "BENCHMARKS.md"
FIELDS = ("ratio", "rtpurbo", "baseline", "baseline_backend", "unit", "card", "date", "command")
BASELINE_BACKENDS = ("FLASH_ATTN bf16", "FLASH_ATTN fp8", "FA3")
UNITS = ("ms", "s", "tokens", "tok/s", "points")
LOWER_IS_BETTER = ("ms", "s")
# name -> what it measures (the row label of the tables), in table order.
METRICS = {
    "prefill_layer_128k": "one layer, prefill, 128K (sparse retrieval prefill)",
    "prefill_layer_512k": "one layer, prefill, 512K (sparse retrieval prefill)",
    "prefill_layer_1m": "one layer, prefill, 1M (sparse retrieval prefill)",
    "decode_layer_128k_b1": "one layer, decode step, 128K, batch 1",
    "decode_layer_512k_b1": "one layer, decode step, 512K, batch 1",
    "decode_layer_128k_b4": "one layer, decode step, 128K, batch 4",
    "decode_step_128k_b1": "decode step, 128K, batch 1 (`vllm serve`, median ITL)",
    "decode_step_128k_b4": "decode step, 128K, batch 4 (engine only)",
    "decode_step_128k_b4_vs_fp8": "decode step, 128K, batch 4, against an FP8 KV cache",
    "ttft_128k": "time to first token, 128K",
    "ttft_256k": "time to first token, 256K",
    "kv_capacity_128k_kvgroup15": "KV capacity at 128K, 15 % retrieval heads in whole KV groups",
    "kv_capacity_128k_global15": "KV capacity at 128K, global top 15 % retrieval heads",
    "kv_capacity_128k_n1": "KV capacity at 128K, 1 retrieval KV head per layer",
    "kv_capacity_128k_fp8_kvgroup15": "KV capacity at 128K, FP8, 15 % retrieval heads in whole KV groups",
    "kv_capacity_128k_fp8_n1": "KV capacity at 128K, FP8, 1 retrieval KV head per layer",
    "throughput_long_decodes_vs_fp8": "output tokens/s, long decodes, against an FP8 KV cache",
    "throughput_long_prompts_vs_fp8": "output tokens/s, long prompts, against an FP8 KV cache",
    "accuracy_16k_max_drop": "accuracy at 16K, largest drop over the tasks",
}
# Short names in the README's "measured" cells.
SHORT = {
    "prefill_layer_128k": "layer 128K", "prefill_layer_512k": "layer 512K", "prefill_layer_1m": "layer 1M",
    "decode_layer_128k_b1": "layer 128K b1", "decode_layer_512k_b1": "layer 512K b1",
    "decode_layer_128k_b4": "layer 128K b4", "decode_step_128k_b1": "step 128K b1", "decode_step_128k_b4": "step 128K b4",
    "decode_step_128k_b4_vs_fp8": "step 128K b4", "ttft_128k": "TTFT 128K", "ttft_256k": "TTFT 256K",
    "kv_capacity_128k_kvgroup15": "15 % by KV group", "kv_capacity_128k_global15": "global 15 %",
    "kv_capacity_128k_n1": "1 KV head/layer", "kv_capacity_128k_fp8_kvgroup15": "FP8, 15 % by KV group",
    "kv_capacity_128k_fp8_n1": "FP8, 1 KV head/layer", "throughput_long_decodes_vs_fp8": "long decodes",
    "throughput_long_prompts_vs_fp8": "long prompts", "accuracy_16k_max_drop": "16K, worst task",
}
# README status table: feature, state, the metrics whose ratios make its "measured" cell.
STATUS = (
    ("Prefill: local heads sinks + window, retrieval heads sparse top-p",
     "local heads always; retrieval heads sparse when `prefill_top_p` < 1 (opt-in, dense at the default 1); "
     "layer figures at 0.9 with 3 % of blocks holding the index mass, TTFT at 0.03 on flat dummy-weight scores "
     "(about 3 % of blocks kept)",
     ("prefill_layer_128k", "prefill_layer_512k", "prefill_layer_1m", "ttft_128k", "ttft_256k")),
    ("Sparse decode (block top-p)", "works, full CUDA graphs",
     ("decode_layer_128k_b1", "decode_layer_512k_b1", "decode_layer_128k_b4", "decode_step_128k_b1",
      "decode_step_128k_b4", "decode_step_128k_b4_vs_fp8")),
    ("Memory-saving KV layout: KV capacity at 128K",
     "the default (`kv_layout: compact`), any head selection, bf16 or fp8; figures: vLLM's logged KV tokens of the "
     "earlier per-layer layout (`bench_engine.py load` measures the requests held)",
     ("kv_capacity_128k_n1", "kv_capacity_128k_global15", "kv_capacity_128k_kvgroup15", "kv_capacity_128k_fp8_n1",
      "kv_capacity_128k_fp8_kvgroup15")),
    ("Serving throughput (output tok/s)", "benchmark ready",
     ("throughput_long_prompts_vs_fp8", "throughput_long_decodes_vs_fp8")),
    ("Accuracy (`rtpurbo-eval`)", "tiny model within 2 points at 2K", ("accuracy_16k_max_drop",)),
)


# ----------------------------------------------------------------------------------------------------
# Entries
# ----------------------------------------------------------------------------------------------------

def entry(*, rtpurbo: float, baseline: float, baseline_backend: str, unit: str, card: str, date: str,
          command: str) -> dict[str, Any]:
    """One metric's entry, its ratio oriented so that > 1 is better for RTPURBO (``points``: lost)."""
    if unit in LOWER_IS_BETTER:
        ratio = baseline / rtpurbo
    elif unit == "points":
        ratio = baseline - rtpurbo
    else:
        ratio = rtpurbo / baseline
    return {"ratio": round(ratio, 2), "rtpurbo": _round(rtpurbo), "baseline": _round(baseline),
            "baseline_backend": baseline_backend, "unit": unit, "card": card, "date": date, "command": command}


def _round(value: float) -> float | int:
    """Four significant digits (whole numbers stay whole)."""
    return value if isinstance(value, int) else float(f"{value:.4g}")


def problems(summary: dict[str, Any]) -> list[str]:
    """What is wrong with a summary: unknown names, missing fields, values out of their sets, ratios that
    do not follow from the values."""
    found = []
    for name, e in summary.get("metrics", {}).items():
        if name not in METRICS:
            found.append(f"{name}: not a known metric")
            continue
        missing = [f for f in FIELDS if f not in e]
        if missing:
            found.append(f"{name}: missing {', '.join(missing)}")
            continue
        if e["unit"] not in UNITS or e["baseline_backend"] not in BASELINE_BACKENDS:
            found.append(f"{name}: unit {e['unit']!r} or baseline_backend {e['baseline_backend']!r} unknown")
            continue
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", e["date"]):
            found.append(f"{name}: date {e['date']!r} is not YYYY-MM-DD")
        want = entry(rtpurbo=e["rtpurbo"], baseline=e["baseline"], baseline_backend=e["baseline_backend"],
                     unit=e["unit"], card=e["card"], date=e["date"], command=e["command"])["ratio"]
        if abs(want - e["ratio"]) > 0.011:
            found.append(f"{name}: ratio {e['ratio']} but the values give {want}")
    return found


def load(path: Path = SUMMARY_JSON) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def record(summary: dict[str, Any], entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``summary`` with ``entries`` put in (replacing older entries of the same names), in table order."""
    metrics = {**summary.get("metrics", {}), **entries}
    return {"metrics": {name: metrics[name] for name in METRICS if name in metrics}}


# ----------------------------------------------------------------------------------------------------
# From the benchmarks' result files
# ----------------------------------------------------------------------------------------------------

def card_of(environment: dict[str, Any]) -> str:
    """The card's name from a result's environment (``NVIDIA H200, 143771 MiB, ...`` -> ``NVIDIA H200``)."""
    return str(environment.get("device", "unknown")).split(",")[0]


def _script_command(script: str, argv: list[str]) -> str:
    """``python3 -P benchmarks/SCRIPT ARGV`` without ``--out DIR`` (where the results went)."""
    args = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
    return shlex.join(["python3", "-P", f"benchmarks/{script}", *args])


def from_bench_attention(results: dict[str, Any], date: str) -> dict[str, dict[str, Any]]:
    """``prefill_layer_*`` and ``decode_layer_*`` from a ``bench_attention.json`` (against FA3, ms). A prefill
    row that timed the retrieval heads' sparse prefill gives that time, its ``prefill_top_p`` in the command."""
    names = {("prefill", 1, 128): "prefill_layer_128k", ("prefill", 1, 512): "prefill_layer_512k",
             ("prefill", 1, 1024): "prefill_layer_1m", ("decode", 1, 128): "decode_layer_128k_b1",
             ("decode", 1, 512): "decode_layer_512k_b1", ("decode", 4, 128): "decode_layer_128k_b4"}
    argv = results["command"].split()
    argv = argv[1:] if argv[0].endswith(".py") else argv
    found = {}
    for row in results["rows"]:
        name = names.get((row["phase"], row["batch"], row["context"] // 1024))
        if not name:
            continue
        sparse = "rtpurbo_sparse_ms" in row
        row_argv = argv + (["--prefill-top-p", str(row["prefill_top_p"])]
                           if sparse and "--prefill-top-p" not in argv else [])
        found[name] = entry(rtpurbo=row["rtpurbo_sparse_ms" if sparse else "rtpurbo_ms"], baseline=row["fa3_ms"],
                            baseline_backend="FA3", unit="ms", card=card_of(results["environment"]), date=date,
                            command=_script_command("bench_attention.py", row_argv))
    return found


def _commands(results: dict[str, Any], script: str) -> str:
    return " && ".join(_script_command(script, i["argv"]) for i in results.get("invocations", []))


def from_bench_serving(results: dict[str, Any], date: str) -> dict[str, dict[str, Any]]:
    """From a ``bench_serving.json`` of FLASH_ATTN and RTPURBO: ``ttft_*`` (median TTFT at concurrency 1,
    prefix caching off), ``decode_step_128k_b1`` (median ITL at concurrency 1 of a ``--decode-only`` run),
    ``decode_step_128k_b4`` (the latency phase's decode step) and the ``kv_capacity_128k_*`` entry that
    names its artifact (KV tokens of a capacity run with the memory-saving layout)."""
    s, card, command = results["settings"], card_of(results["environment"]), _commands(results, "bench_serving.py")
    dense = "FLASH_ATTN fp8" if "fp8" in " ".join(s.get("engine_args", [])) else "FLASH_ATTN bf16"
    found = {}

    def put(name: str, rtp: float | None, base: float | None, unit: str) -> None:
        if rtp and base:
            found[name] = entry(rtpurbo=rtp, baseline=base, baseline_backend=dense, unit=unit, card=card, date=date,
                                command=command)

    def serve_row(backend: str, context: int) -> dict[str, Any]:
        return next((r for r in results["serve"] if r["backend"] == backend and r["context"] == context
                     and r.get("concurrency") == 1 and "error" not in r), {})

    for k in (128, 256):
        fa, rtp = serve_row("FLASH_ATTN", k * 1024), serve_row("RTPURBO", k * 1024)
        if s.get("decode_only"):
            if k == 128:
                put("decode_step_128k_b1", rtp.get("median_itl_ms"), fa.get("median_itl_ms"), "ms")
        elif not s.get("prefix_caching"):
            put(f"ttft_{k}k", _seconds(rtp.get("median_ttft_ms")), _seconds(fa.get("median_ttft_ms")), "s")
    from rtpurbo_vllm.bench.serving_report import decode_steps

    for (context, batch, _), steps in decode_steps(results["latency"]).items():
        if (context, batch) == (128 * 1024, 4):      # both engines on an FP8 KV cache: the _vs_fp8 figure
            name = "decode_step_128k_b4_vs_fp8" if dense == "FLASH_ATTN fp8" else "decode_step_128k_b4"
            put(name, steps.get("RTPURBO"), steps.get("FLASH_ATTN"), "ms")
    capacity, artifact = results.get("capacity", {}), results.get("artifact") or {}
    rtp, fa = capacity.get("RTPURBO", {}), capacity.get("FLASH_ATTN", {})
    from rtpurbo_vllm.bench.serving_report import FULL_LAYOUT

    if rtp.get("kv_layout", FULL_LAYOUT) != FULL_LAYOUT and s.get("max_model_len", 0) >= 128 * 1024:
        fp8 = "_fp8" if dense == "FLASH_ATTN fp8" else ""
        kind = ("n1" if artifact.get("kv_heads_per_layer") == 1 else
                "kvgroup15" if artifact.get("by_kv_group") and artifact.get("ratio") == 0.15 else
                "global15" if artifact.get("ratio") == 0.15 and artifact.get("kv_heads_per_layer") is None else None)
        if kind:
            put(f"kv_capacity_128k{fp8}_{kind}", rtp.get("kv_cache_tokens"), fa.get("kv_cache_tokens"), "tokens")
    return found


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def from_bench_throughput(results: dict[str, Any], date: str) -> dict[str, dict[str, Any]]:
    """``throughput_long_*_vs_fp8`` from a ``bench_throughput.json``: output tokens/s of RTPURBO-fp8 (or,
    while that has no row, RTPURBO) against FLASH_ATTN-fp8, per workload."""
    card, command = card_of(results["environment"] or {}), _commands(results, "bench_throughput.py")
    rows = {(r["workload"], r["backend"]): r for r in results["rows"] if "error" not in r}
    found = {}
    for workload in ("long-decodes", "long-prompts"):
        base = rows.get((workload, "FLASH_ATTN-fp8"), {}).get("output_throughput")
        rtp = (rows.get((workload, "RTPURBO-fp8")) or rows.get((workload, "RTPURBO")) or {}).get("output_throughput")
        if rtp and base:
            found[f"throughput_{workload.replace('-', '_')}_vs_fp8"] = entry(
                rtpurbo=rtp, baseline=base, baseline_backend="FLASH_ATTN fp8", unit="tok/s", card=card, date=date,
                command=command)
    return found


def from_bench_engine(results: dict[str, Any], date: str) -> dict[str, dict[str, Any]]:
    """From a ``bench_engine.json`` at 128K: ``decode_step_128k_{b1,b4}`` (RTPURBO with the global top 15 %
    in the backend's default layout against FLASH_ATTN, bf16), ``decode_step_128k_b4_vs_fp8`` (both on an
    FP8 KV cache) and ``kv_capacity_128k[_fp8]_*``, the memory-saving layout against FLASH_ATTN with the
    same KV dtype: the tokens of the requests held decoding under load (``load`` rows of both, each count
    exact), else vLLM's logged KV tokens (capacity rows first, else step rows)."""
    from rtpurbo_vllm.attention.serving_config import DEFAULT_KV_LAYOUT
    from rtpurbo_vllm.bench.serving_report import MEMORY_SAVING_LAYOUT

    card, command = card_of(results.get("environment") or {}), _commands(results, "bench_engine.py")
    rows = [r for r in results["rows"] if "error" not in r and r.get("context") == 128 * 1024]
    found = {}

    def value(phases: tuple[str, ...], name: str, get) -> float | None:
        """From the first of ``phases`` (in order) with a row of ``name`` that has the value."""
        return next((get(r) for phase in phases for r in rows if (r["phase"], r["name"]) == (phase, name) and get(r)),
                    None)

    def put(metric: str, phases: tuple[str, ...], rtp: str, base: str, get, unit: str) -> None:
        r, b = value(phases, rtp, get), value(phases, base, get)
        if r and b:
            backend = "FLASH_ATTN fp8" if base.endswith(":fp8") else "FLASH_ATTN bf16"
            found[metric] = entry(rtpurbo=r, baseline=b, baseline_backend=backend, unit=unit, card=card, date=date,
                                  command=command)

    for batch in ("1", "4"):
        put(f"decode_step_128k_b{batch}", ("step",), f"RTPURBO:auto:global15:{DEFAULT_KV_LAYOUT}", "FLASH_ATTN:auto",
            lambda r, b=batch: r.get("decode_step_ms", {}).get(b), "ms")
    put("decode_step_128k_b4_vs_fp8", ("step",), f"RTPURBO:fp8:global15:{DEFAULT_KV_LAYOUT}", "FLASH_ATTN:fp8",
        lambda r: r.get("decode_step_ms", {}).get("4"), "ms")
    def held_tokens(r: dict) -> int | None:
        """Tokens of the requests a ``load`` row held decoding, when that count is exact (requests were left
        waiting, none was preempted, the run settled)."""
        exact = not (r.get("all_admitted", True) or r.get("preemptions") or r.get("timed_out", True))
        return r["held_requests"] * r["context"] if exact else None

    for dtype, prefix, selections in (("auto", "kv_capacity_128k", ("kvgroup15", "global15", "n1")),
                                      ("fp8", "kv_capacity_128k_fp8", ("kvgroup15", "n1"))):
        for selection in selections:
            rtp, base = f"RTPURBO:{dtype}:{selection}:{MEMORY_SAVING_LAYOUT}", f"FLASH_ATTN:{dtype}"
            put(f"{prefix}_{selection}", ("capacity", "step"), rtp, base, lambda r: r.get("vllm_kv_tokens"), "tokens")
            put(f"{prefix}_{selection}", ("load",), rtp, base, held_tokens, "tokens")     # measured: it wins
    return found


def from_results(path: Path, date: str) -> dict[str, dict[str, Any]]:
    """The entries of one result file, by its name (``bench_attention.json``, ``bench_serving.json``,
    ``bench_throughput.json`` or ``bench_engine.json``, possibly with a prefix)."""
    results = json.loads(Path(path).read_text())
    for kind, extract in (("bench_attention", from_bench_attention), ("bench_serving", from_bench_serving),
                          ("bench_throughput", from_bench_throughput), ("bench_engine", from_bench_engine)):
        if kind in Path(path).name:
            return extract(results, date)
    if "rows" in results and "command" in results:           # a bench_attention file under another name
        return from_bench_attention(results, date)
    raise ValueError(f"{path}: not a bench_attention, bench_serving, bench_throughput or bench_engine result file")


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------

def _value(value: float, unit: str) -> str:
    if unit == "tokens":
        return f"{value:,.0f}"
    return f"{value:g} {unit}"


def _ratio(e: dict[str, Any]) -> str:
    return f"{e['ratio']:.2f} points lost" if e["unit"] == "points" else f"{e['ratio']:.2f}x"


def render_table(summary: dict[str, Any]) -> str:
    """The BENCHMARKS.md summary: one row per metric in the JSON."""
    lines = ["| metric | what | baseline | RTPURBO | ratio | card, date |", "| --- | --- | --- | --- | --- | --- |"]
    for name, e in summary["metrics"].items():
        lines.append(f"| `{name}` | {METRICS[name]} | {_value(e['baseline'], e['unit'])} ({e['baseline_backend']}) | "
                     f"{_value(e['rtpurbo'], e['unit'])} | {_ratio(e)} | {e['card']}, {e['date']} |")
    return "\n".join(lines)


def render_status(summary: dict[str, Any]) -> str:
    """The README status table: feature, state, and the ratios of its metrics in the JSON."""
    metrics = summary["metrics"]
    cards = ", ".join(sorted({e["card"] for e in metrics.values()})) or "no card yet"
    lines = [f"| feature | state | measured: RTPURBO against the baseline, {cards} |", "| --- | --- | --- |"]
    for feature, state, names in STATUS:
        by_baseline: dict[str, list[str]] = {}
        for n in (n for n in names if n in metrics):
            by_baseline.setdefault(metrics[n]["baseline_backend"], []).append(f"{SHORT[n]} {_ratio(metrics[n])}")
        figures = "; ".join(f"vs {base}: {' / '.join(items)}" for base, items in by_baseline.items())
        lines.append(f"| {feature} | {state} | {figures or 'not measured yet'} |")
    return "\n".join(lines)


RENDERERS = {"status": (README, render_status), "table": (BENCHMARKS, render_table)}


def _block(tag: str) -> re.Pattern:
    return re.compile(rf"(<!-- summary:{tag} -->\n)(.*?)(<!-- /summary:{tag} -->)", re.S)


def generated_block(text: str, tag: str) -> str | None:
    """The text between a document's ``summary:TAG`` markers (None without them)."""
    match = _block(tag).search(text)
    return match.group(2) if match else None


def rewrite(summary: dict[str, Any]) -> None:
    """Rewrites the generated tables of README.md and BENCHMARKS.md from ``summary``."""
    for tag, (path, render) in RENDERERS.items():
        text = path.read_text()
        if generated_block(text, tag) is None:
            raise ValueError(f"{path} has no <!-- summary:{tag} --> ... <!-- /summary:{tag} --> block")
        write_text(path, _block(tag).sub(lambda m: m.group(1) + render(summary) + "\n" + m.group(3), text))


def disagreements(summary: dict[str, Any]) -> list[str]:
    """The problems of ``summary`` and every generated table that differs from it."""
    found = problems(summary)
    for tag, (path, render) in RENDERERS.items():
        if generated_block(path.read_text(), tag) != render(summary) + "\n":
            found.append(f"{path.name}: the summary:{tag} table differs from summary.json (run `python -m "
                         "rtpurbo_vllm.bench.summary write`)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    rec = sub.add_parser("record", help="put the entries of result files into summary.json, rewrite the tables")
    rec.add_argument("results", nargs="+", type=Path,
                     help="bench_attention / bench_serving / bench_throughput / bench_engine JSON")
    rec.add_argument("--date", required=True, help="the day of the measurement, YYYY-MM-DD")
    sub.add_parser("write", help="rewrite the tables of README.md and BENCHMARKS.md from summary.json")
    sub.add_parser("check", help="exit 1 when summary.json or a table is inconsistent")
    args = parser.parse_args(argv)
    summary = load() if SUMMARY_JSON.is_file() else {"metrics": {}}
    if args.action == "record":
        for path in args.results:
            entries = from_results(path, args.date)
            print(f"{path}: {', '.join(entries) or 'no headline figure'}")
            summary = record(summary, entries)
        write_json(SUMMARY_JSON, summary)
    if args.action in ("record", "write"):
        rewrite(summary)
    found = disagreements(summary)
    print("\n".join(found) or "summary.json, README.md and BENCHMARKS.md agree")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
