"""bench_engine on the CPU: configuration parsing, bad input, the report (the engines run on a GPU)."""

import importlib.util
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
