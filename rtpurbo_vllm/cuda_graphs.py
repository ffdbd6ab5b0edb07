"""CUDA-graph capture of a launch sequence (used by the kernel tests and the benchmarks)."""

from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], None], warmup: int = 1) -> torch.cuda.CUDAGraph:
    """Runs ``fn`` ``warmup`` times on a side stream (Triton compiles outside the capture), then
    captures one call; ``graph.replay()`` repeats its launches with the tensors' current contents."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
