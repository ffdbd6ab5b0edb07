"""The throughput benchmark (``rtpurbo_vllm.bench.throughput``) on the CPU: the fixed workloads (seeded,
exact lengths through vLLM's own ``custom`` dataset and the tiny tokenizer, shared documents), the
commands (through vLLM's own parsers), and whole runs against the fake ``vllm`` of ``fake_vllm.py``: one
backend per invocation merging into one report, ``--merge`` of parallel folders, a failed server."""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from rtpurbo_vllm.bench import throughput as tp
from rtpurbo_vllm.tiny import tiny_model_dir

K = 1024


def _settings(tmp_path, *extra):
    return tp.settings_from_cli(tp.build_parser().parse_args(["--out", str(tmp_path / "out"), *extra]))


def _argv(tmp_path, fake_vllm, *extra):
    return ["--vllm", fake_vllm, "--out", str(tmp_path / "out"), "--num-requests", "3", "--startup-timeout", "20",
            "--stop-timeout", "1", *extra]


def test_workloads_are_fixed_by_the_seed():
    prompts = tp.make_requests(tp.WORKLOADS["long-prompts"], seed=0)
    assert len(prompts) == 64 and {r["output_tokens"] for r in prompts} == {512}
    lengths = [r["prompt_tokens"] for r in prompts]
    assert all(16 * K <= n <= 128 * K for n in lengths) and len(set(lengths)) > 32
    assert sum(n < 45 * K for n in lengths) > 20                    # log-uniform: the geometric middle is ~45K
    assert all(len(r["prompt"].split()) == r["prompt_tokens"] - 1 for r in prompts[:4])     # + <s>
    assert tp.make_requests(tp.WORKLOADS["long-prompts"], seed=0) == prompts
    assert tp.make_requests(tp.WORKLOADS["long-prompts"], seed=1) != prompts
    assert tp.make_requests(tp.WORKLOADS["long-prompts"], seed=0, num_requests=3) == prompts[:3]


def test_long_decodes_share_eight_documents():
    requests = tp.make_requests(tp.WORKLOADS["long-decodes"], seed=0)
    assert len(requests) == 64 and {r["output_tokens"] for r in requests} == {1024}
    assert all(64 * K + tp.QUESTION_WORDS <= r["prompt_tokens"] <= 128 * K for r in requests)
    documents = [r["prompt"].rsplit(" query ", 1)[0] for r in requests]
    assert len(set(documents)) == 8
    assert all(documents[i] == documents[i % 8] for i in range(64))
    questions = [r["prompt"].rsplit(" query ", 1)[1].split()[:2] for r in requests]
    assert len({tuple(q) for q in questions}) == 64                    # the request number, as two words
    assert all(len(r["prompt"].split()) == r["prompt_tokens"] - 1 for r in requests[:9])


_VLLM_CUSTOM_DATASET = textwrap.dedent("""
    import json, sys
    from transformers import AutoTokenizer
    from vllm.benchmarks.datasets import CustomDataset
    path, tokenizer = sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[2])
    dataset = CustomDataset(dataset_path=path, disable_shuffle=True, random_seed=0)
    requests = dataset.sample(tokenizer=tokenizer, num_requests=0, output_len=-1, skip_chat_template=True)
    print(json.dumps([[r.prompt_len, r.expected_output_len] for r in requests]))
""")


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None,
                    reason="vLLM's custom dataset reads JSONL with pandas (vllm[bench]; on the GPU machine's image)")
def test_vllm_reads_the_dataset_with_exact_lengths(tmp_path):
    """vLLM's own ``custom`` dataset, as ``vllm bench serve --dataset-name custom --custom-output-len -1
    --skip-chat-template --disable-shuffle`` loads it, gives each request our length and output length."""
    workload = tp.Workload("small", num_requests=12, output_len=7, prefix_caching=True, num_documents=2,
                           lengths=(300, 600))
    s = _settings(tmp_path)
    requests = tp.write_dataset(s, workload)
    proc = subprocess.run([sys.executable, "-P", "-c", _VLLM_CUSTOM_DATASET, str(tp.dataset_path(s, workload)),
                           str(tiny_model_dir())], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == [[r["prompt_tokens"], 7] for r in requests]


def test_commands_parse_with_vllm(tmp_path, parse_with_vllm):
    s = _settings(tmp_path, "--backends", "FLASH_ATTN-fp8,RTPURBO", "--workload", "long-decodes")
    workload = tp.WORKLOADS["long-decodes"]
    fp8 = tp.engine_settings(s, workload, "FLASH_ATTN-fp8")
    assert s.backends == ("FLASH_ATTN-fp8", "RTPURBO") and fp8.prefix_caching
    assert s.serving.max_model_len == 128 * K + 1024 + 128
    serve = tp.bs.serve_command(fp8, "FLASH_ATTN", 8011)
    bench = tp.bench_command(s, workload, "FLASH_ATTN-fp8", 8011, tmp_path / "r.json", 64)
    serve_args, bench_args = parse_with_vllm(
        [serve[serve.index("serve"):], bench[bench.index("bench"):]],
        ["kv_cache_dtype", "enable_prefix_caching", "attention_backend", "dataset_name", "dataset_path",
         "custom_output_len", "skip_chat_template", "disable_shuffle", "request_rate", "num_prompts", "ignore_eos",
         "metric_percentiles", "save_result"])
    assert serve_args["kv_cache_dtype"] == "fp8" and serve_args["enable_prefix_caching"] is True
    assert bench_args["dataset_name"] == "custom" and bench_args["custom_output_len"] == -1
    assert bench_args["skip_chat_template"] is True and bench_args["disable_shuffle"] is True
    assert bench_args["request_rate"] == float("inf") and bench_args["num_prompts"] == 64 and bench_args["ignore_eos"]
    assert bench_args["dataset_path"].endswith("datasets/long-decodes.jsonl") and bench_args["save_result"]
    prompts = tp.engine_settings(s, tp.WORKLOADS["long-prompts"], "RTPURBO")
    assert not prompts.prefix_caching and "--kv-cache-dtype" not in prompts.engine_args


def test_bad_backend_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        _settings(tmp_path, "--backends", "FLASH_ATTN,FLASHINFER")
    with pytest.raises(ValueError, match="--num-requests"):
        _settings(tmp_path, "--num-requests", "0")


def test_one_backend_per_invocation_merges_into_one_report(tmp_path, fake_vllm, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_RUNNING", "2")
    assert tp.main(_argv(tmp_path, fake_vllm, "--workload", "long-prompts", "--backends", "FLASH_ATTN")) == 0
    assert tp.main(_argv(tmp_path, fake_vllm, "--workload", "long-decodes", "--backends", "RTPURBO,FLASH_ATTN-fp8")) == 0
    assert tp.main(_argv(tmp_path, fake_vllm, "--workload", "long-decodes", "--backends", "FLASH_ATTN")) == 0
    out = tmp_path / "out"
    results = json.loads((out / tp.RESULTS_JSON).read_text())
    rows = {(r["workload"], r["backend"]): r for r in results["rows"]}
    assert set(rows) == {("long-prompts", "FLASH_ATTN"), ("long-decodes", "FLASH_ATTN"),
                         ("long-decodes", "RTPURBO"), ("long-decodes", "FLASH_ATTN-fp8")}
    row = rows[("long-decodes", "RTPURBO")]
    assert row["completed"] == 3 and row["failed"] == 0 and row["requests"] == 3
    assert row["max_running"] == 2.0 and row["preemptions"] == 0.0 and row["kv_cache_tokens"] == 380_000
    assert row["output_throughput"] == 200.0 and row["median_tpot_ms"] == 5.0 and row["p99_tpot_ms"] == 10.0
    commands = [c["command"] for c in results["commands"]]
    assert sum("--kv-cache-dtype fp8" in c for c in commands) == 1
    assert sum("--enable-prefix-caching" in c for c in commands) == 3            # the long-decodes servers
    servers = [c for c in results["commands"] if c.get("server")]
    assert len(servers) == 4 and len(results["invocations"]) == 3
    report = (out / tp.REPORT_MD).read_text()
    assert "## long-decodes" in report and "## long-prompts" in report
    assert "| RTPURBO | 200.0 | 400.0 | 2.00x | 2.00x |" in report
    assert (out / tp.PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "datasets" / "long-decodes.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["output_tokens"] == 1024


def test_merge_of_parallel_folders_and_a_failed_server(tmp_path, fake_vllm, monkeypatch):
    assert tp.main(_argv(tmp_path, fake_vllm, "--backends", "FLASH_ATTN")) == 0
    other = tmp_path / "gpu1"
    monkeypatch.setenv("FAKE_SERVER_EXIT", "1")
    assert tp.main(["--vllm", fake_vllm, "--out", str(other), "--backends", "RTPURBO", "--num-requests", "3",
                    "--startup-timeout", "20", "--stop-timeout", "1"]) == 1
    failed = json.loads((other / tp.RESULTS_JSON).read_text())["rows"]
    assert "exited with code 2" in failed[0]["error"]
    assert tp.main(["--out", str(tmp_path / "out"), "--merge", str(other)]) == 0
    report = (tmp_path / "out" / tp.REPORT_MD).read_text()
    assert "| FLASH_ATTN | 100.0 |" in report and "- long-decodes RTPURBO: server:" in report
    with pytest.raises(ValueError, match="other settings .*top_p"):
        tp.main(_argv(tmp_path, fake_vllm, "--backends", "FLASH_ATTN", "--keep", "0.1"))


def test_an_interrupted_backend_is_reported_as_such(tmp_path, fake_vllm, monkeypatch):
    """A timeout's SIGTERM during the second backend: its row names the interrupt, the first backend's row
    stays, the report is written, and the interrupt still ends the run."""
    real = tp.run_one

    def run_one(settings, results, workload, backend, port):
        if backend == "RTPURBO":
            raise KeyboardInterrupt("signal 15")
        return real(settings, results, workload, backend, port)
    monkeypatch.setattr(tp, "run_one", run_one)
    monkeypatch.setattr(tp, "stop_on_sigterm", lambda: None)
    with pytest.raises(KeyboardInterrupt):
        tp.main(_argv(tmp_path, fake_vllm, "--backends", "FLASH_ATTN,RTPURBO"))
    rows = {r["backend"]: r for r in json.loads((tmp_path / "out" / tp.RESULTS_JSON).read_text())["rows"]}
    assert rows["RTPURBO"] == {"workload": "long-decodes", "backend": "RTPURBO", "error": tp.INTERRUPTED}
    assert "error" not in rows["FLASH_ATTN"]
    assert f"- long-decodes RTPURBO: {tp.INTERRUPTED}" in (tmp_path / "out" / tp.REPORT_MD).read_text()


def test_dry_run_prints_every_command(tmp_path, capsys):
    assert tp.main(["--out", str(tmp_path / "out"), "--dry-run", "--workload", "long-prompts",
                    "--backends", "FLASH_ATTN,RTPURBO-fp8"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" serve ") >= 2 and printed.count("bench serve") == 2
    assert "--kv-cache-dtype fp8" in printed and "--no-enable-prefix-caching" in printed
    assert not (tmp_path / "out").exists()
