"""``docs/results/summary.json`` (``rtpurbo_vllm.bench.summary``): well formed, every figure reproduced
from the raw result file it came from, and the tables of README.md and docs/BENCHMARKS.md generated
from it; entries from the benchmarks' result files; absent metrics leave no row."""

import json
from pathlib import Path

import pytest

from rtpurbo_vllm.bench import summary as sm

RESULTS = Path(sm.SUMMARY_JSON).parent
# Where each recorded figure was measured (raw files of the runs); the extractors must give it again.
SOURCES = {
    "2026-12-05-h200-session3/bench_attention_side_first1.json": ("prefill_layer_128k", "prefill_layer_512k",
                                                                  "prefill_layer_1m"),
    "2026-12-05-h200-session3/bench_attention.json": ("decode_layer_128k_b1", "decode_layer_512k_b1",
                                                      "decode_layer_128k_b4"),
    "2026-12-05-h200-session2/bench_serving.json": ("ttft_128k", "ttft_256k"),
    "2026-11-28-h200-session5/decode/bench_serving.json": ("decode_step_128k_b1",),
    "2026-11-28-h200-session5/lat/bench_serving.json": ("decode_step_128k_b4",),
}


def test_summary_is_well_formed():
    summary = sm.load()
    assert summary["metrics"] and sm.problems(summary) == []
    assert list(summary["metrics"]) == [n for n in sm.METRICS if n in summary["metrics"]]      # table order


def test_readme_and_benchmarks_agree_with_the_summary():
    assert sm.disagreements(sm.load()) == []


@pytest.mark.parametrize("source, names", list(SOURCES.items()))
def test_figures_come_from_their_raw_files(source, names):
    summary = sm.load()["metrics"]
    got = sm.from_results(RESULTS / source, date=summary[names[0]]["date"])
    for name in names:
        assert got[name] == summary[name], name


def test_fp8_latency_run_gives_the_vs_fp8_decode_step():
    """Both engines on an FP8 KV cache (``--engine-args=--kv-cache-dtype fp8``): the batch-4 step is the
    ``_vs_fp8`` figure, against FLASH_ATTN fp8."""
    results = json.loads((RESULTS / "2026-11-28-h200-session5/lat/bench_serving.json").read_text())
    results["settings"]["engine_args"] = ["--kv-cache-dtype", "fp8"]
    got = sm.from_bench_serving(results, date="2026-12-05")
    bf16 = sm.from_bench_serving(json.loads((RESULTS / "2026-11-28-h200-session5/lat/bench_serving.json")
                                            .read_text()), date="2026-12-05")["decode_step_128k_b4"]
    assert set(got) == {"decode_step_128k_b4_vs_fp8"}
    assert got["decode_step_128k_b4_vs_fp8"] == {**bf16, "baseline_backend": "FLASH_ATTN fp8"}


def test_engine_entries_from_a_results_file():
    """bench_engine.json: decode steps of the default layout (bf16 and fp8) and the memory-saving layout's
    KV tokens, each against FLASH_ATTN with the same KV dtype; rows of other contexts or with errors and
    the full layout's tokens give nothing."""
    results = json.loads((RESULTS / "2026-12-05-h200-session2/bench_engine.json").read_text())
    results["invocations"] = [{"argv": ["step", "--out", "/x", "--configs", "FLASH_ATTN:auto", "RTPURBO:auto"]}]
    for row in results["rows"]:     # its step rows ran the full layout, the default then
        if row["name"].endswith(":global15:full"):
            row["name"] = row["name"].replace(":full", ":compact")
            del row["vllm_kv_tokens"]
    capacity = {"phase": "capacity", "context": 131072}
    results["rows"] += [{**capacity, "name": "FLASH_ATTN:auto", "vllm_kv_tokens": 1000},
                        {**capacity, "name": "RTPURBO:auto:global15:full", "vllm_kv_tokens": 7000},
                        {**capacity, "name": "RTPURBO:auto:n1:compact", "vllm_kv_tokens": 4000},
                        {**capacity, "name": "RTPURBO:fp8:n1:compact", "vllm_kv_tokens": 9000},
                        {**capacity, "name": "RTPURBO:auto:kvgroup15:compact", "error": "exit 1"},
                        {**capacity, "name": "RTPURBO:auto:global15:compact", "vllm_kv_tokens": 5, "context": 4096}]
    got = sm.from_bench_engine(results, date="2026-12-05")
    assert set(got) == {"decode_step_128k_b1", "decode_step_128k_b4", "decode_step_128k_b4_vs_fp8",
                        "kv_capacity_128k_n1", "kv_capacity_128k_fp8_n1"}
    assert (got["decode_step_128k_b1"]["rtpurbo"], got["decode_step_128k_b1"]["baseline"]) == (9.62, 9.707)
    vs_fp8 = got["decode_step_128k_b4_vs_fp8"]
    assert (vs_fp8["rtpurbo"], vs_fp8["baseline"], vs_fp8["baseline_backend"]) == (30.38, 25.82, "FLASH_ATTN fp8")
    assert got["kv_capacity_128k_n1"]["ratio"] == 4.0
    assert (got["kv_capacity_128k_fp8_n1"]["baseline"], got["kv_capacity_128k_fp8_n1"]["ratio"]) == (1782160, 0.01)
    assert got["decode_step_128k_b1"]["command"] == ("python3 -P benchmarks/bench_engine.py step --configs "
                                                     "FLASH_ATTN:auto RTPURBO:auto")
    assert sm.problems({"metrics": got}) == []


def test_engine_capacity_under_load_wins_over_logged_tokens():
    """``load`` rows of both sides give the capacity (requests held decoding x context) when each count is
    exact; a row whose every request was admitted, or with preemptions, leaves the logged KV tokens."""
    load = {"phase": "load", "context": 131072, "all_admitted": False, "preemptions": 0, "timed_out": False}
    capacity = {"phase": "capacity", "context": 131072}
    results = {"environment": {}, "invocations": [{"argv": ["load", "--configs", "RTPURBO:auto:n1"]}], "rows": [
        {**capacity, "name": "FLASH_ATTN:auto", "vllm_kv_tokens": 1000},
        {**capacity, "name": "RTPURBO:auto:n1:compact", "vllm_kv_tokens": 2000},
        {**capacity, "name": "RTPURBO:auto:kvgroup15:compact", "vllm_kv_tokens": 3000},
        {**load, "name": "FLASH_ATTN:auto", "held_requests": 7},
        {**load, "name": "RTPURBO:auto:n1:compact", "held_requests": 30},
        {**load, "name": "RTPURBO:auto:kvgroup15:compact", "held_requests": 28, "all_admitted": True}]}
    got = sm.from_bench_engine(results, date="2026-12-05")
    assert (got["kv_capacity_128k_n1"]["rtpurbo"], got["kv_capacity_128k_n1"]["baseline"]) == (30 * 131072, 7 * 131072)
    assert got["kv_capacity_128k_kvgroup15"]["ratio"] == 3.0          # a lower bound only: the logged tokens


def test_kv_capacity_figures_match_the_server_logs():
    summary = sm.load()["metrics"]
    dense = json.loads((RESULTS / "2026-11-28-h200-session4/capacity_kv2.json").read_text())["capacity"]["FLASH_ATTN"]
    kv1 = json.loads((RESULTS / "2026-11-28-h200-session3/kvsplit_1.json").read_text())["capacity"]["RTPURBO"]
    top15 = (RESULTS / "2026-11-28-h200-session4/capacity_top15.log").read_text()
    assert summary["kv_capacity_128k_n1"]["rtpurbo"] == kv1["kv_cache_tokens"]
    assert summary["kv_capacity_128k_n1"]["baseline"] == summary["kv_capacity_128k_global15"]["baseline"] \
        == dense["kv_cache_tokens"]
    assert f"'kv_cache_tokens': {summary['kv_capacity_128k_global15']['rtpurbo']}," in top15


def test_problems_are_found():
    good = sm.entry(rtpurbo=5.0, baseline=10.0, baseline_backend="FLASH_ATTN bf16", unit="s", card="NVIDIA H200",
                    date="2026-12-01", command="python3 -P benchmarks/bench_serving.py")
    assert good["ratio"] == 2.0 and sm.problems({"metrics": {"ttft_128k": good}}) == []
    higher = {k: v for k, v in good.items() if k != "ratio"} | {"unit": "tok/s", "rtpurbo": 30.0}
    assert sm.entry(**higher)["ratio"] == 3.0
    bad = {"ttft_128k": {**good, "ratio": 3.0}, "ttft_1k": good, "ttft_256k": {**good, "date": "yesterday"},
           "decode_step_128k_b1": {k: v for k, v in good.items() if k != "command"}}
    found = "\n".join(sm.problems({"metrics": bad}))
    assert "ttft_128k: ratio 3.0 but the values give 2.0" in found and "ttft_1k: not a known metric" in found
    assert "date 'yesterday'" in found and "decode_step_128k_b1: missing command" in found


def test_absent_metrics_leave_no_row():
    one = {"metrics": {"ttft_128k": sm.load()["metrics"]["ttft_128k"]}}
    table, status = sm.render_table(one), sm.render_status(one)
    assert table.count("\n") == 2 and "`ttft_128k`" in table
    ratio = one["metrics"]["ttft_128k"]["ratio"]
    assert f"TTFT 128K {ratio:.2f}x" in status and status.count("not measured yet") == len(sm.STATUS) - 1
    assert sm.render_table({"metrics": {}}).count("\n") == 1


def test_throughput_entries_from_a_results_file():
    rows = [{"workload": "long-decodes", "backend": "FLASH_ATTN-fp8", "output_throughput": 100.0},
            {"workload": "long-decodes", "backend": "RTPURBO", "output_throughput": 250.0},
            {"workload": "long-prompts", "backend": "FLASH_ATTN-fp8", "output_throughput": 80.0},
            {"workload": "long-prompts", "backend": "RTPURBO", "error": "server: exited"}]
    results = {"environment": {"device": "NVIDIA H200, 143771 MiB, 580"}, "rows": rows,
               "invocations": [{"argv": ["--workload", "long-decodes", "--backends", "RTPURBO", "--out", "/x"]}]}
    got = sm.from_bench_throughput(results, "2026-12-05")
    assert list(got) == ["throughput_long_decodes_vs_fp8"]
    e = got["throughput_long_decodes_vs_fp8"]
    assert e["ratio"] == 2.5 and e["baseline_backend"] == "FLASH_ATTN fp8" and e["card"] == "NVIDIA H200"
    assert e["command"] == "python3 -P benchmarks/bench_throughput.py --workload long-decodes --backends RTPURBO"
    summary = sm.record(sm.load(), got)
    assert sm.problems(summary) == [] and "throughput_long_decodes_vs_fp8" in summary["metrics"]
    assert "long decodes 2.50x" in sm.render_status(summary)
