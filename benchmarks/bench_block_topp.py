"""Decode block top-p per launch setting: CUDA-graph replay times of ``block_topp`` for every combination
of the swept settings, split into its two kernels (block stats, selection) as the GPU runs them.

The settings are ``block_topp.kernel.CONFIG``'s: ``search_bits`` (bits of the threshold found per
selection step; 1 is the binary search), ``select_chunk`` (blocks one selection program holds in
registers; a longer row re-reads the workspace once per step), ``select_warps`` (its warps; 0: by the
chunk) and ``stats_blocks_per_prog`` (selection blocks one stats program scores). Inputs as
``bench_attention.py``'s decode points (:mod:`rtpurbo_vllm.bench.attention_layer`: 5
retrieval heads, 16-dim index keys, 64-token pages and blocks, ``--keep`` of the blocks planted hot,
top-p 0.9). Per context and batch, every setting must select exactly what the binary search at the
kernel's other defaults selects (the reference, timed first); the script exits with 1 if one does not.
Each timed graph runs ``--layers`` layers' ``block_topp`` one after the other, each layer with its own
queries and index keys (as a model's decode graph does), and times are per layer: one layer's index keys
(21 MB at 128K, batch 1, bf16) would otherwise stay in the 50 MB L2 between replays.

Run on a GPU from the repo root:
    python3 -P benchmarks/bench_block_topp.py [--contexts 128 512] [--batch 1 4] [--sweep search_bits=1,2,3,4]
    python3 -P benchmarks/bench_block_topp.py --sweep select_chunk=4096,8192 stats_blocks_per_prog=2,4,8
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

from rtpurbo_vllm.bench.attention_layer import (BS, RETRIEVAL, SINK, TOP_P, decode_index_inputs,
                                                random_block_table)
from rtpurbo_vllm.bench.timing import layer_count, profile_cuda_graph, replay_timeline, time_cuda_graph
from rtpurbo_vllm.triton_kernels.block_topp import block_topp, make_block_topp_workspace
from rtpurbo_vllm.triton_kernels.block_topp import kernel as topp_kernel

KERNEL_NAMES = {"stats": "_block_stats_kernel", "select": "_select_kernel"}


def bench_point(batch: int, length: int, settings: list[dict[str, int]], keep: float, device,
                repeats: int, layers: int = 1) -> list[dict]:
    """One row per setting (``{CONFIG key: value}``, the rest at the kernel's defaults): ``block_topp``
    milliseconds and its kernels' GPU microseconds per layer of ``layers``-layer graphs, and whether it
    selects what the first setting does (in the last layer)."""
    block_table, num_pages = random_block_table(length, batch, device)
    stack = [decode_index_inputs(batch, length, keep, block_table, num_pages, device) for _ in range(layers)]
    max_blocks = math.ceil(length / BS)
    workspace = make_block_topp_workspace(batch, len(RETRIEVAL), max_blocks, device)
    selected = torch.empty(batch, len(RETRIEVAL), max_blocks, dtype=torch.int32, device=device)
    num_selected = torch.empty(batch, len(RETRIEVAL), dtype=torch.int32, device=device)

    def run():
        for inputs in stack:
            block_topp(inputs.q_idx, inputs.index, inputs.index_table, inputs.seq_lens, TOP_P, SINK, BS, max_blocks,
                       workspace, selected, num_selected)

    saved, rows, reference = dict(topp_kernel.CONFIG), [], None
    try:
        for setting in settings:
            topp_kernel.CONFIG.clear()
            topp_kernel.CONFIG.update(saved, **setting)      # read at launch: before the capture
            selected.fill_(-7)
            num_selected.fill_(-7)
            run()
            result = (selected.clone(), num_selected.clone())
            reference = reference or result
            timeline = replay_timeline(profile_cuda_graph(run, repeats), repeats)
            kernel_us = {part: sum(k["us"] for k in timeline["kernels"] if k["name"].startswith(name)) / layers
                         for part, name in KERNEL_NAMES.items()} if timeline["kernels"] else {}
            rows.append({"batch": batch, "context": length, "blocks": max_blocks, "layers": layers, "settings": setting,
                         "ms": time_cuda_graph(run, repeats) / layers, "kernel_us": kernel_us,
                         "same_as_reference": torch.equal(result[0], reference[0])
                         and torch.equal(result[1], reference[1]),
                         "kept_block_share": num_selected.float().mean().item() / max_blocks})
    finally:
        topp_kernel.CONFIG.clear()
        topp_kernel.CONFIG.update(saved)
    return rows


def parse_sweep(items: list[str]) -> dict[str, list[int]]:
    """``["KEY=V1,V2", ...]`` as ``{KEY: [V1, V2]}``; raises ``ValueError`` naming the bad item: KEY must be a
    block_topp setting, ``search_bits`` values in 1..8, ``select_warps`` 0 (the launcher's
    choice) or a power of two, the others powers of two."""
    sweep = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in topp_kernel.CONFIG:
            raise ValueError(f"--sweep {item!r}: expected KEY=V1,V2,... with KEY one of "
                             f"{', '.join(sorted(topp_kernel.CONFIG))}")
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = [0]
        least = 0 if key == "select_warps" else 1
        ok = (all(1 <= v <= 8 for v in values) if key == "search_bits"
              else all(v >= least and not v & (v - 1) for v in values))
        if not ok:
            raise ValueError(f"--sweep {item!r}: search_bits takes 1..8, select_warps 0 or a power of two, the "
                             "other settings powers of two")
        sweep[key] = values
    return sweep


def sweep_settings(sweep: dict[str, list[int]]) -> list[dict[str, int]]:
    """The reference (``search_bits`` 1, the other settings at the kernel's defaults), then every combination
    of the swept values that differs from it."""
    reference = {"search_bits": 1}
    combos = [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]
    full = {**topp_kernel.CONFIG, **reference}
    return [reference] + [c for c in combos if {**topp_kernel.CONFIG, **c} != full]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", metavar="K", type=int, nargs="*", default=[128, 512],
                        help="context lengths in K tokens (default 128 512)")
    parser.add_argument("--batch", metavar="B", type=int, nargs="*", default=[1, 4], help="batch sizes (default 1 4)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2", nargs="*", default=["search_bits=1,2,3,4"],
                        help="block_topp settings to combine (default search_bits=1,2,3,4; settings: "
                             f"{', '.join(sorted(topp_kernel.CONFIG))})")
    parser.add_argument("--keep", metavar="SHARE", type=float, default=0.03,
                        help="share of blocks planted as the indexer's hot blocks (default 0.03)")
    parser.add_argument("--repeats", metavar="N", type=int, default=50, help="timed replays (median)")
    parser.add_argument("--layers", metavar="N", type=layer_count, default=4,
                        help="layers per timed graph, each with its own index keys, times per layer (default "
                             "%(default)s)")
    args = parser.parse_args(argv)
    try:
        settings = sweep_settings(parse_sweep(args.sweep))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_block_topp.py needs a CUDA GPU (none found); nothing was measured", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = []
    for batch in args.batch:
        for k in args.contexts:
            rows += bench_point(batch, k * 1024, settings, args.keep, torch.device("cuda"), args.repeats,
                                args.layers)
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: block_topp (stats + selection), CUDA-graph replay, median of "
          f"{args.repeats}, per layer of {args.layers}-layer graphs; HR={len(RETRIEVAL)}, BS={BS}, top_p={TOP_P}; "
          f"defaults {topp_kernel.CONFIG}; stats / select: each kernel's GPU time (torch.profiler)")
    print(f"{'batch':>5} {'context':>8} {'blocks':>7} {'ms':>9} {'vs ref':>7} {'stats us':>9} {'select us':>9} "
          f"{'kept':>6} {'same':>5}  setting")
    base = {}
    for r in rows:
        base.setdefault((r["batch"], r["context"]), r["ms"])
        us = [f"{r['kernel_us'][part]:9.1f}" if r["kernel_us"] else f"{'-':>9}" for part in KERNEL_NAMES]
        print(f"{r['batch']:5d} {r['context'] // 1024:7d}K {r['blocks']:7d} {r['ms']:9.4f} "
              f"{r['ms'] / base[(r['batch'], r['context'])]:6.3f}x {' '.join(us)} {r['kept_block_share']:6.3f} "
              f"{'yes' if r['same_as_reference'] else 'NO':>5}  "
              + " ".join(f"{key}={value}" for key, value in r["settings"].items()))
    differ = [r for r in rows if not r["same_as_reference"]]
    if differ:
        print(f"\n{len(differ)} setting(s) selected other blocks than the binary search", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
