"""benchmarks/bench_block_topp.py on the CPU: without CUDA it exits with 2; a point's launches run (Triton
under the interpreter) with the CUDA-graph timer replaced, one row per (search width, register chunk),
all selecting what the binary search selects; bad settings exit with 2."""

import pytest
import torch


@pytest.fixture
def bench(load_benchmark):
    return load_benchmark("bench_block_topp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_without_cuda_exits_2(bench, capsys):
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_point_rows(bench, monkeypatch):
    monkeypatch.setattr(bench, "time_cuda_graph", lambda fn, repeats: (fn(), 0.25)[1])
    default = dict(bench.topp_kernel.CONFIG)
    length = 5 * bench.BS + 17
    settings = [(1, 4096), (4, 4096), (2, 4)]      # chunk 4: the 6-block rows take the re-read path
    rows = bench.bench_point(2, length, settings, keep=0.25, device=torch.device("cpu"), repeats=1)
    assert [(r["search_bits"], r["select_chunk"]) for r in rows] == settings
    assert all(r["same_as_binary"] and r["ms"] == 0.25 and r["blocks"] == 6 for r in rows)
    assert 0.0 < rows[0]["kept_block_share"] < 1.0
    assert bench.topp_kernel.CONFIG == default


@pytest.mark.parametrize("flags", [["--chunks", "3000"], ["--bits", "9"]])
def test_bad_settings_exit_2(bench, capsys, flags):
    assert bench.main(flags) == 2
    assert "--chunks must be powers of two and --bits in 1..8" in capsys.readouterr().err
