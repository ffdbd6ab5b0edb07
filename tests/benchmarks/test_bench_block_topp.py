"""benchmarks/bench_block_topp.py on the CPU: without CUDA it exits with 2; a point's launches run (Triton
under the interpreter) with the CUDA-graph timer and the profiler replaced, one row per setting, all
selecting what the binary search selects; sweeps combine settings; bad settings exit with 2."""

import pytest
import torch

from rtpurbo_vllm.bench.timing import KernelRun


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
    monkeypatch.setattr(bench, "profile_cuda_graph", lambda fn, repeats: [
        KernelRun(name, 10.0 * i + k, 10.0 * i + k + 1.0 + k) for i in range(repeats)
        for k, name in enumerate(("_block_stats_kernel", "_select_kernel"))])
    default = dict(bench.topp_kernel.CONFIG)
    length = 5 * bench.BS + 17
    settings = [{"search_bits": 1}, {"search_bits": 4}, {"search_bits": 2, "select_chunk": 4},
                {"stats_blocks_per_prog": 2}]   # chunk 4: the 6-block rows re-read
    rows = bench.bench_point(2, length, settings, keep=0.25, device=torch.device("cpu"), repeats=3)
    assert [r["settings"] for r in rows] == settings
    assert all(r["same_as_reference"] and r["ms"] == 0.25 and r["blocks"] == 6 for r in rows)
    assert all(r["kernel_us"] == {"stats": 1.0, "select": 2.0} for r in rows)
    assert 0.0 < rows[0]["kept_block_share"] < 1.0
    assert bench.topp_kernel.CONFIG == default


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_point_of_several_layers_times_one(bench, monkeypatch):
    """--layers: each timed graph runs every layer's block top-p over its own index keys; times per layer."""
    monkeypatch.setattr(bench, "time_cuda_graph", lambda fn, repeats: (fn(), 0.75)[1])
    monkeypatch.setattr(bench, "profile_cuda_graph", lambda fn, repeats: [
        KernelRun(name, 20.0 * i + 3 * k, 20.0 * i + 3 * k + 1.5) for i in range(repeats)
        for k, name in enumerate(("_block_stats_kernel", "_select_kernel") * 3)])
    indexes, topp = [], bench.block_topp
    monkeypatch.setattr(bench, "block_topp", lambda q_idx, index, *args: (indexes.append(index.base),
                                                                          topp(q_idx, index, *args))[1])
    rows = bench.bench_point(1, 3 * bench.BS + 5, [{"search_bits": 1}, {"search_bits": 2}], keep=0.25,
                             device=torch.device("cpu"), repeats=2, layers=3)
    assert all(r["layers"] == 3 and r["ms"] == 0.25 and r["same_as_reference"] for r in rows)
    assert all(r["kernel_us"] == {"stats": 1.5, "select": 1.5} for r in rows)
    assert len({i.data_ptr() for i in indexes}) == 3 and len(indexes) % 3 == 0


@pytest.mark.parametrize("text, message", [("0", "0: a timed graph needs at least one layer"),
                                           ("two", "'two' is not a whole number of layers")])
def test_layers_below_one_exit_2(bench, capsys, text, message):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--layers", text])
    assert exit_.value.code == 2
    assert f"error: argument --layers: {message}" in capsys.readouterr().err


def test_sweeps_combine_after_the_reference(bench):
    assert bench.parse_sweep(["select_warps=0,16"]) == {"select_warps": [0, 16]}   # 0: the launcher's choice
    sweep = bench.parse_sweep(["search_bits=1,3", "stats_blocks_per_prog=2,4"])
    assert sweep == {"search_bits": [1, 3], "stats_blocks_per_prog": [2, 4]}
    default_blocks = bench.topp_kernel.CONFIG["stats_blocks_per_prog"]
    settings = bench.sweep_settings(sweep)
    assert settings[0] == {"search_bits": 1}
    expected = [{"search_bits": b, "stats_blocks_per_prog": n} for b in (1, 3) for n in (2, 4)
                if (b, n) != (1, default_blocks)]
    assert settings[1:] == expected


@pytest.mark.parametrize("flags, message", [
    (["--sweep", "select_chunk=3000"], "search_bits takes 1..8, select_warps 0 or a power of two, "
                                        "the other settings powers of two"),
    (["--sweep", "select_warps=0,12"], "select_warps 0 or a power of two"),
    (["--sweep", "select_chunk=0"], "the other settings powers of two"),
    (["--sweep", "search_bits=9"], "search_bits takes 1..8"),
    (["--sweep", "stats_blocks_per_prog=3"], "the other settings powers of two"),
    (["--sweep", "search_bits=x"], "search_bits takes 1..8"),
    (["--sweep", "serch_bits=3"], "expected KEY=V1,V2,... with KEY one of"),
])
def test_bad_settings_exit_2(bench, capsys, flags, message):
    assert bench.main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sweep") and message in err
