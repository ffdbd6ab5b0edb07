"""benchmarks/bench_attention.py on the CPU: the decode benchmark's launches run (Triton under the
interpreter) and fill the row, with FA3 and the CUDA-graph timer replaced (neither exists on a CPU)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_attention(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))          # its `from timing import ...`
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "bench_attention.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_attention", module)
    spec.loader.exec_module(module)
    calls = []

    def run_once(fn, repeats):          # stands in for time_cuda_graph: one eager call, a fixed "time"
        calls.append(fn)
        fn()
        return 2.0 if len(calls) == 1 else 0.5

    monkeypatch.setattr(module, "time_cuda_graph", run_once)
    monkeypatch.setattr(module, "fa3", lambda *args, **kwargs: None)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_decode_row_has_the_step_and_its_parts(bench_attention):
    length = 3 * bench_attention.BS + 17                              # a partial last block
    row = bench_attention.bench_decode(2, length, keep=0.25, device=torch.device("cpu"), repeats=1)
    assert row["phase"] == "decode" and row["batch"] == 2 and row["context"] == length
    assert row["fa3_ms"] == 2.0 and row["rtpurbo_ms"] == 0.5 and row["speedup"] == 4.0
    assert list(row["rtpurbo_parts_ms"]) == ["index_query", "block_topp", "sparse_decode"]
    assert all(t == 0.5 for t in row["rtpurbo_parts_ms"].values())
    assert 0.0 < row["kept_block_share"] <= 1.0                       # block top-p really ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_decode_sized_for_a_longer_max_model_len(bench_attention):
    """--max-model-len sizes block top-p as a server would; the kept share stays per real block."""
    length = 2 * bench_attention.BS + 5
    row = bench_attention.bench_decode(1, length, keep=0.5, device=torch.device("cpu"), repeats=1,
                                       max_model_len=40 * bench_attention.BS)
    short = bench_attention.bench_decode(1, length, keep=0.5, device=torch.device("cpu"), repeats=1)
    assert row["max_model_len"] == 40 * bench_attention.BS and short["max_model_len"] == length
    assert row["kept_block_share"] == short["kept_block_share"] and 0.0 < row["kept_block_share"] <= 1.0
