"""The profiler's view of the GPU (rtpurbo_vllm.bench.timing): kernel runs of replayed CUDA graphs grouped into
replays, medians per kernel, a name launched twice kept apart, a clear note when the runs do not fit; GPU time
per kernel name per run."""

from rtpurbo_vllm.bench.timing import KernelRun, format_timeline, kernel_table, replay_timeline


def replay(start: float, split_first: float) -> list[KernelRun]:
    """One decode replay: a side-stream split beside the selection, then the retrieval split and the combine."""
    return [KernelRun("_split_kernel", start, start + split_first),
            KernelRun("_block_stats_kernel", start + 1.0, start + 6.0),
            KernelRun("_select_kernel", start + 7.0, start + 17.0),
            KernelRun("_split_kernel", start + 18.0, start + 24.0),
            KernelRun("_combine_kernel", start + 25.0, start + 27.0)]


def test_replays_are_grouped_and_kernels_keyed_by_name_and_rank():
    runs = replay(0.0, 12.0) + replay(100.0, 14.0) + replay(200.0, 30.0)      # the last one's side split runs long
    timeline = replay_timeline(list(reversed(runs)), repeats=3)              # any order in
    assert timeline["span_us"] == 27.0                                       # median of 27, 27, 30
    assert [(k["name"], k["start_us"], k["us"]) for k in timeline["kernels"]] == [
        ("_split_kernel", 0.0, 14.0), ("_block_stats_kernel", 1.0, 5.0), ("_select_kernel", 7.0, 10.0),
        ("_split_kernel", 18.0, 6.0), ("_combine_kernel", 25.0, 2.0)]
    lines = format_timeline(timeline)
    assert lines[0] == "  GPU span 27.0 us; kernels (start and duration in us from the first):"
    assert lines[3].split() == ["7.0", "10.0", "_select_kernel"]


def test_runs_that_do_not_fit_the_replays_give_a_note():
    assert replay_timeline([], repeats=5) == {"span_us": None, "kernels": [],
                                              "note": "the profiler saw 0 kernel runs for 5 replays"}
    odd = replay_timeline(replay(0.0, 1.0)[:4], repeats=3)
    assert odd["span_us"] is None and format_timeline(odd) == ["  no kernel timeline: the profiler saw 4 kernel "
                                                               "runs for 3 replays"]


def test_kernel_table_per_run():
    kernels = [("small", 512.0, 512), ("gemm_big_kernel", 5120.0, 1024), ("attention", 2560.0, 512)]
    assert kernel_table(kernels, seconds=2.56, runs=256, top=2) == {
        "wall_ms": 10.0, "gpu_ms": 0.032, "kernels": [{"name": "gemm_big_kernel", "ms": 0.02, "launches": 4.0},
                                                       {"name": "attention", "ms": 0.01, "launches": 2.0}]}
    assert kernel_table(kernels, seconds=0.5)["kernels"][0] == {"name": "gemm_big_kernel", "ms": 5.12, "launches": 1024}

