"""bench_engine on the CPU: configuration parsing, bad input, the report (the engines run on a GPU)."""

import importlib.util
import json
import pathlib

import pytest

_path = pathlib.Path(__file__).parents[2] / "benchmarks" / "bench_engine.py"
bench = importlib.util.module_from_spec(importlib.util.spec_from_file_location("bench_engine", _path))
bench.__spec__.loader.exec_module(bench)


def test_configurations():
    assert bench.parse_config("FLASH_ATTN:fp8") == {"name": "FLASH_ATTN:fp8", "backend": "FLASH_ATTN",
                                                     "kv_dtype": "fp8", "selection": None, "layout": None}
    cfg = bench.parse_config("RTPURBO:auto:n1:full")
    assert (cfg["selection"], cfg["layout"]) == ("n1", "full")
    assert bench.parse_config("RTPURBO:auto")["selection"] == "global15"
    for bad in ("TRITON_ATTN:auto", "RTPURBO:int8", "RTPURBO:auto:top9", "RTPURBO:auto:n1:split"):
        with pytest.raises(ValueError, match="bad configuration"):
            bench.parse_config(bad)


def test_bad_configuration_exits_2_without_writing(tmp_path, capsys):
    assert bench.main(["capacity", "--out", str(tmp_path / "out"), "--configs", "RTPURBO:auto:top9"]) == 2
    assert "error: bad configuration" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_model_folder_and_report(tmp_path):
    path = bench.model_dir(tmp_path, 4096, "kvgroup15")
    assert (path / "config.json").exists() and (path / "rtpurbo-kvgroup15" / "rtpurbo_config.json").exists()
    rows = [{"phase": "capacity", "name": "RTPURBO:auto:kvgroup15", "vllm_kv_tokens": 10, "held_sequences": 3.5},
            {"phase": "step", "name": "FLASH_ATTN:fp8", "decode_step_ms": {"1": 8.1, "4": 16.4}}]
    text = bench.render({"rows": rows})
    assert "| capacity | RTPURBO:auto:kvgroup15 | 10 |  | 3.5 |" in text and "b1: 8.1, b4: 16.4" in text


def test_rows_merge_into_a_new_out_folder_with_the_environment(tmp_path, monkeypatch):
    """The parent side: ``--out`` is created, each configuration's row (from its child process, stubbed
    here) merges into the JSON beside where it ran (card, versions, VLLM_* settings)."""
    monkeypatch.setattr(bench, "run_child", lambda name, args: {"name": name, "decode_step_ms": {"1": 1.0}})
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "0")
    out = tmp_path / "new" / "engine"
    for configs in (["FLASH_ATTN:auto", "RTPURBO:auto"], ["FLASH_ATTN:auto"]):
        assert bench.main(["step", "--out", str(out), "--configs", *configs]) == 0
    results = json.loads((out / "bench_engine.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["RTPURBO:auto", "FLASH_ATTN:auto"]
    assert results["environment"]["env"]["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert (out / "bench_engine.md").exists()
