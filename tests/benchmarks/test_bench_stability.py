"""The stability benchmark (``rtpurbo_vllm.bench.stability``) on the CPU: the prompt-length range against vLLM's own sampling code, the
commands (also through vLLM's own parsers), the identity prompts, and whole runs against the fake ``vllm``
of ``fake_vllm.py``: a passing run, failed requests, KV blocks left in use, a prompt whose batched and
one-at-a-time outputs differ, a server that does not start, and the dry run."""

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from rtpurbo_vllm.tiny import tiny_kv1_artifact_dir

from rtpurbo_vllm.bench import serving as bs
from rtpurbo_vllm.bench import stability as bst
VLLM_SAMPLING = Path(importlib.util.find_spec("vllm").origin).parent / "benchmarks" / "datasets" / "utils.py"


def _argv(tmp_path, fake_vllm, *extra):
    """A small run: 5 prompts of 1K-2K tokens, 4 identity prompts, short timeouts."""
    return ["--vllm", fake_vllm, "--out", str(tmp_path / "out"), "--num-prompts", "5", "--input-range", "1", "2",
            "--identity-prompts", "4", "--startup-timeout", "20", "--stop-timeout", "1", "--settle-timeout", "1",
            *extra]


def _settings(argv):
    return bst.Settings.from_cli(bst.build_parser().parse_args(argv))


def _results(tmp_path):
    return json.loads((tmp_path / "out" / bst.RESULTS_JSON).read_text())


def _criteria(results, phase):
    return {c["name"]: c for c in results["phases"][phase]["criteria"]}


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


# ---------------------------------------------------------------------------------------------------
# Prompt lengths: vLLM's random dataset
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def vllm_get_sampling_params(monkeypatch):
    """``get_sampling_params`` of the installed vLLM's ``benchmarks/datasets/utils.py``, loaded alone (its
    only vLLM import, a type, stubbed: importing vLLM itself takes seconds and reconfigures Triton)."""
    monkeypatch.setitem(sys.modules, "vllm.tokenizers", types.SimpleNamespace(TokenizerLike=object))
    spec = importlib.util.spec_from_file_location("vllm_benchmark_sampling", VLLM_SAMPLING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_sampling_params


class _RecordingRng:
    """Stands in for numpy's Generator: records the ``integers(low, high_exclusive)`` bounds asked for."""

    def __init__(self):
        self.calls = []

    def integers(self, low, high, size):
        self.calls.append((low, high))
        return [low] * size


class _Tokenizer:
    vocab_size = 366

    def __init__(self, num_special):
        self.num_special = num_special

    def num_special_tokens_to_add(self):
        return self.num_special


@pytest.mark.parametrize("low, high", [(4096, 131072), (1024, 4096), (4096, 262144), (8192, 131072), (2048, 2048)])
@pytest.mark.parametrize("num_special", [0, 1])
def test_random_length_args_give_exactly_the_range(low, high, num_special, vllm_get_sampling_params):
    input_len, ratio = bst.random_length_args(low, high, num_special)
    assert input_len == (low + high) // 2 + num_special
    assert bst.sampled_input_range(input_len, ratio, num_special) == (low, high)
    # vLLM's own code, with the ratio as the command line carries it (JSON, then float).
    rng = _RecordingRng()
    vllm_get_sampling_params(rng, 3, json.loads(json.dumps({"input": ratio, "output": 0.0})), input_len, 32,
                             _Tokenizer(num_special))
    assert rng.calls[:2] == [(low, high + 1), (32, 33)]          # integers' high is exclusive; outputs fixed
    if (low, high) == (4096, 131072):                             # the naive ratio rounds the low end to 4095
        assert ratio < (high - low) / (high + low)


def test_vllm_parses_the_range_ratio_as_json():
    """``--random-range-ratio`` takes a float or {"input": r, "output": r} (vLLM 0.26's datasets.py)."""
    source = (VLLM_SAMPLING.parent / "datasets.py").read_text()
    assert "args.random_range_ratio = _parse_range_ratio(args.random_range_ratio)" in source
    assert "return json.loads(value)" in source


def test_pool_metric_names_are_installed_vllms():
    """vllm/v1/metrics/loggers.py names them; Prometheus adds "_total" to a counter."""
    source = (VLLM_SAMPLING.parents[2] / "v1" / "metrics" / "loggers.py").read_text()
    for name in bst.POOL_METRICS:
        assert f'"{name.removesuffix("_total")}"' in source, name


def test_range_without_an_exact_ratio_is_rejected():
    with pytest.raises(ValueError, match="exactly"):
        bst.random_length_args(4096, 4099, 0)


# ---------------------------------------------------------------------------------------------------
# Settings and commands
# ---------------------------------------------------------------------------------------------------

def test_default_settings_and_commands(tmp_path):
    s = _settings(["--out", str(tmp_path / "out")])
    serving = s.serving
    assert s.phases == ("load", "identity") and s.input_range == (4096, 131072)
    assert (serving.shape, serving.kv_layout, serving.kv_heads_per_layer) == ("llama3.2-1b", "compact", 1)
    assert serving.prefix_caching and serving.num_prompts == 200 and serving.max_concurrency == (16,)
    assert serving.output_len == 32 and serving.num_warmups == 0 and serving.max_num_batched_tokens == 8192
    assert serving.engine_args == ("--no-async-scheduling",)
    assert serving.max_model_len >= 131072 + 1 + 32                     # longest prompt, BOS, output
    assert serving.model_dir == serving.out / "llama3.2-1b-dummy"
    config = bs.shape_config(serving)
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (2048, 16, 64)
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 8
    plan = bst.load_run(s, 8123)
    argv = plan.run.argv
    assert (_value(argv, "--random-input-len"), _value(argv, "--num-prompts")) == ("67585", "200")
    assert json.loads(_value(argv, "--random-range-ratio")) == {"input": plan.range_ratio, "output": 0.0}
    assert "--save-detailed" in argv and "--ignore-eos" in argv and _value(argv, "--request-rate") == "inf"
    assert plan.expected_prefill_tokens == 200 * 67585
    server = bs.serve_command(serving, "RTPURBO", 8123)
    assert "--enable-prefix-caching" in server and "--no-enable-prefix-caching" not in server
    identity = bst.identity_serve_command(s, 8123)
    assert _value(identity, "serve").endswith("rtpurbo_vllm/tiny/model")
    assert json.loads(_value(identity, "--additional-config")) == {
        "rtpurbo": {"artifact": str(tiny_kv1_artifact_dir()), "kv_layout": "compact"}}
    assert _value(identity, "--max-model-len") == "4096" and "--no-enable-prefix-caching" in identity
    assert "--load-format" not in identity                                # trained weights


def test_identity_prompts_are_mixed_and_deterministic(tmp_path):
    s = _settings(["--out", str(tmp_path), "--identity-prompts", "24"])
    prompts = bst.identity_prompts(s)
    lengths = [len(p.ids) for p in prompts]
    assert len(prompts) == 24 and all(300 <= n <= 3900 for n in lengths) and max(lengths) - min(lengths) > 2000
    assert [p.ids for p in bst.identity_prompts(s)] == [p.ids for p in prompts]
    assert [p.ids for p in bst.identity_prompts(_settings(["--out", str(tmp_path), "--seed", "1"]))] != \
        [p.ids for p in prompts]


@pytest.mark.parametrize("bad, message", [
    (["--input-range", "8", "4"], "--input-range"), (["--identity-lengths", "10", "100"], "--identity-lengths"),
    (["--identity-lengths", "300", "4090"], "MAX \\+ --identity-max-tokens"),
    (["--identity-memory", "0"], "--identity-memory"), (["--kv-heads-per-layer", "0"], "--kv-heads-per-layer"),
])
def test_bad_settings_are_rejected(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        _settings(["--out", str(tmp_path), *bad])


def test_commands_parse_with_vllms_own_cli(tmp_path, parse_with_vllm):
    s = _settings(["--out", str(tmp_path / "out")])
    prefix = len(s.serving.vllm)
    plan = bst.load_run(s, 8011)
    commands = [argv[prefix:] for argv in (bs.serve_command(s.serving, "RTPURBO", 8011), plan.run.argv,
                                           bst.identity_serve_command(s, 8011))]
    keys = ["model_tag", "attention_backend", "enable_prefix_caching", "async_scheduling", "max_model_len",
            "max_num_batched_tokens", "additional_config", "random_input_len", "random_range_ratio",
            "random_output_len", "num_prompts", "max_concurrency", "save_detailed", "load_format"]
    load, client, identity = parse_with_vllm(commands, keys)
    assert load["enable_prefix_caching"] is True and load["async_scheduling"] is False
    assert (load["max_num_batched_tokens"], load["load_format"]) == (8192, "dummy")
    assert load["additional_config"]["rtpurbo"]["kv_layout"] == "compact"
    assert (client["random_input_len"], client["num_prompts"], client["max_concurrency"]) == (67585, 200, 16)
    assert json.loads(client["random_range_ratio"]) == {"input": plan.range_ratio, "output": 0.0}
    assert client["random_output_len"] == 32 and client["save_detailed"] is True
    assert identity["enable_prefix_caching"] is False and identity["max_model_len"] == 4096
    assert identity["attention_backend"] == "RTPURBO" and identity["load_format"] != "dummy"
    assert identity["additional_config"] == {"rtpurbo": {"artifact": str(tiny_kv1_artifact_dir()),
                                                         "kv_layout": "compact"}}


def test_dry_run_prints_the_commands(tmp_path, capsys):
    assert bst.main(["--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "lengths uniform in [4,096, 131,072] tokens" in printed
    assert "Expected prefill: 13,517,000 tokens" in printed
    assert "--random-range-ratio '{\"input\": 0.9393939393939393, \"output\": 0.0}'" in printed
    assert "llama3.2-1b-dummy" in printed and "rtpurbo_vllm/tiny/model" in printed
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Whole runs against the fake vllm
# ---------------------------------------------------------------------------------------------------

def test_full_run_passes_and_phases_merge(tmp_path, capsys, monkeypatch, fake_vllm):
    argv = _argv(tmp_path, fake_vllm)
    assert bst.main(argv) == 0
    results = _results(tmp_path)
    for phase in ("load", "identity"):
        assert all(c["passed"] for c in results["phases"][phase]["criteria"]), results["phases"][phase]["criteria"]
        assert sum(c.get("server", False) for c in results["phases"][phase]["commands"]) == 1
    load, identity = results["phases"]["load"], results["phases"]["identity"]
    assert _criteria(results, "load")["requests"]["detail"] == "5 of 5 completed, 0 failed"
    assert load["bench"]["min_input_len"] == (1024 + 2048) // 2 and load["plan"]["input_range"] == [1024, 2048]
    assert load["after"] == {"preemptions": 0.0, "kv_cache_usage": 0.0, "running": 0.0, "waiting": 0.0,
                             "prefix_cache_hits": 1234.0}
    assert load["capacity"]["kv_cache_tokens"] == 380_000 and load["artifact"]["kv_heads_per_layer"] == 1
    assert identity["comparison"]["identical"] == 4 and identity["comparison"]["differ"] == []
    out = tmp_path / "out"
    assert (out / "logs" / "server-load.log").is_file() and (out / "logs" / "server-identity.log").is_file()
    assert (out / "logs" / "stability-load.log").is_file() and (out / "llama3.2-1b-dummy" / "config.json").is_file()
    report = (out / bst.REPORT_MD).read_text()
    assert report.startswith("# Stability under load: PASSED")
    assert "| load | requests | pass | 5 of 5 completed, 0 failed |" in report
    assert "4/4 prompts identical batched and one at a time" in report and "--save-detailed" in report

    # Prompt 2's first answer (the batched pass) differs at a near-tie (top-2 margin 0.01): a pass, the
    # prompt named with the token and the margins; the load phase of the first run is kept.
    flipped = bst.identity_prompts(_settings(argv))[2].text
    monkeypatch.setenv("FAKE_FLIP_PROMPT", hashlib.sha1(flipped.encode()).hexdigest())
    assert bst.main([*argv, "--phases", "identity"]) == 0
    results = _results(tmp_path)
    assert all(c["passed"] for c in results["phases"]["load"]["criteria"])
    comparison = results["phases"]["identity"]["comparison"]
    assert comparison["identical"] == 3 and [row["index"] for row in comparison["differ"]] == [2]
    row = comparison["differ"][0]
    assert row["token"] == 3 and row["batched_margin"] == pytest.approx(0.01)
    assert row["sequential_margin"] == pytest.approx(2.4)
    identical = _criteria(results, "identity")["identical greedy outputs"]
    assert identical["passed"] and identical["detail"].startswith("each difference starts at a top-2 near-tie")
    assert "prompt 2 (" in identical["detail"] and "differs at generated token 3" in identical["detail"]

    # The same difference with a clear margin (0.5 nats) is a failure: exit 1.
    monkeypatch.setenv("FAKE_FLIP_MARGIN", "0.5")
    assert bst.main([*argv, "--phases", "identity"]) == 1
    results = _results(tmp_path)
    assert results["phases"]["identity"]["comparison"]["differ"][0]["batched_margin"] == pytest.approx(0.5)
    identical = _criteria(results, "identity")["identical greedy outputs"]
    assert not identical["passed"] and identical["detail"].startswith("3/4 prompts identical")
    assert _criteria(results, "identity")["KV blocks back in the pool"]["passed"]
    report = (tmp_path / "out" / bst.REPORT_MD).read_text()
    assert report.startswith("# Stability under load: FAILED")
    assert "| identity | identical greedy outputs | FAIL | 3/4 prompts identical" in report


def test_flash_attn_control_serves_the_tiny_model_dense(tmp_path):
    s = _settings(["--out", str(tmp_path), "--identity-backend", "FLASH_ATTN"])
    command = bst.identity_serve_command(s, 8123)
    assert _value(command, "--attention-backend") == "FLASH_ATTN" and "--additional-config" not in command
    assert bst.describe_identity(s, [300, 400]).startswith("FLASH_ATTN serving the tiny trained model (dense")
    assert _value(bst.identity_serve_command(_settings(["--out", str(tmp_path)]), 8123),
                  "--attention-backend") == "RTPURBO"


def test_failed_requests_fail_the_load_phase(tmp_path, monkeypatch, fake_vllm):
    monkeypatch.setenv("FAKE_FAILED_REQUESTS", "3")
    assert bst.main(_argv(tmp_path, fake_vllm, "--phases", "load")) == 1
    results = _results(tmp_path)
    requests = _criteria(results, "load")["requests"]
    assert not requests["passed"]
    assert requests["detail"].startswith("2 of 5 completed, 3 failed; 3x Bad Request: prompt too long")
    assert _criteria(results, "load")["KV blocks back in the pool"]["passed"]
    assert list(results["phases"]) == ["load"]
    assert "| load | requests | FAIL | 2 of 5 completed, 3 failed" in (tmp_path / "out" / bst.REPORT_MD).read_text()


def test_blocks_left_in_use_fail_the_pool_check(tmp_path, monkeypatch, fake_vllm):
    monkeypatch.setenv("FAKE_KV_USAGE", "0.25")
    assert bst.main(_argv(tmp_path, fake_vllm, "--phases", "load")) == 1
    criteria = _criteria(_results(tmp_path), "load")
    assert criteria["requests"]["passed"] and criteria["no request left"]["passed"]
    assert not criteria["KV blocks back in the pool"]["passed"]
    assert criteria["KV blocks back in the pool"]["detail"] == "vllm:kv_cache_usage_perc 0.25"


def test_server_that_does_not_start_fails_the_phase(tmp_path, monkeypatch, fake_vllm):
    monkeypatch.setenv("FAKE_SERVER_EXIT", "1")
    assert bst.main(_argv(tmp_path, fake_vllm, "--phases", "identity")) == 1
    criteria = _criteria(_results(tmp_path), "identity")
    assert "exited with code 2" in criteria["ran to the end"]["detail"]
    assert not criteria["identical greedy outputs"]["passed"]
    assert criteria["KV blocks back in the pool"]["detail"] == "no vllm:kv_cache_usage_perc"
