"""bench_engine on the CPU: configuration parsing, bad input, the report (the engines run on a GPU)."""

import json

import pytest


@pytest.fixture
def bench(load_benchmark):
    return load_benchmark("bench_engine")


def test_configurations(bench):
    assert bench.parse_config("FLASH_ATTN:fp8") == {"name": "FLASH_ATTN:fp8", "backend": "FLASH_ATTN",
                                                     "kv_dtype": "fp8", "selection": None, "layout": None,
                                                     "index_key_dtype": None}
    cfg = bench.parse_config("RTPURBO:auto:n1:full")
    assert (cfg["selection"], cfg["layout"], cfg["index_key_dtype"]) == ("n1", "full", "auto")
    assert bench.parse_config("RTPURBO:auto")["name"] == "RTPURBO:auto:global15:compact"
    assert bench.parse_config("RTPURBO:fp8:n1:compact:auto")["name"] == "RTPURBO:fp8:n1:compact"
    cfg = bench.parse_config("RTPURBO:fp8:n1:compact:fp8_e4m3")
    assert (cfg["name"], cfg["index_key_dtype"]) == ("RTPURBO:fp8:n1:compact:fp8_e4m3", "fp8_e4m3")
    for bad in ("TRITON_ATTN:auto", "RTPURBO:int8", "RTPURBO:auto:top9", "RTPURBO:auto:n1:split",
                "RTPURBO:auto:n1:compact:fp8"):
        with pytest.raises(ValueError, match="bad configuration"):
            bench.parse_config(bad)


def test_bad_configuration_exits_2_without_writing(bench, tmp_path, capsys):
    assert bench.main(["capacity", "--out", str(tmp_path / "out"), "--configs", "RTPURBO:auto:top9"]) == 2
    assert "error: bad configuration" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--repeats", "--steps", "--batch", "--max-seqs", "--load-tokens", "--stable-steps"])
def test_counts_below_one_exit_2(bench, tmp_path, capsys, flag):
    assert bench.main(["step", "--out", str(tmp_path / "out"), "--configs", "FLASH_ATTN:auto", flag, "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--keep", "--prefill-top-p"])
@pytest.mark.parametrize("share", ["0", "1.5"])
def test_shares_outside_zero_one_exit_2(bench, tmp_path, capsys, flag, share):
    assert bench.main(["step", "--out", str(tmp_path / "out"), "--configs", "RTPURBO:auto", flag, share]) == 2
    assert f"{flag} must be in (0, 1]" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_step_engines_run_as_vllm_runs_them(bench, tmp_path, monkeypatch):
    """``step`` children keep vLLM's separate engine-core process (its scheduler overlaps the GPU);
    ``capacity`` children run the engine in-process to read its block count."""
    seen, real_run = {}, bench.subprocess.run

    def fake_run(argv, **kwargs):
        if "--one" not in argv:                  # e.g. git, for the environment
            return real_run(argv, **kwargs)
        seen[argv[argv.index("--one") - 1]] = (kwargs["env"].get("VLLM_ENABLE_V1_MULTIPROCESSING"), argv)
        kwargs["stdout"].write('ROW {"name": "x"}\n')
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "parse_kv_capacity", lambda text: {"kv_cache_tokens": 1, "max_concurrency": 1.0})
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    for phase in ("step", "capacity"):
        assert bench.main([phase, "--out", str(tmp_path), "--configs", "FLASH_ATTN:auto", "--repeats", "5"]) == 0
    assert seen["step"][0] is None and seen["capacity"][0] == "0"
    assert seen["step"][1][seen["step"][1].index("--repeats") + 1] == "5" and "--profile" not in seen["step"][1]
    assert seen["step"][1][seen["step"][1].index("--prefill-top-p") + 1] == "0.03"
    assert bench.main(["step", "--out", str(tmp_path), "--configs", "FLASH_ATTN:auto", "--profile"]) == 0
    assert seen["step"][0] == "0" and "--profile" in seen["step"][1]      # the profiler sees the engine


def test_held_sequences_plan_the_layout_from_the_engines_block_size(bench, tmp_path, monkeypatch):
    """After start-up vLLM's ``cache_config.block_size`` is its smallest KV-cache group's (48 for this
    compact layout), not the 16 the layout was planned from: the held sequences come from the layout of
    :data:`BLOCK_SIZE`, vLLM's pool bytes over what one decoding sequence holds."""
    from types import SimpleNamespace

    import torch

    from rtpurbo_vllm.artifacts import load_artifact
    from rtpurbo_vllm.attention import serving_config
    from rtpurbo_vllm.kv_cache import KVLayout

    artifact = load_artifact(bench.model_dir(tmp_path, 131072, "global15", 0.03, 0.03) / "rtpurbo-global15")
    monkeypatch.setattr(serving_config, "serving_artifact", lambda vllm_config: artifact)
    cache = SimpleNamespace(num_gpu_blocks=28873, block_size=48)
    llm = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache)))
    cfg = {"backend": "RTPURBO", "kv_dtype": "fp8", "layout": "compact", "index_key_dtype": "auto"}
    layout = KVLayout.from_artifact(artifact, name="compact", kv_dtype=torch.uint8, index_dtype=torch.uint8,
                                    block_unit=16)
    assert min(layout.blocks.block_sizes) == 48
    held = bench.held_sequences(llm, cfg, 131072)
    assert held == pytest.approx(28873 * layout.bytes_per_block / layout.bytes_per_sequence(131072))
    assert 11 < held < 13                                     # 1.78x FLASH_ATTN's 6.78 sequences
    assert bench.held_sequences(llm, {"backend": "FLASH_ATTN"}, 131072) == 28873 * 16 / 131072


def test_profiled_steps_report(bench):
    table = {"wall_ms": 10.0, "gpu_ms": 0.032, "kernels": [{"name": "gemm_big_kernel", "ms": 0.02, "launches": 4.0},
                                                           {"name": "attention", "ms": 0.01, "launches": 2.0}]}
    text = bench.render({"rows": [{"phase": "step", "name": "RTPURBO:auto", "decode_step_ms": {"1": 9.0},
                                   "profile": {"1": table}}]})
    assert "| RTPURBO:auto | 1 | 10.0 | 0.032 | gemm_big_kernel 0.02; attention 0.01 |" in text


def test_model_folder_and_report(bench, tmp_path):
    path = bench.model_dir(tmp_path, 4096, "kvgroup15", 0.03, 0.05)
    assert (path / "config.json").exists() and (path / "rtpurbo-kvgroup15" / "rtpurbo_config.json").exists()
    config = json.loads((path / "rtpurbo-kvgroup15" / "rtpurbo_config.json").read_text())
    assert config["params"]["top_p"] == 0.03          # about 3 % of the blocks on flat (dummy-weight) scores
    assert config["params"]["prefill_top_p"] == 0.05
    rows = [{"phase": "capacity", "name": "RTPURBO:auto:kvgroup15", "vllm_kv_tokens": 10, "held_sequences": 3.5},
            {"phase": "step", "name": "FLASH_ATTN:fp8", "decode_step_ms": {"1": 8.1, "4": 16.4},
             "decode_step_range_ms": {"1": [8.0, 8.3], "4": [16.2, 16.9]}}]
    text = bench.render({"rows": rows})
    assert "| capacity | RTPURBO:auto:kvgroup15 | 10 |  | 3.5 |" in text
    assert "b1: 8.1 (8.0 - 8.3), b4: 16.4 (16.2 - 16.9)" in text


def test_rows_merge_into_a_new_out_folder_with_the_environment(bench, tmp_path, monkeypatch):
    """The parent side: ``--out`` is created, each configuration's row (from its child process, stubbed
    here) merges into the JSON beside where it ran (card, versions, VLLM_* settings)."""
    monkeypatch.setattr(bench, "run_child", lambda name, args: {"name": name, "decode_step_ms": {"1": 1.0}})
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "0")
    out = tmp_path / "new" / "engine"
    for configs in (["FLASH_ATTN:auto", "RTPURBO:auto"], ["FLASH_ATTN:auto"]):
        assert bench.main(["step", "--out", str(out), "--configs", *configs]) == 0
    results = json.loads((out / "bench_engine.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["RTPURBO:auto:global15:compact", "FLASH_ATTN:auto"]
    assert [i["argv"][-1] for i in results["invocations"]] == ["RTPURBO:auto", "FLASH_ATTN:auto"]
    assert results["environment"]["env"]["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert (out / "bench_engine.md").exists()


class FakeRequest:
    def __init__(self, prompt_tokens):
        self.num_prompt_tokens, self.num_computed_tokens, self.num_preemptions = prompt_tokens, 0, 0


class FakeEngine:
    """A scheduler that admits a request while ``capacity`` allows and prefills ``chunk`` tokens a step."""

    def __init__(self, capacity: int, chunk: int):
        self.capacity, self.chunk = capacity, chunk
        self.requests, self.running, self.waiting = {}, [], []

    def add_request(self, request_id, prompt, params):
        self.requests[request_id] = FakeRequest(prompt)
        self.waiting.append(self.requests[request_id])

    def step(self):
        while self.waiting and len(self.running) < self.capacity:
            self.running.append(self.waiting.pop(0))
        budget = self.chunk
        for r in self.running:
            take = min(budget, r.num_prompt_tokens - r.num_computed_tokens)
            r.num_computed_tokens += take
            budget -= take


@pytest.mark.parametrize("capacity, sent, held, all_admitted", [(3, 6, 3, False), (8, 6, 6, True)])
def test_load_fills_the_pool_until_it_settles(bench, capacity, sent, held, all_admitted):
    fake = FakeEngine(capacity, chunk=100)
    result = bench.fill_until_full(fake, fake, [250] * sent, params=None, stable_steps=4, time_limit=60)
    assert result["held_requests"] == held and result["all_admitted"] is all_admitted
    assert result["num_requests"] == sent and result["preemptions"] == 0 and not result["timed_out"]
    assert all(r.num_computed_tokens == 250 for r in fake.running)         # it stopped after the prefills
    assert bench.load_requests(6.8, 64) == 11 and bench.load_requests(60.0, 64) == 64


def test_load_stops_at_its_time_limit(bench):
    fake = FakeEngine(2, chunk=1)                    # the prefills would take 500 steps
    result = bench.fill_until_full(fake, fake, [250, 250, 250], params=None, stable_steps=4, time_limit=0.0)
    assert result["timed_out"] and result["steps"] == 1


def test_load_report(bench):
    rows = [{"phase": "load", "name": "RTPURBO:auto:n1", "held_sequences": 31.5, "held_requests": 30,
             "num_requests": 40, "all_admitted": False, "preemptions": 0, "timed_out": False},
            {"phase": "load", "name": "FLASH_ATTN:auto", "held_sequences": 6.8, "held_requests": 11,
             "num_requests": 11, "all_admitted": True, "preemptions": 2, "timed_out": True}]
    text = bench.render({"rows": rows})
    assert "| load | RTPURBO:auto:n1 |  |  | 31.5 | 30 of 40, 0 preemptions |  |" in text
    assert "| load | FLASH_ATTN:auto |  |  | 6.8 | >= 11 of 11, 2 preemptions, timed out |  |" in text


def test_load_tokens_past_the_engines_room_exit_2(bench, tmp_path, capsys):
    assert bench.main(["load", "--out", str(tmp_path / "out"), "--configs", "FLASH_ATTN:auto",
                       "--load-tokens", "4096"]) == 2
    assert "--load-tokens must be <= 2048" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_replay_rows_on_the_cpu(bench, tmp_path):
    """``replay`` runs in this process, no engine: vLLM's scheduler over the pool a GPU run would size."""
    out = tmp_path / "replay"
    assert bench.main(["replay", "--out", str(out), "--configs", "FLASH_ATTN:auto", "RTPURBO:auto:n1",
                       "--context", "4096", "--kv-memory-gib", "5"]) == 0
    rows = json.loads((out / "bench_engine.json").read_text())["rows"]
    assert [(r["phase"], r["name"]) for r in rows] == [("replay", "FLASH_ATTN:auto"), ("replay", "RTPURBO:auto:n1:compact")]
    assert all(r["held_requests"] >= 1 and r["preemptions"] == 0 and r["vllm_kv_tokens"] > 0 for r in rows)
    assert "| replay | FLASH_ATTN:auto | 40960 | 6.67 |" in (out / "bench_engine.md").read_text()


def test_requests_generate_a_fixed_length_without_detokenising(bench):
    """vLLM's detokenizer decodes a request's whole prompt at its first output token, host time that grows
    with the context: timed runs skip detokenisation."""
    params = bench.fixed_length_params(257)
    assert (params.max_tokens, params.min_tokens, params.ignore_eos, params.temperature) == (257, 257, True, 0)
    assert params.detokenize is False


class FakeLLM:
    """``vllm.LLM`` as ``step`` uses it: a 10-block pool; records each ``generate`` call's prompts
    (token-id tuples) and ``max_tokens``."""

    llm_engine = type("Engine", (), {"vllm_config": type("Config", (), {
        "cache_config": type("Cache", (), {"num_gpu_blocks": 10})()})()})()

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm):
        self.calls.append((tuple(tuple(p["prompt_token_ids"]) for p in prompts), params.max_tokens))


def run_step(bench, monkeypatch, capsys, out, held, argv) -> tuple[dict, list]:
    """Runs one ``step`` child on :class:`FakeLLM` with ``held_sequences`` -> ``held(context)``; returns its
    row and the ``generate`` calls."""
    llm = FakeLLM()
    monkeypatch.setattr(bench, "model_dir", lambda *args: out)
    monkeypatch.setattr(bench, "engine", lambda *args: llm)
    monkeypatch.setattr(bench, "held_sequences", lambda llm, cfg, context: held(context))
    assert bench.main(["step", "--out", str(out), "--context", "8", *argv]) == 0
    return json.loads(capsys.readouterr().out.split("ROW ", 1)[1]), llm.calls


def test_step_batches_share_their_prompts(bench, tmp_path, monkeypatch, capsys):
    """``step``: each batch generates the first B of one set of prompts, so the prefix cache holds the
    largest batch's prompts (every batch's own prompts would not stay cached where the pool fits only
    the largest batch); per batch one prefill, then ``--repeats`` pairs of runs."""
    row, calls = run_step(bench, monkeypatch, capsys, tmp_path, lambda context: 4.5,
                          ["--one", "FLASH_ATTN:auto", "--batch", "1", "4", "--repeats", "2", "--steps", "3"])
    assert set(row["decode_step_ms"]) == {"1", "4"} and row["batches_over_pool"] == []
    assert [len(p) for p, _ in calls] == [1] * 5 + [4] * 5
    assert [n for _, n in calls[:5]] == [1, 4, 1, 4, 1]
    first, largest = calls[0][0], calls[5][0]
    assert first == largest[:1] and len(set(largest)) == 4 and all(len(t) == 8 for t in largest)


def test_step_reports_batches_over_the_pool_untimed(bench, tmp_path, monkeypatch, capsys):
    """A batch whose sequences (prompt + 1 + steps tokens) do not all fit in the pool would be preempted
    and prefill again inside the timed runs: it is listed, not timed, and the report says so."""
    held_at = []
    row, calls = run_step(bench, monkeypatch, capsys, tmp_path, lambda context: held_at.append(context) or 3.26,
                          ["--one", "RTPURBO:auto:global15:full", "--batch", "1", "4", "--repeats", "1", "--steps", "3"])
    assert held_at == [8, 12] and [n for _, n in calls] == [1, 4, 1]     # batch 1 only: its prefill, one pair
    assert set(row["decode_step_ms"]) == {"1"} and row["batches_over_pool"] == [4]
    text = bench.render({"rows": [{"phase": "step", **row}]})
    assert "b1: " in text and "b4: over the pool" in text
