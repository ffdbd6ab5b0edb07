"""benchmarks/bench_attention.py on the CPU: the decode benchmark's launches run (Triton under the
interpreter) and fill the row, with FA3, the CUDA-graph timer and the profiler replaced (none exists on a CPU);
the decode step's byte and bandwidth accounting."""

import sys

import pytest
import torch

from rtpurbo_vllm.bench.timing import KernelRun


@pytest.fixture
def bench_attention(monkeypatch, load_benchmark):
    module = load_benchmark("bench_attention")
    calls = []

    def run_once(fn, repeats):          # stands in for time_cuda_graph: one eager call, a fixed "time"
        calls.append(fn)
        fn()
        return 2.0 if len(calls) == 1 else 0.5

    monkeypatch.setattr(module, "time_cuda_graph", run_once)

    def profile_once(fn, repeats):     # stands in for the profiler: one eager call, two kernels per replay
        fn()
        return [KernelRun(name, 50.0 * i + 3.0 * k, 50.0 * i + 3.0 * k + 2.0) for i in range(repeats)
                for k, name in enumerate(("_split_kernel", "_combine_kernel"))]

    monkeypatch.setattr(module, "profile_cuda_graph", profile_once)
    monkeypatch.setattr(module, "fa3", lambda *args, **kwargs: None)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_decode_row_has_the_step_and_its_kernels(bench_attention, monkeypatch):
    """The dense FA3 step, RTPURBO's step with its kernels, and FA3 over the local heads' window alone
    (``window_size`` (W - 1, 0))."""
    windows = []
    monkeypatch.setattr(bench_attention, "fa3", lambda *args, window=None, **kwargs: windows.append(window))
    length = 3 * bench_attention.BS + 17                              # a partial last block
    row = bench_attention.bench_decode(2, length, keep=0.25, device=torch.device("cpu"), repeats=1)
    assert row["phase"] == "decode" and row["batch"] == 2 and row["context"] == length
    assert row["fa3_ms"] == 2.0 and row["rtpurbo_ms"] == 0.5 and row["speedup"] == 4.0
    assert row["fa3_window_ms"] == 0.5 and windows == [None, (bench_attention.WINDOW - 1, 0)]
    timeline = row["rtpurbo_kernels"]
    assert timeline["span_us"] == 5.0
    assert row["kv_cache_dtype"] == "auto" and row["splits"] == 32     # scratch for the batch alone: 32 splits
    assert [k["name"] for k in timeline["kernels"]] == ["_split_kernel", "_combine_kernel"]
    assert 0.0 < row["kept_block_share"] <= 1.0                       # block top-p really ran


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_decode_graph_of_several_layers_times_one(bench_attention, monkeypatch):
    """--layers: the timed step runs every layer, each over its own K/V cache and index keys (one block
    table), and the times are per layer."""
    caches, index_caches = [], []
    monkeypatch.setattr(bench_attention, "fa3", lambda q, k_cache, *args, **kwargs: caches.append(k_cache))
    topp = bench_attention.block_topp

    def block_topp(q_idx, index, *args, **kwargs):
        index_caches.append(index.base)
        return topp(q_idx, index, *args, **kwargs)

    monkeypatch.setattr(bench_attention, "block_topp", block_topp)
    row = bench_attention.bench_decode(1, 2 * bench_attention.BS + 9, keep=0.5, device=torch.device("cpu"),
                                       repeats=1, layers=3)
    assert row["layers"] == 3 and row["fa3_ms"] == pytest.approx(2.0 / 3) and row["speedup"] == 4.0
    assert len(caches) == 6 and len({c.data_ptr() for c in caches}) == 3        # dense and window, 3 caches
    assert len(index_caches) == 6 and len({c.data_ptr() for c in index_caches}) == 3   # timed and profiled
    assert 0.0 < row["kept_block_share"] <= 1.0


def test_layers_below_one_exit_2_before_any_work(load_benchmark, capsys, tmp_path):
    bench = load_benchmark("bench_attention")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--prefill", "--decode", "--layers", "0", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "error: argument --layers: 0: a timed graph needs at least one layer" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_decode_sized_for_a_longer_max_model_len(bench_attention):
    """--max-model-len sizes block top-p as a server would; the kept share stays per real block."""
    length = 2 * bench_attention.BS + 5
    row = bench_attention.bench_decode(1, length, keep=0.5, device=torch.device("cpu"), repeats=1,
                                       max_model_len=40 * bench_attention.BS)
    short = bench_attention.bench_decode(1, length, keep=0.5, device=torch.device("cpu"), repeats=1)
    assert row["max_model_len"] == 40 * bench_attention.BS and short["max_model_len"] == length
    assert row["kept_block_share"] == short["kept_block_share"] and 0.0 < row["kept_block_share"] <= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_decode_reads_an_fp8_cache_with_a_servers_split_count(bench_attention, monkeypatch):
    """--kv-cache-dtype fp8: both sides read float8_e4m3fn pages (FA3 gets FP8 queries and descales) and
    RTPURBO's index keys are e4m3 as served (bf16 with --index-key-dtype model); --max-num-seqs sizes the
    split scratch as the serving builder does, hence the splits per sequence."""
    m, seen = bench_attention, {}
    monkeypatch.setattr(m, "fa3", lambda q, k_cache, v_cache, *args, descale=None, **kwargs: seen.update(
        dtypes=(q.dtype, k_cache.dtype, v_cache.dtype), descale=descale))
    length = 3 * m.BS + 17
    row = m.bench_decode(1, length, keep=0.25, device=torch.device("cpu"), repeats=1, max_num_seqs=2,
                         kv_cache_dtype="fp8")
    assert seen["dtypes"] == (torch.float8_e4m3fn,) * 3 and seen["descale"].shape == (1, m.HKV)
    assert row["kv_cache_dtype"] == "fp8" and row["max_num_seqs"] == 2
    assert row["splits"] == 64                                     # 2 x 32 slots for one sequence
    assert row["local_splits"] == 32                               # 2 programs per SM (132): 8 KV heads x 32
    assert row["bytes"]["fa3"] == length * m.HKV * 2 * m.D         # one byte per K or V element
    assert row["index_key_dtype"] == "auto" and row["index_key_bytes"] == 1
    assert row["bytes"]["rtpurbo_index"] == length * len(m.RETRIEVAL) * m.DI
    assert 0.0 < row["kept_block_share"] <= 1.0
    bf16_keys = m.bench_decode(1, length, keep=0.25, device=torch.device("cpu"), repeats=1, kv_cache_dtype="fp8",
                               index_keys="model")
    assert bf16_keys["index_key_bytes"] == 2 and bf16_keys["kept_block_share"] == row["kept_block_share"]


def test_decode_bytes_and_bandwidth(bench_attention):
    """Bytes per layer step: FA3 reads every KV head's K/V; RTPURBO the sink + window K/V of the KV heads
    that serve local heads (all 8 here), the 16-dim index keys of the 5 retrieval heads and the kept
    blocks' K/V. Achieved TB/s and the share of the peak follow from the times."""
    m = bench_attention
    length, token = 128 * 1024, 2 * m.D * 2                         # K and V of one token of one KV head, bf16
    got = m.decode_bytes(batch=2, length=length, kept_blocks=10)
    assert got["fa3"] == 2 * length * m.HKV * token
    assert got["rtpurbo_window"] == 2 * (m.SINK + m.WINDOW) * m.HKV * token
    assert got["rtpurbo_index"] == 2 * length * len(m.RETRIEVAL) * m.DI * 2
    assert got["rtpurbo_kept"] == 10 * m.BS * token
    assert got["rtpurbo"] == got["rtpurbo_window"] + got["rtpurbo_index"] + got["rtpurbo_kept"]
    assert m.decode_bytes(1, 100, 0)["rtpurbo_window"] == 100 * m.HKV * token     # shorter than the window
    fp8 = m.decode_bytes(batch=2, length=length, kept_blocks=10, kv_bytes=1)        # K/V halve, index keys stay
    assert (fp8["fa3"], fp8["rtpurbo_window"], fp8["rtpurbo_index"]) == (got["fa3"] // 2, got["rtpurbo_window"] // 2,
                                                                         got["rtpurbo_index"])
    assert m.decode_bytes(2, length, 10, kv_bytes=1, index_bytes=1)["rtpurbo_index"] == got["rtpurbo_index"] // 2
    row = m.add_bandwidth({"fa3_ms": 2.0, "rtpurbo_ms": 0.5, "bytes": {"fa3": 4e9, "rtpurbo": 1e9}}, 4e12)
    assert row["fa3_tb_per_s"] == pytest.approx(2.0) and row["rtpurbo_tb_per_s"] == pytest.approx(2.0)
    assert row["fa3_peak_share"] == pytest.approx(0.5) and row["rtpurbo_peak_share"] == pytest.approx(0.5)


def test_peak_bandwidth_follows_the_card(bench_attention):
    """The default peak is the card's, by the name torch gives it; GH200 is not taken for an H200."""
    peak = bench_attention.card_peak_bandwidth
    assert peak("NVIDIA H200") == 4.8e12 and peak("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak("NVIDIA H100 PCIe") == 2.0e12 and peak("NVIDIA GH200 480GB") == 4.0e12
    assert peak("NVIDIA A100-SXM4-80GB") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")
def test_prefill_row_has_the_sparse_prefill(bench_attention, monkeypatch):
    """The prefill point runs the head-wise prefill dense and sparse (FA3 stubbed, the sparse prefill's
    Triton kernels under the interpreter): planted hot blocks make the tiles keep a share below 1."""
    import types

    def flash_attn_varlen_func(q, k, v, *args, out=None, return_softmax_lse=False, **kwargs):
        out = torch.zeros(q.shape, dtype=q.dtype) if out is None else out.zero_()
        return (out, torch.zeros(q.shape[1], q.shape[0])) if return_softmax_lse else out

    fa = types.ModuleType("vllm.vllm_flash_attn")
    fa.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", fa)
    times = iter([3.0, 1.0, 0.5])
    monkeypatch.setattr(bench_attention, "time_eager", lambda fn, repeats, warmup: (fn(), next(times))[1])
    kernels = [("_attend_kernel", 300.0, 2), ("_window_kernel", 100.0, 1)]       # the profiler's view, stubbed
    monkeypatch.setattr(bench_attention, "profile_kernels", lambda run: (0.0005, kernels))
    length = 5 * bench_attention.TILE_Q + 37                          # 6 tiles, the last one partial
    row = bench_attention.bench_prefill(length, torch.device("cpu"), repeats=1, prefill_top_p=0.9, keep=0.2)
    assert row["phase"] == "prefill" and row["context"] == length and row["prefill_top_p"] == 0.9
    assert row["speedup"] == 3.0 and row["sparse_speedup"] == 6.0
    assert 0.0 < row["kept_block_share"] < 1.0
    table = row["rtpurbo_sparse_kernels"]
    assert (table["wall_ms"], table["gpu_ms"], table["kernels"][0]["name"]) == (0.5, 0.4, "_attend_kernel")
    lines = bench_attention.format_kernel_table(table, "sparse prefill")
    assert lines[0] == "\nsparse prefill: wall 0.5 ms, kernels 0.4 ms on the GPU"
    assert lines[1].split() == ["0.300", "ms", "75.0%", "2x", "_attend_kernel"]


def test_bad_kernel_setting_exits_2_before_any_work(load_benchmark, capsys, tmp_path):
    bench = load_benchmark("bench_attention")
    assert bench.main(["--prefill", "--decode", "--config", "sparse_decode.wraps=8", "--out", str(tmp_path)]) == 2
    assert "error: --config 'sparse_decode.wraps=8': sparse_decode has no setting" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bad_variant_exits_2_before_any_work(load_benchmark, capsys, tmp_path):
    bench = load_benchmark("bench_attention")
    assert bench.main(["--prefill", "--decode", "--variants", "launch.pdl=1,launch.pld=1", "--out", str(tmp_path)]) == 2
    assert "error: --config 'launch.pld=1': launch has no setting 'pld'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_variants_time_every_point_again_under_their_settings(load_benchmark):
    """Each variant's settings hold while its points run (and only then); rows pair each point's time with
    this run's."""
    from rtpurbo_vllm.bench import kernel_config

    bench = load_benchmark("bench_attention")
    seen = []

    def run(batch, length):
        pdl = kernel_config.kernel_configs()["launch"]["pdl"]
        seen.append((batch, length, pdl))
        return {"rtpurbo_ms": 0.5 if pdl else 1.0, "rtpurbo_kernels": {"span_us": None, "kernels": []}}

    points = [{"batch": 1, "context": 128, "rtpurbo_ms": 1.0}, {"batch": 4, "context": 256, "rtpurbo_ms": 2.0}]
    rows = bench.time_variants({"launch.pdl=1": {"launch": {"pdl": 1}}}, points, run)
    assert seen == [(1, 128, 1), (4, 256, 1)] and kernel_config.kernel_configs()["launch"]["pdl"] == 0
    assert [(r["variant"], r["batch"], r["base_ms"], r["speedup_vs_base"]) for r in rows] == [
        ("launch.pdl=1", 1, 1.0, 2.0), ("launch.pdl=1", 4, 2.0, 4.0)]
