"""GPU timing shared by the benchmarks: CUDA-graph replays timed with events, median of repeats."""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from rtpurbo_vllm.cuda_graphs import capture


def time_cuda_graph(fn: Callable[[], None], repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of one ``fn()`` replayed from a CUDA graph (launch gaps removed).

    ``fn`` must be capturable: fixed shapes, no host synchronisation, no allocation that outlives it.
    """
    graph = capture(fn, warmup)
    return time_eager(graph.replay, repeats, warmup)


def time_eager(fn: Callable[[], None], repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` launched eagerly, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
