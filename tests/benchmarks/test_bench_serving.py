"""The serving benchmark (``rtpurbo_vllm.bench.serving``) on the CPU: the commands it builds (also through vLLM's own parsers), parsing
of vLLM's log lines and result files, the report, the server lifecycle against fake servers on 127.0.0.1,
and the whole run against a fake ``vllm`` executable."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rtpurbo_vllm.bench import serving as bs
from rtpurbo_vllm.bench import server, serving_report
from rtpurbo_vllm.bench.vllm_results import SERVE_FIELDS, parse_kv_capacity, parse_latency_result, parse_serve_result


def _settings(tmp_path, *extra):
    return bs.Settings.from_cli(bs.build_parser().parse_args(["--out", str(tmp_path / "out"), *extra]))


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def _sub(s, argv):
    """The command without the ``vllm`` prefix, which must be the configured one."""
    assert tuple(argv[:len(s.vllm)]) == s.vllm
    return argv[len(s.vllm):]


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------

def test_max_model_len_follows_the_phases_that_run(tmp_path):
    """RTPURBO's decode kernels are sized by max_model_len, so a latency-only run is not sized by --contexts."""
    latency_only = _settings(tmp_path, "--phases", "latency", "--latency-context", "128",
                             "--latency-output-len", "1", "513")
    assert latency_only.max_model_len == 128 * 1024 + 513 + bs.TOKENIZER_HEADROOM
    both = _settings(tmp_path, "--phases", "serve", "latency", "--contexts", "32", "256")
    assert both.max_model_len == 256 * 1024 + 128 + bs.TOKENIZER_HEADROOM


def test_server_commands_for_both_backends(tmp_path):
    s = _settings(tmp_path, "--contexts", "32", "256", "--output-len", "64", "--engine-args=--enforce-eager")
    assert s.max_model_len == 256 * 1024 + 64 + bs.TOKENIZER_HEADROOM
    fa, rtp = (bs.serve_command(s, backend, 8123) for backend in bs.BACKENDS)
    for argv, backend in ((fa, "FLASH_ATTN"), (rtp, "RTPURBO")):
        assert _sub(s, argv)[:2] == ["serve", str(s.model_dir)]
        assert _value(argv, "--attention-backend") == backend
        assert _value(argv, "--host") == "127.0.0.1" and _value(argv, "--port") == "8123"
        assert _value(argv, "--load-format") == "dummy"
        assert _value(argv, "--max-model-len") == str(s.max_model_len)
        assert "--no-enable-prefix-caching" in argv and argv[-1] == "--enforce-eager"
        assert _value(argv, "--tokenizer") == str(s.tokenizer_dir)
    assert s.vllm == (sys.executable, "-P", "-m", "vllm.entrypoints.cli.main")    # works with vLLM on PYTHONPATH
    assert "--additional-config" not in fa
    assert json.loads(_value(rtp, "--additional-config")) == {"rtpurbo": {"artifact": str(s.artifact_dir),
                                                                      "kv_layout": "compact"}}
    assert s.artifact_dir.parent == s.out            # never written into a user's model folder


def test_kv_layout_option(tmp_path):
    """--kv-layout (default compact, the backend's) reaches RTPURBO's additional-config (only RTPURBO's)
    and the comparable settings."""
    s = _settings(tmp_path, "--kv-layout", "full")
    fa, rtp = (bs.serve_command(s, backend, 8123) for backend in bs.BACKENDS)
    assert "--additional-config" not in fa
    assert json.loads(_value(rtp, "--additional-config")) == {
        "rtpurbo": {"artifact": str(s.artifact_dir), "kv_layout": "full"}}
    assert s.comparable()["kv_layout"] == "full"
    assert _settings(tmp_path).comparable()["kv_layout"] == "compact"
    with pytest.raises(SystemExit):
        _settings(tmp_path, "--kv-layout", "split")


def test_kv_heads_per_layer_option(tmp_path):
    """--kv-heads-per-layer reaches the synthetic artifact and the comparable settings; alone it takes every
    query head of the chosen KV groups (no default ratio), with --ratio the top share among them."""
    s = _settings(tmp_path, "--kv-heads-per-layer", "1", "--kv-layout", "compact")
    assert (s.ratio, s.kv_heads_per_layer) == (None, 1)
    assert bs.selection(s) == {"ratio": None, "count": None, "by_kv_group": False, "kv_heads_per_layer": 1}
    assert s.comparable()["kv_heads_per_layer"] == 1 and s.comparable()["ratio"] is None
    assert _settings(tmp_path).ratio == 0.15 and _settings(tmp_path).kv_heads_per_layer is None
    assert _settings(tmp_path, "--kv-heads-per-layer", "2", "--ratio", "0.1").ratio == 0.1
    with pytest.raises(ValueError, match="--kv-heads-per-layer must be >= 1"):
        _settings(tmp_path, "--kv-heads-per-layer", "0")
    # The prediction is KVLayout.vllm_capacity_ratio of the artifact's layout (window, sinks, threshold).
    from rtpurbo_vllm.kv_cache.layout import KVLayout

    pred = bs.predict_capacity(s)
    assert (pred["full_kv_heads"], pred["kv_heads"], pred["full_units"]) == (32, 256, "32 x 1")
    assert pred["max_in_flight_tokens"] == 2 * 16384 and pred["context"] == s.max_model_len
    from rtpurbo_vllm.head_layout import HeadLayout

    layout = HeadLayout.from_lists(32, 8, [[0, 1, 2, 3]] * 32)            # one KV head per layer, like the artifact
    plan = KVLayout.build(layout, head_size=128, window=8192, sink_tokens=4, dense_threshold=16384)
    assert pred["compact_vllm_capacity_ratio"] == round(plan.vllm_capacity_ratio(s.max_model_len, 32768), 3)
    assert 1.5 < pred["compact_vllm_capacity_ratio"] < pred["compact_capacity_ratio"]
    assert bs.max_in_flight_tokens(_settings(tmp_path, "--engine-args=--no-async-scheduling")) == 16384
    assert bs.engine_block_size(_settings(tmp_path, "--engine-args=--block-size 32")) == 32
    # A results file from before the option merges with a run without it.
    old = bs.new_results(_settings(tmp_path))
    del old["settings"]["kv_heads_per_layer"]
    bs.save(_settings(tmp_path), old)
    assert bs.load_results(_settings(tmp_path))["settings"]["kv_heads_per_layer"] is None
    with pytest.raises(ValueError, match="other settings .*kv_heads_per_layer"):
        bs.load_results(_settings(tmp_path, "--kv-heads-per-layer", "1"))


def test_shape_and_prefix_caching_options(tmp_path):
    """--shape picks the dummy model's config.json (and its folder), --prefix-caching the engine flag."""
    s = _settings(tmp_path, "--shape", "llama3.2-1b", "--prefix-caching")
    assert s.model_dir == s.out / "llama3.2-1b-dummy" and _settings(tmp_path).model_dir == s.out / "llama3-8b-dummy"
    config = bs.model_hf_config(s)
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (16, 2048, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.tie_word_embeddings and config.max_position_embeddings == s.max_model_len
    argv = bs.serve_command(s, "RTPURBO", 8123)
    assert "--enable-prefix-caching" in argv and "--no-enable-prefix-caching" not in argv
    assert s.comparable()["prefix_caching"] is True and _settings(tmp_path).comparable()["prefix_caching"] is False
    with pytest.raises(SystemExit):
        _settings(tmp_path, "--shape", "llama3-70b")


def test_dry_run_shows_the_budget_and_the_prediction(tmp_path, capsys):
    assert bs.main(["--out", str(tmp_path / "out"), "--dry-run", "--contexts", "128", "--kv-layout", "compact",
                    "--kv-heads-per-layer", "1", "--backends", "RTPURBO", "--phases", "serve"]) == 0
    printed = capsys.readouterr().out
    assert "synthesize_artifact(ratio=None, by_kv_group=False, kv_heads_per_layer=1" in printed
    assert "Predicted KV capacity of --kv-layout compact vs FLASH_ATTN at 131,328 tokens" in printed
    assert "32/256 full KV heads in 32 x 1 full units" in printed and "KVLayout.vllm_capacity_ratio" in printed
    assert '"kv_layout": "compact"' in printed and not (tmp_path / "out").exists()


def test_bench_commands(tmp_path):
    s = _settings(tmp_path, "--contexts", "32", "128", "--max-concurrency", "1", "4", "--num-prompts", "6",
                  "--latency-context", "64", "--latency-batch", "1", "4", "--latency-output-len", "512", "1")
    runs = bs.bench_serve_runs(s, "RTPURBO", 9000)
    assert [r.key for r in runs] == [{"backend": "RTPURBO", "context": c, "concurrency": k}
                                     for c in (32768, 131072) for k in (1, 4)]
    argv = runs[-1].argv
    assert _sub(s, argv)[:2] == ["bench", "serve"]
    assert _value(argv, "--host") == "127.0.0.1" and _value(argv, "--port") == "9000"
    assert _value(argv, "--dataset-name") == "random" and _value(argv, "--random-input-len") == "131072"
    assert _value(argv, "--max-concurrency") == "4" and _value(argv, "--num-prompts") == "6"
    assert _value(argv, "--model") == bs.SERVED_NAME and "--save-result" in argv
    assert Path(_value(argv, "--result-dir")) / _value(argv, "--result-filename") == runs[-1].result
    lat = bs.bench_latency_runs(s, "FLASH_ATTN")
    assert [(r.key["batch"], r.key["output_len"]) for r in lat] == [(1, 1), (1, 512), (4, 1), (4, 512)]
    assert len({r.result for r in lat}) == 4                       # one result file per run
    argv = lat[3].argv
    assert _sub(s, argv)[:2] == ["bench", "latency"] and _value(argv, "--attention-backend") == "FLASH_ATTN"
    assert _value(argv, "--input-len") == "65536" and _value(argv, "--batch-size") == "4"
    assert _value(argv, "--output-len") == "512" and Path(_value(argv, "--output-json")) == lat[3].result
    assert s.max_model_len >= 65536 + 512
    assert "--additional-config" in bs.bench_latency_runs(s, "RTPURBO")[0].argv


def test_child_environment(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "example.org")
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    env = server.child_env()
    assert env["NO_PROXY"] == env["no_proxy"] == "example.org,127.0.0.1,localhost"
    assert env["VLLM_LOGGING_COLOR"] == "0" and env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")                   # a caller's choice is kept
    assert server.child_env()["VLLM_USE_FLASHINFER_SAMPLER"] == "1"


@pytest.mark.parametrize("bad, message", [
    (["--keep", "0"], "--keep"), (["--top-p", "1.5"], "--top-p"), (["--max-concurrency", "0"], "--max-concurrency"),
    (["--max-model-len", "1000"], "below the longest request"), (["--ratio", "2"], "--ratio"),
])
def test_bad_settings_are_rejected(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        _settings(tmp_path, *bad)


def test_commands_parse_with_vllms_own_cli(tmp_path, parse_with_vllm):
    """The real ``vllm`` CLI main parses every command; only the subcommands' work is replaced by a probe."""
    s = _settings(tmp_path, "--contexts", "32", "--latency-batch", "4")
    commands = [_sub(s, argv) for argv in (bs.serve_command(s, "FLASH_ATTN", 8011),
                                           bs.serve_command(s, "RTPURBO", 8011),
                                           bs.bench_serve_runs(s, "RTPURBO", 8011)[0].argv,
                                           bs.bench_latency_runs(s, "RTPURBO")[0].argv)]
    keys = ["model_tag", "attention_backend", "host", "port", "load_format", "max_model_len", "enable_prefix_caching",
            "served_model_name", "disable_uvicorn_access_log", "additional_config", "dataset_name", "random_input_len",
            "random_output_len", "num_prompts", "save_result", "max_concurrency", "ignore_eos", "input_len",
            "batch_size", "output_json"]
    fa, rtp, client, latency = parse_with_vllm(commands, keys)
    for args, backend in ((fa, "FLASH_ATTN"), (rtp, "RTPURBO")):
        assert args["model_tag"] == str(s.model_dir) and args["attention_backend"] == backend
        assert (args["host"], args["port"], args["load_format"]) == ("127.0.0.1", 8011, "dummy")
        assert args["max_model_len"] == s.max_model_len and args["enable_prefix_caching"] is False
        assert args["served_model_name"] == [bs.SERVED_NAME] and args["disable_uvicorn_access_log"] is True
    assert "rtpurbo" in rtp["additional_config"]
    assert (client["host"], client["port"], client["dataset_name"]) == ("127.0.0.1", 8011, "random")
    assert (client["random_input_len"], client["random_output_len"], client["num_prompts"]) == (32768, 128, 4)
    assert client["save_result"] is True and client["max_concurrency"] == 1 and client["ignore_eos"] is True
    assert (latency["input_len"], latency["batch_size"], latency["attention_backend"]) == (131072, 4, "RTPURBO")
    assert latency["output_json"].endswith("latency-RTPURBO-128K-b4-o128.json") and latency["load_format"] == "dummy"


# ---------------------------------------------------------------------------------------------------
# Parsing vLLM's outputs
# ---------------------------------------------------------------------------------------------------

def _vllm_source(relative):
    return (Path(importlib.util.find_spec("vllm").origin).parent / relative).read_text()


# vLLM 0.26, vllm/v1/core/kv_cache_utils.py (get_kv_cache_configs), checked against the installed source below.
KV_FORMAT = "GPU KV cache size: %s tokens"
CONCURRENCY_FORMAT = "Maximum concurrency for %s tokens per request: %.2fx"
# The line prefix: vllm/logger.py _FORMAT ("%(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] %(message)s")
# behind the "(EngineCore pid=N) " that vllm/utils/system_utils.py _add_prefix writes for the engine process.
PREFIX = "(EngineCore pid=4242) INFO 11-28 10:15:02 [kv_cache_utils.py:2177] "


def sample_log(tokens, request_tokens, concurrency):
    return "\n".join([
        "(APIServer pid=4200) INFO 11-28 10:14:01 [utils.py:233] non-default args: {'model': '/m'}",
        PREFIX + KV_FORMAT % f"{tokens:,}",
        PREFIX + CONCURRENCY_FORMAT % (f"{request_tokens:,}", concurrency),
        "(APIServer pid=4200) INFO 11-28 10:16:40 [api_server.py:1000] Starting vLLM server on http://127.0.0.1:8000",
    ])


def test_log_formats_match_installed_vllm():
    source = _vllm_source("v1/core/kv_cache_utils.py")
    assert f'"{KV_FORMAT}"' in source and f'"{CONCURRENCY_FORMAT}"' in source


def test_parse_kv_capacity():
    got = parse_kv_capacity(sample_log(1_234_560, 262_272, 4.7071))
    assert got == {"kv_cache_tokens": 1_234_560, "max_concurrency": 4.71, "concurrency_request_tokens": 262_272}
    assert parse_kv_capacity(sample_log(999, 1000, 0.999)) == {
        "kv_cache_tokens": 999, "max_concurrency": 1.0, "concurrency_request_tokens": 1000}
    assert parse_kv_capacity("no such lines") == {"kv_cache_tokens": None, "max_concurrency": None,
                                                     "concurrency_request_tokens": None}


def test_parse_server_metrics_names_installed_vllm_metrics():
    source = _vllm_source("v1/metrics/loggers.py")
    assert '"vllm:num_preemptions"' in source and '"vllm:kv_cache_usage_perc"' in source
    text = "\n".join([
        "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
        "# TYPE vllm:num_preemptions_total counter",
        'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0',
        'vllm:num_preemptions_total{engine="1",model_name="m"} 2.0',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0',
        'vllm:num_requests_running{engine="0",model_name="m"} 0.0',
        "process_cpu_seconds_total 12.5",
    ])
    assert server.parse_server_metrics(text) == {"preemptions": 5.0, "kv_cache_usage": 0.0}
    assert server.parse_server_metrics("vllm:kv_cache_usage_perc 0.25\n") == {"kv_cache_usage": 0.25}
    assert server.parse_server_metrics(text, {"vllm:num_requests_running": "running"}) == {"running": 0.0}
    assert server.parse_server_metrics("") == {}


def serve_result(backend, context, ttft, tpot, throughput):
    """A ``vllm bench serve --save-result`` file as vllm/benchmarks/serve.py writes it (without --save-detailed)."""
    return {
        "date": "20261128-101500", "endpoint_type": "openai", "backend": "openai", "label": "openai",
        "model_id": bs.SERVED_NAME, "tokenizer_id": "/tok", "num_prompts": 4, "attention_backend": backend,
        "context": str(context), "request_rate": "inf", "burstiness": 1.0, "max_concurrency": 1,
        "duration": 12.5, "completed": 4, "failed": 0, "total_input_tokens": 4 * context, "total_output_tokens": 512,
        "request_throughput": 0.32, "request_goodput": None, "output_throughput": throughput,
        "total_token_throughput": 4 * context / 12.5, "max_output_tokens_per_s": 80.0,
        "max_concurrent_requests": 1, "rtfx": 0.0,
        **{f"{stat}_ttft_ms": ttft for stat in ("mean", "median", "std", "p50", "p90", "p99")},
        **{f"{stat}_tpot_ms": tpot for stat in ("mean", "median", "std", "p50", "p90", "p99")},
        **{f"{stat}_itl_ms": tpot for stat in ("mean", "median", "std", "p50", "p90", "p99")},
        **{f"{stat}_e2el_ms": ttft + 127 * tpot for stat in ("mean", "median", "std", "p50", "p90", "p99")},
    }


def latency_result(avg):
    """A ``vllm bench latency --output-json`` file (vllm/benchmarks/latency.py; percentile keys become strings)."""
    return {"avg_latency": avg, "latencies": [avg * 0.9, avg, avg * 1.1],
            "percentiles": {"10": avg * 0.9, "25": avg, "50": avg, "75": avg, "90": avg * 1.1, "99": avg * 1.1}}


def test_result_field_names_match_installed_vllm():
    serve, latency = _vllm_source("benchmarks/serve.py"), _vllm_source("benchmarks/latency.py")
    for field in SERVE_FIELDS:
        assert f'"{field}"' in serve
    assert 'f"mean_{metric_attribute_name}_ms"' in serve and 'f"p{p_word}_{metric_attribute_name}_ms"' in serve
    assert all(f'"{k}"' in latency for k in ("avg_latency", "latencies", "percentiles"))


def test_parse_bench_results(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(serve_result("RTPURBO", 32768, 150.0, 20.0, 40.0)))
    row = parse_serve_result(path)
    assert row["completed"] == 4 and row["failed"] == 0 and row["output_throughput"] == 40.0
    assert row["median_ttft_ms"] == 150.0 and row["p99_tpot_ms"] == 20.0 and row["p90_itl_ms"] == 20.0
    assert "std_ttft_ms" not in row and "attention_backend" not in row
    path.write_text(json.dumps(latency_result(2.0)))
    assert parse_latency_result(path) == {"avg_latency_s": 2.0, "p50_latency_s": 2.0, "p90_latency_s": 2.2,
                                             "iterations": 3}


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def fake_results(s):
    results = bs.new_results(s)
    results["environment"] = {"device": "NVIDIA H200, 143771 MiB, 570.00", "versions": {"vllm": "0.26.0"},
                              "commit": "abc1234"}
    results["capacity"] = {"FLASH_ATTN": {"kv_cache_tokens": 400_000, "max_concurrency": 1.52},
                           "RTPURBO": {"kv_cache_tokens": 380_000, "max_concurrency": 1.45}}
    for backend, ttft, tpot, itl, tput in (("FLASH_ATTN", 2000.0, 40.0, 9.0, 20.0),
                                           ("RTPURBO", 1000.0, 10.0, 4.5, 60.0)):
        results["serve"].append({"backend": backend, "context": 131072, "concurrency": 1, "median_ttft_ms": ttft,
                                 "median_tpot_ms": tpot, "median_itl_ms": itl, "output_throughput": tput})
        for output_len, seconds in ((1, 30.0 if backend == "FLASH_ATTN" else 12.0),
                                    (129, 32.56 if backend == "FLASH_ATTN" else 12.64)):
            results["latency"].append({"backend": backend, "context": 131072, "batch": 4, "output_len": output_len,
                                       "avg_latency_s": seconds})
    results["serve"].append({"backend": "RTPURBO", "context": 262144, "concurrency": 1, "error": "exit code 1"})
    results["commands"].append({"command": "vllm serve /m --attention-backend FLASH_ATTN"})
    return results


def test_report_tables_and_ratios(tmp_path):
    s = _settings(tmp_path)
    text = bs.render_markdown(fake_results(s))
    row = next(line for line in text.splitlines() if line.startswith("| 128K | 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["128K", "1", "2000", "1000", "2.00x", "40", "10", "4.00x", "9", "4.5", "2.00x", "20", "60",
                     "3.00x", "400,000", "380,000", "0.95x", "1.52", "1.45"]
    assert "| 128K | 4 | 1 | 30 | 12 | 2.50x |" in text
    # Decode step: (32.56 - 30) / 128 = 20 ms on FLASH_ATTN, (12.64 - 12) / 128 = 5 ms on RTPURBO.
    assert "| 128K | 4 | 1 -> 129 | 20 | 5 | 4.00x |" in text
    assert "| 256K | 1 |" in text and "FAILED, exit code 1" in text         # a failed point is listed, not hidden
    assert "NVIDIA H200" in text and "vllm serve /m --attention-backend FLASH_ATTN" in text


def test_report_files_are_written_atomically(tmp_path):
    s = _settings(tmp_path)
    results = fake_results(s)
    bs.save(s, results)
    bs.write_report(s, results)
    assert json.loads((s.out / bs.RESULTS_JSON).read_text()) == results
    assert (s.out / bs.REPORT_MD).read_text().startswith("# Serving benchmark")
    assert (s.out / bs.PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in s.out.iterdir() if p.name.endswith(".tmp")]


def test_decode_step_needs_two_finished_output_lengths():
    rows = [{"backend": "RTPURBO", "context": 8, "batch": 4, "output_len": n, "avg_latency_s": s}
            for n, s in ((1, 1.0), (65, 1.64), (33, 9.9))]
    rows[2]["error"] = "exit code 1"                                    # a failed run is left out
    rows.append({"backend": "FLASH_ATTN", "context": 8, "batch": 4, "output_len": 1, "avg_latency_s": 2.0})
    assert serving_report.decode_steps(rows) == {(8, 4, (1, 65)): {"RTPURBO": pytest.approx(10.0)}}


def test_results_with_one_latency_output_length_are_read_and_merged(tmp_path):
    """A results file from before several output lengths (an int in settings, rows without output_len)."""
    s = _settings(tmp_path, "--latency-output-len", "128")
    old = bs.new_results(s)
    old["settings"]["latency_output_len"] = 128
    old["latency"] = [{"backend": "RTPURBO", "context": 131072, "batch": 4, "avg_latency_s": 12.0}]
    s.out.mkdir(parents=True)
    (s.out / bs.RESULTS_JSON).write_text(json.dumps(old))
    results = bs.load_results(s)
    assert results["settings"] == s.comparable() and results["latency"][0]["output_len"] == 128
    assert "| 128K | 4 | 128 |  | 12 |" in bs.render_markdown(results)


def test_parallel_runs_merge_into_one_report(tmp_path, capsys):
    """One backend per GPU, each into its own --out; --merge joins them into one table."""
    parts = {}
    for backend in bs.BACKENDS:
        s = _settings(tmp_path / backend)
        results = fake_results(s)
        for part in ("serve", "latency"):
            results[part] = [r for r in results[part] if r["backend"] == backend]
        results["capacity"] = {backend: results["capacity"][backend]}
        bs.save(s, results)
        parts[backend] = s.out
    fa, rtp = parts["FLASH_ATTN"], parts["RTPURBO"]
    assert bs.main(["--out", str(fa), "--merge", str(rtp)]) == 0
    merged = json.loads((fa / bs.RESULTS_JSON).read_text())
    assert set(merged["capacity"]) == set(bs.BACKENDS) and len(merged["serve"]) == 3 and len(merged["latency"]) == 4
    text = (fa / bs.REPORT_MD).read_text()
    assert "| 128K | 4 | 1 -> 129 | 20 | 5 | 4.00x |" in text and text in capsys.readouterr().out
    # Merging again replaces the same points: nothing is duplicated.
    assert bs.main(["--out", str(fa), "--merge", str(rtp)]) == 0
    assert len(json.loads((fa / bs.RESULTS_JSON).read_text())["serve"]) == 3
    other = _settings(tmp_path / "other", "--keep", "0.1")
    bs.save(other, fake_results(other))
    with pytest.raises(ValueError, match="other settings \\(top_p\\)"):
        bs.main(["--out", str(fa), "--merge", str(other.out)])
    sparse_prefill = _settings(tmp_path / "sparse_prefill", "--prefill-top-p", "0.03")
    bs.save(sparse_prefill, fake_results(sparse_prefill))
    with pytest.raises(ValueError, match="other settings \\(prefill_top_p\\)"):
        bs.main(["--out", str(fa), "--merge", str(sparse_prefill.out)])


def test_put_row_replaces_same_key():
    rows = [{"backend": "RTPURBO", "context": 1, "batch": 1, "avg_latency_s": 1.0},
            {"backend": "RTPURBO", "context": 1, "batch": 4, "avg_latency_s": 2.0}]
    bs.put_row(rows, {"backend": "RTPURBO", "context": 1, "batch": 1, "avg_latency_s": 3.0},
               {"backend": "RTPURBO", "context": 1, "batch": 1})
    assert sorted((r["batch"], r["avg_latency_s"]) for r in rows) == [(1, 3.0), (4, 2.0)]


# ---------------------------------------------------------------------------------------------------
# The whole run against a fake `vllm`
# ---------------------------------------------------------------------------------------------------

def test_full_run_against_fake_vllm(tmp_path, capsys, monkeypatch, fake_vllm):
    out = tmp_path / "out"
    common = ["--vllm", fake_vllm, "--out", str(out), "--contexts", "1", "2", "--latency-context", "1",
              "--latency-batch", "1", "2", "--latency-output-len", "1", "33", "--num-prompts", "2",
              "--startup-timeout", "20", "--stop-timeout", "1", "--max-model-len", "4096", "--kv-layout", "full"]
    assert bs.main(common) == 0
    printed = capsys.readouterr().out
    assert "Kept-block share of the retrieval heads at decode: set through top-p, not measured" in printed
    assert "Predicted KV capacity of --kv-layout compact vs FLASH_ATTN" in printed
    assert "KV capacity RTPURBO (full layout) / FLASH_ATTN: measured 1.00x (max concurrency 1.50 / 1.50); " \
           "predicted about 1x for the full layout" in printed
    results = json.loads((out / bs.RESULTS_JSON).read_text())
    assert results["capacity"]["FLASH_ATTN"]["kv_cache_tokens"] == 400_000
    assert results["capacity"]["RTPURBO"]["concurrency_request_tokens"] == 4096
    assert results["capacity"]["RTPURBO"]["after_runs"] == {"preemptions": 0.0, "kv_cache_usage": 0.0}
    assert len(results["serve"]) == 4 and len(results["latency"]) == 8
    assert results["artifact"]["params"]["top_p"] == 0.03
    assert results["artifact"]["params"]["prefill_top_p"] == 1.0        # dense retrieval prefill by default
    assert results["artifact"]["kv_heads_per_layer"] is None and results["artifact"]["ratio"] == 0.15
    assert results["artifact"]["predicted_capacity"]["kv_layout"] == "full"
    assert "KV capacity RTPURBO (full layout) / FLASH_ATTN: measured 1.00x" in (out / bs.REPORT_MD).read_text()
    assert 0.03 <= results["artifact"]["kept_block_share_flat"]["2048"] <= 0.1     # 2 forced blocks of 32
    assert sum(c.get("server", False) for c in results["commands"]) == 2
    assert len(results["commands"]) == 2 + 4 + 8
    assert (out / bs.PLOT_PNG).is_file() and "| 2K | 1 | 400 | 200 | 2.00x |" in (out / bs.REPORT_MD).read_text()
    assert "| 1K | 2 | 1 | 4.01 | 2.004 | 2.00x |" in (out / bs.REPORT_MD).read_text()
    assert "| 1K | 2 | 1 -> 33 | 10 | 4 | 2.50x |" in (out / bs.REPORT_MD).read_text()      # the decode step

    # A second invocation merges: both RTPURBO points now fail (a command error; one failed request), they
    # replace the earlier rows, nothing is duplicated.
    monkeypatch.setenv("FAKE_FAIL", "1")
    assert bs.main([*common, "--backends", "RTPURBO", "--phases", "serve"]) == 1
    results = json.loads((out / bs.RESULTS_JSON).read_text())
    assert len(results["serve"]) == 4 and len(results["invocations"]) == 2
    failed = sorted((r["backend"], r["context"], r["error"].split(";")[0]) for r in results["serve"] if "error" in r)
    assert failed == [("RTPURBO", 1024, "1 requests failed, 1 completed"), ("RTPURBO", 2048, "exit code 1")]
    # A server that dies at startup is recorded, and the latency phase still runs.
    monkeypatch.setenv("FAKE_SERVER_EXIT", "1")
    assert bs.main([*common, "--backends", "FLASH_ATTN", "--latency-batch", "1"]) == 1
    results = json.loads((out / bs.RESULTS_JSON).read_text())
    assert "exited with code 2" in results["capacity"]["FLASH_ATTN"]["error"]
    assert "FLASH_ATTN server: FAILED" in (out / bs.REPORT_MD).read_text()
    assert len(results["latency"]) == 8 and len(results["invocations"]) == 3
    with pytest.raises(ValueError, match="other settings .*top_p"):
        bs.main([*common, "--keep", "0.1"])


def test_capacity_phase_only_starts_the_servers(tmp_path, capsys, fake_vllm):
    out = tmp_path / "out"
    assert bs.main(["--vllm", fake_vllm, "--out", str(out), "--phases", "capacity", "--kv-layout", "compact",
                    "--kv-heads-per-layer", "1", "--contexts", "1", "--startup-timeout", "20", "--stop-timeout", "1",
                    "--max-model-len", "4096"]) == 0
    results = json.loads((out / bs.RESULTS_JSON).read_text())
    assert [c.get("server", False) for c in results["commands"]] == [True, True]
    assert results["serve"] == [] and results["latency"] == []
    assert results["capacity"]["RTPURBO"]["kv_cache_tokens"] == 380_000
    assert results["capacity"]["RTPURBO"]["kv_layout"] == "compact"
    assert "KV capacity RTPURBO (compact layout) / FLASH_ATTN: measured 1.00x" in capsys.readouterr().out


def test_an_interrupted_server_is_recorded(tmp_path, capsys, monkeypatch, fake_vllm):
    """A timeout's SIGTERM while the RTPURBO server starts: its capacity entry names the interrupt, the
    backend measured before it stays, the report is written, and the interrupt still ends the run."""
    real = bs.recorded_server

    def recorded_server(commands, argv, port, log, label, settings):
        if label == "RTPURBO":
            raise KeyboardInterrupt("signal 15")
        return real(commands, argv, port, log, label, settings)
    monkeypatch.setattr(bs, "recorded_server", recorded_server)
    monkeypatch.setattr(bs, "stop_on_sigterm", lambda: None)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        bs.main(["--vllm", fake_vllm, "--out", str(out), "--phases", "capacity", "--contexts", "1",
                 "--startup-timeout", "20", "--stop-timeout", "1", "--max-model-len", "4096"])
    results = json.loads((out / bs.RESULTS_JSON).read_text())
    assert results["capacity"]["RTPURBO"]["error"] == server.INTERRUPTED
    assert results["capacity"]["FLASH_ATTN"]["kv_cache_tokens"] == 400_000
    assert f"RTPURBO server: FAILED, {server.INTERRUPTED}" in (out / bs.REPORT_MD).read_text()


def test_decode_only_primes_each_context_with_the_same_prompts(tmp_path, fake_vllm):
    out = tmp_path / "out"
    assert bs.main(["--vllm", fake_vllm, "--out", str(out), "--phases", "serve", "--decode-only", "--contexts", "1",
                    "--max-concurrency", "1", "4", "--num-prompts", "3", "--startup-timeout", "20",
                    "--stop-timeout", "1", "--max-model-len", "4096"]) == 0
    results = json.loads((out / bs.RESULTS_JSON).read_text())
    assert results["settings"]["prefix_caching"] and results["settings"]["decode_only"]
    clients = [c["command"].split() for c in results["commands"] if not c.get("server")]
    assert len(clients) == 2 * 3               # 2 backends x (priming + 2 concurrencies)

    def without(argv, *flags):                  # argv less each flag and its value
        drop = {i + j for i, a in enumerate(argv) if a in flags for j in (0, 1)}
        return [a for i, a in enumerate(argv) if i not in drop]

    for prime, *measured in (clients[:3], clients[3:]):
        assert prime[prime.index("--result-filename") + 1].endswith("-1K-prime.json")
        assert prime[prime.index("--max-concurrency") + 1] == "3"      # every prompt at once
        assert prime[prime.index("--num-warmups") + 1] == "1"
        for argv, concurrency in zip(measured, ("1", "4")):
            assert argv[argv.index("--max-concurrency") + 1] == concurrency
            assert argv[argv.index("--num-warmups") + 1] == "0"          # the priming run warmed up
            # the same prompts: identical commands but for concurrency, warm-ups and the result file
            flags = ("--max-concurrency", "--num-warmups", "--result-filename")
            assert without(argv, *flags) == without(prime, *flags)
    assert all("--enable-prefix-caching" in c["command"] for c in results["commands"] if c.get("server"))
    assert len(results["serve"]) == 4 and not any(r.get("prime") for r in results["serve"])
    report = (out / bs.REPORT_MD).read_text()
    assert "decode only: each context's prompts were sent once before" in report
    assert "| ITL FA (ms) | ITL RTP (ms) | speedup |" in report
