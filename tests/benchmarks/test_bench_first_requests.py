"""``benchmarks/bench_first_requests.py``: commands (parsed by vLLM's own CLI), settings, and a whole run
against the fake ``vllm`` (no GPU)."""

import json
import shlex

import pytest

from rtpurbo_vllm.bench import first_requests as fr
from rtpurbo_vllm.bench.server import INTERRUPTED


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_commands_parse_with_vllms_own_cli(tmp_path, parse_with_vllm):
    args = fr.build_parser().parse_args(["--out", str(tmp_path), "--engine-args=--enforce-eager"])
    prefix = len(shlex.split(args.vllm))
    commands = [fr.serve_command(args, backend, 8000)[prefix:] for backend in fr.BACKENDS]
    keys = ["model_tag", "attention_backend", "enable_prefix_caching", "max_model_len", "enforce_eager"]
    rtpurbo, flash = parse_with_vllm(commands, keys)
    assert rtpurbo["attention_backend"] == "RTPURBO" and flash["attention_backend"] == "FLASH_ATTN"
    assert rtpurbo["model_tag"].endswith("rtpurbo_vllm/tiny/model") and rtpurbo["max_model_len"] == 4096
    assert rtpurbo["enable_prefix_caching"] is False and rtpurbo["enforce_eager"] is True


def test_rounds_send_new_deterministic_short_prompts(tmp_path):
    args = fr.build_parser().parse_args(["--out", str(tmp_path), "--prompts", "5"])
    first, again, second = fr.round_bodies(args, 0), fr.round_bodies(args, 0), fr.round_bodies(args, 1)
    assert first == again and len(first) == 5
    assert not {b["prompt"] for b in first} & {b["prompt"] for b in second}
    assert all(b["max_tokens"] == 16 and b["temperature"] == 0.0 and b["model"] == fr.SERVED_NAME for b in first)


@pytest.mark.parametrize("bad, message", [(["--rounds", "1"], "--rounds"), (["--lengths", "10", "20"], "--lengths"),
                                          (["--max-first-ratio", "0.5"], "--max-first-ratio")])
def test_bad_settings_are_rejected(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        fr.main(["--out", str(tmp_path), "--dry-run", *bad])


def test_dry_run_prints_the_commands(tmp_path, capsys):
    assert fr.main(["--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "--attention-backend RTPURBO" in printed and "--attention-backend FLASH_ATTN" in printed
    assert "3 rounds of 120 prompts" in printed and not (tmp_path / "out").exists()


def test_full_run_with_the_fake_vllm(tmp_path, fake_vllm):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--vllm", fake_vllm, "--prompts", "4", "--rounds", "3", "--lengths", "64", "80",
            "--max-first-ratio", "1000", "--startup-timeout", "60"]
    assert fr.main(argv) == 0
    results = json.loads((out / fr.RESULTS_JSON).read_text())
    assert set(results["backends"]) == set(fr.BACKENDS)
    for backend, row in results["backends"].items():
        assert len(row["rounds_s"]) == 3 and row["first_s"] == row["rounds_s"][0] and row["warmup_s"] == []
        assert row["steady_s"] > 0 and row["startup_s"] >= 0 and (out / "triton_cache" / backend).is_dir()
        assert row["compiled_at_startup"] == 0 and row["compiled_after_startup"] == []
        assert row["round_phases"] == [{"queue_s": 0.001, "prefill_s": 0.002, "decode_s": 0.003,
                                        "first_token_s": 0.004, "end_to_end_s": 0.008}] * 3
    assert all(c["passed"] for c in results["criteria"]) and len(results["criteria"]) == 2
    report = (out / fr.REPORT_MD).read_text()
    assert "First requests against steady state: PASSED" in report and "- RTPURBO: 1/2/3/4/8, 1/2/3/4/8, 1/2/3/4/8" in report
    # A backend run again replaces its own entry only.
    assert fr.main([*argv, "--backends", "FLASH_ATTN", "--rounds", "2"]) == 0
    results = json.loads((out / fr.RESULTS_JSON).read_text())
    rounds = {backend: len(row["rounds_s"]) for backend, row in results["backends"].items()}
    assert rounds == {"FLASH_ATTN": 2, "RTPURBO": 3}


def test_an_interrupted_run_is_reported_as_such(tmp_path, monkeypatch):
    """A timeout's SIGTERM during a server's start-up: the report names the interrupted backend, the
    backends already measured stay in it, and the interrupt still ends the run."""
    def run_backend(args, backend, port, out):
        if backend == "RTPURBO":
            raise KeyboardInterrupt("signal 15")
        return {"error": "RuntimeError: measured elsewhere"}
    monkeypatch.setattr(fr, "run_backend", run_backend)
    monkeypatch.setattr(fr, "stop_on_sigterm", lambda: None)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        fr.main(["--out", str(out), "--backends", "FLASH_ATTN", "RTPURBO"])
    results = json.loads((out / fr.RESULTS_JSON).read_text())
    assert results["backends"]["RTPURBO"] == {"error": INTERRUPTED} and "FLASH_ATTN" in results["backends"]
    assert f"| RTPURBO | error: {INTERRUPTED} |" in (out / fr.REPORT_MD).read_text()


def test_compiled_kernels_are_read_from_the_triton_cache(tmp_path):
    for name in ("abc/_kv_write_kernel", "abc/__grp___kv_write_kernel", "def/_split_kernel"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / f"{name}.json").write_text("{}")
    (tmp_path / "def" / "_split_kernel.cubin").write_bytes(b"")
    assert fr.compiled_kernels(tmp_path) == {"abc/_kv_write_kernel", "def/_split_kernel"}
    assert fr.compiled_kernels(None) == set()


def test_a_slow_first_round_fails(tmp_path):
    results = {"backends": {"RTPURBO": {"first_s": 3.9, "steady_s": 0.9, "first_over_steady": 4.333, "startup_s": 60,
                                        "warmup_s": [12.5], "rounds_s": [3.9, 0.9, 0.9]}}}
    (row,) = fr.criteria(results, 1.5)
    assert not row["passed"] and "round 1 3.90 s, steady 0.90 s (4.333x)" in row["detail"] and "[12.5]" in row["detail"]
