"""GPU timing shared by the benchmarks: CUDA-graph replays timed with events, median of repeats, the
kernels of a replayed graph as the profiler sees them on the GPU (where a step's time goes), and the GPU
time per kernel of any run (where a prefill's or an engine's time goes)."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from rtpurbo_vllm.cuda_graphs import capture

R = TypeVar("R")


def layer_count(text: str) -> int:
    """The benchmarks' ``--layers`` (argparse ``type``): layers per timed graph, at least one."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of layers (e.g. --layers 4)") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count}: a timed graph needs at least one layer (e.g. --layers 4)")
    return count


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


@dataclass(frozen=True)
class KernelRun:
    """One kernel (or memset / copy) the profiler saw on the GPU: its name and GPU start and end, in us."""

    name: str
    start_us: float
    end_us: float


def profile_cuda_graph(fn: Callable[[], None], repeats: int = 20, warmup: int = 3) -> list[KernelRun]:
    """The GPU work of ``repeats`` replays of ``fn`` captured as a CUDA graph, under ``torch.profiler``
    (CUPTI reports each kernel node of a replayed graph); see :func:`replay_timeline`."""
    graph = capture(fn, warmup)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            graph.replay()
        torch.cuda.synchronize()
    return [KernelRun(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def replay_timeline(runs: list[KernelRun], repeats: int) -> dict:
    """Where one replay's GPU time goes: median over the replays of its span and of each kernel's start
    (from the replay's first kernel) and duration.

    Replays run one after the other, so the runs sorted by start fall into ``repeats`` equal groups; a
    kernel is known by its name and its rank among the group's kernels of that name (a name launched
    twice, e.g. once per stream, gives two rows). Kernels of parallel streams overlap in the timeline.

    Args:
        runs: every kernel run of the replays (:func:`profile_cuda_graph`).
        repeats: replays profiled.

    Returns:
        ``{"span_us": median first start to last end, "kernels": [{"name", "start_us", "us"}, ...]}``
        ordered by median start (times rounded to 0.1 us); ``{"span_us": None, "kernels": [],
        "note": why}`` when the runs do not split into ``repeats`` equal replays (e.g. no profiler data).
    """
    per_replay, extra = divmod(len(runs), repeats) if repeats > 0 else (0, 0)
    if per_replay == 0 or extra:
        return {"span_us": None, "kernels": [],
                "note": f"the profiler saw {len(runs)} kernel runs for {repeats} replays"}
    ordered = sorted(runs, key=lambda r: r.start_us)
    spans, starts, durations = [], {}, {}
    for i in range(repeats):
        group = ordered[i * per_replay:(i + 1) * per_replay]
        first = group[0].start_us
        spans.append(max(r.end_us for r in group) - first)
        seen: dict[str, int] = {}
        for r in group:
            key = (r.name, seen.setdefault(r.name, 0))
            seen[r.name] += 1
            starts.setdefault(key, []).append(r.start_us - first)
            durations.setdefault(key, []).append(r.end_us - r.start_us)
    kernels = [{"name": key[0], "start_us": round(statistics.median(starts[key]), 1),
                "us": round(statistics.median(durations[key]), 1)} for key in starts]
    return {"span_us": round(statistics.median(spans), 1), "kernels": sorted(kernels, key=lambda k: k["start_us"])}


def format_timeline(timeline: dict, width: int = 40) -> list[str]:
    """:func:`replay_timeline` as text lines: the span, then per kernel its start, duration and name."""
    if timeline["span_us"] is None:
        return [f"  no kernel timeline: {timeline['note']}"]
    lines = [f"  GPU span {timeline['span_us']:.1f} us; kernels (start and duration in us from the first):"]
    lines += [f"    {k['start_us']:7.1f} {k['us']:7.1f}  {k['name'][:width]}" for k in timeline["kernels"]]
    return lines


def profile_kernels(run: Callable[[], R]) -> tuple[R, list[tuple[str, float, int]]]:
    """``run()`` under ``torch.profiler``: what it returned, and per CUDA kernel name its summed GPU
    microseconds and launches (``(name, us, launches)``; see :func:`kernel_table`)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = run()
    return result, [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_table(kernels: list[tuple[str, float, int]], seconds: float, runs: int = 1, top: int = 12) -> dict:
    """Per run (a decode step, a prefill call) of a profiled stretch of ``runs`` runs that took ``seconds``
    of wall time: its wall milliseconds, the kernels' summed GPU milliseconds, and the ``top`` kernels by
    time (name cut to 100 characters, milliseconds and launches per run). ``kernels``: ``(name, total
    microseconds, launches)`` (:func:`profile_kernels`)."""
    ranked = sorted(kernels, key=lambda k: -k[1])
    return {"wall_ms": round(seconds * 1000 / runs, 3),
            "gpu_ms": round(sum(k[1] for k in kernels) / 1000 / runs, 3),
            "kernels": [{"name": name[:100], "ms": round(us / 1000 / runs, 4), "launches": round(count / runs, 2)}
                        for name, us, count in ranked[:top]]}
